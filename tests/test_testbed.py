"""The test bed itself: nodes, underlay, pods on a NORMAL bridge, teardown and leak detection."""

from __future__ import annotations

import asyncio
import os

import pytest
from kvswitch_testbed import TestBed, find_leaks
from kvswitch_testbed.bed import PHYS_BRIDGE
from kvswitch_testbed.netns import create_netns, list_netns, run
from kvswitch_testbed.ovsproc import process_alive
from kvswitch_testbed.probes import EchoServer, full_matrix, ping, tcp_echo, udp_echo

from tests.conftest import new_bed


def _netdev_bridge(bed: TestBed, node_name: str, bridge: str = "br0") -> None:
    bed.nodes[node_name].ovs.vsctl(
        "--may-exist", "add-br", bridge, "--", "set", "bridge", bridge, "datapath_type=netdev"
    )


class TestNodes:
    def test_three_nodes_run_their_own_ovs_and_reach_each_other_over_the_underlay(self, bed: TestBed) -> None:
        nodes = bed.add_nodes(3)
        pids = {n.ovs.vswitchd_pid for n in nodes} | {n.ovs.ovsdb_pid for n in nodes}
        assert None not in pids and len(pids) == 6
        for node in nodes:
            assert node.netns in list_netns()
            # ovs-vswitchd lives in the node's namespace: its br-phy tap holds the underlay IP there.
            addrs = run(["ip", "-4", "-o", "addr", "show", "dev", PHYS_BRIDGE], node.netns).stdout
            assert node.underlay_ip in addrs
            assert (
                os.stat(f"/proc/{node.ovs.vswitchd_pid}/ns/net").st_ino
                == os.stat(f"/var/run/netns/{node.netns}").st_ino
            )
        assert run(["ip", "link", "show", PHYS_BRIDGE], check=False).returncode != 0  # not in root ns

        async def all_pairs() -> list[bool]:
            return await asyncio.gather(
                *(ping(a.netns, b.underlay_ip) for a in nodes for b in nodes if a is not b)
            )

        assert all(asyncio.run(all_pairs()))

    def test_teardown_stops_every_process_and_namespace(self) -> None:
        bed = new_bed()
        nodes = bed.add_nodes(3)
        pids = [p for n in nodes for p in (n.ovs.vswitchd_pid, n.ovs.ovsdb_pid)]
        bed.teardown()
        assert not find_leaks(bed.run_id)
        for pid in pids:
            assert pid is not None
            assert not process_alive(pid)

    def test_teardown_happens_when_the_body_fails(self) -> None:
        bed = new_bed()
        with pytest.raises(RuntimeError, match="boom"), bed:
            bed.add_nodes(2)
            raise RuntimeError("boom")
        assert not find_leaks(bed.run_id)

    def test_two_runs_coexist_with_identical_topologies(self, bed: TestBed) -> None:
        other = new_bed()
        try:
            a = bed.add_node()
            b = other.add_node()
            assert a.underlay_ip == b.underlay_ip and a.netns != b.netns
            assert asyncio.run(ping(a.netns, a.underlay_ip))
        finally:
            other.teardown()
        assert not find_leaks(other.run_id)
        assert bed.nodes["node1"].ovs.vswitchd_pid is not None  # the first run is untouched


class TestPodsOnNormalBridge:
    def test_pod_pair_passes_icmp_tcp_and_udp(self, bed: TestBed) -> None:
        node = bed.add_node()
        _netdev_bridge(bed, node.name)
        a, b = bed.add_pod(node, "a"), bed.add_pod(node, "b")
        bed.plug(a, "br0", "10.1.0.2/24")
        bed.plug(b, "br0", "10.1.0.3/24")
        endpoints = [("a", a.netns, "10.1.0.2"), ("b", b.netns, "10.1.0.3")]
        matrices = asyncio.run(full_matrix(endpoints))
        for proto, results in matrices.items():
            assert results == {("a", "b"): True, ("b", "a"): True}, proto

    def test_probes_fail_when_there_is_no_path(self, bed: TestBed) -> None:
        """The probes can fail: without the bridge port nothing gets through."""
        node = bed.add_node()
        _netdev_bridge(bed, node.name)
        a, b = bed.add_pod(node, "a"), bed.add_pod(node, "b")
        bed.plug(a, "br0", "10.1.0.2/24")
        bed.plug(b, "br0", "10.1.0.3/24")
        node.ovs.vsctl("del-port", "br0", "v-b")

        async def probe() -> tuple[bool, bool, bool]:
            server = await EchoServer(b.netns, "10.1.0.3", 7000).start()
            try:
                return (
                    await ping(a.netns, "10.1.0.3"),
                    await tcp_echo(a.netns, "10.1.0.3", 7000, timeout=1.0),
                    await udp_echo(a.netns, "10.1.0.3", 7000, timeout=0.3),
                )
            finally:
                await server.stop()

        assert asyncio.run(probe()) == (False, False, False)

    def test_large_tcp_payload_is_echoed_intact(self, bed: TestBed) -> None:
        node = bed.add_node()
        _netdev_bridge(bed, node.name)
        a, b = bed.add_pod(node, "a"), bed.add_pod(node, "b")
        bed.plug(a, "br0", "10.1.0.2/24")
        bed.plug(b, "br0", "10.1.0.3/24")

        async def probe() -> bool:
            server = await EchoServer(b.netns, "10.1.0.3", 7001).start()
            try:
                return await tcp_echo(a.netns, "10.1.0.3", 7001, size=1 << 20, timeout=10)
            finally:
                await server.stop()

        assert asyncio.run(probe())


class TestLeakCheck:
    def test_detects_a_leaked_namespace_and_ovs_process(self) -> None:
        bed = new_bed()
        node = bed.add_node()
        stray_ns = f"{bed.prefix}-stray"
        create_netns(stray_ns)
        bed.nodes.clear()  # forget the node: a plain teardown of known state would miss it
        report = find_leaks(bed.run_id)
        assert stray_ns in report.netns and node.netns in report.netns
        assert any("ovs-vswitchd" in p for p in report.processes)
        assert any("ovsdb-server" in p for p in report.processes)
        # teardown_run finds instances from the workdir, not from memory, so it still cleans up.
        bed.teardown()
        assert not find_leaks(bed.run_id)

    def test_detects_a_root_namespace_link_named_after_the_run(self) -> None:
        bed = new_bed()
        link = f"x{bed.run_id}"
        run(["ip", "link", "add", link, "type", "veth", "peer", "name", f"y{bed.run_id}"])
        try:
            assert sorted(find_leaks(bed.run_id).links) == [link, f"y{bed.run_id}"]
        finally:
            run(["ip", "link", "del", link])
        assert not find_leaks(bed.run_id)
