"""k-vswitch-cni against real OVS and real namespaces: spec conformance, chaining, GC, STATUS.

Every call execs the installed plugin the way a runtime does (inside the node's namespace, with
CNI_* variables and the netconf on stdin). ``path`` runs each test through the CNI server (the
agent's warm process) and through the in-process fallback (no server), which must behave alike.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from kvswitch_testbed import TestBed, find_leaks
from kvswitch_testbed.bed import teardown_run
from kvswitch_testbed.cni_harness import GATEWAY, NETWORK, CniNode, tc_qdiscs
from kvswitch_testbed.cni_runner import ConfList, netns_path
from kvswitch_testbed.netns import run
from kvswitch_testbed.ovsproc import process_alive
from kvswitch_testbed.probes import EchoServer, ping, tcp_echo

from kvswitch.cni import client
from kvswitch.cni.contract import host_ifname
from kvswitch.cni.server import CniServer
from kvswitch.cni.spec import SUPPORTED_VERSIONS
from tests.conftest import cni_node, new_bed

PATHS = ["server", "in-process"]


@pytest.fixture(scope="module")
def cni() -> Iterator[CniNode]:
    """One node for the module (k-vswitch0, plugin installed, server on a thread); leak-checked."""
    with cni_node() as node:
        yield node


@pytest.fixture(params=PATHS)
def in_process(request: pytest.FixtureRequest) -> bool:
    return bool(request.param == "in-process")


def expect_ok(run_: Any) -> Any:
    assert run_.ok, str(run_)
    return run_.json() if run_.stdout.strip() else None


# --- VERSION -------------------------------------------------------------------------------------


class TestVersion:
    def test_reports_every_supported_version_and_echoes_the_callers(self, cni: CniNode) -> None:
        for stdin, echoed in ((b'{"cniVersion": "0.4.0"}', "0.4.0"), (b"", "1.1.0")):
            out = expect_ok(cni.call("VERSION", stdin))
            assert out == {"cniVersion": echoed, "supportedVersions": list(SUPPORTED_VERSIONS)}
        assert {"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"} <= set(SUPPORTED_VERSIONS)

    def test_needs_no_server(self, cni: CniNode) -> None:
        conf = json.dumps({"cniVersion": "1.0.0", "serverSocket": "/nonexistent/cni.sock"}).encode()
        assert expect_ok(cni.call("VERSION", conf))["cniVersion"] == "1.0.0"


# --- ADD / CHECK / DEL per version and path --------------------------------------------------------


class TestAttach:
    @pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
    def test_add_check_del_renders_the_requested_version(
        self, cni: CniNode, version: str, in_process: bool
    ) -> None:
        pod = cni.new_pod()
        conf = cni.conf(version=version, in_process=in_process)
        result = expect_ok(cni.call("ADD", conf, pod))
        host_if = cni.host_if(pod)

        assert result["cniVersion"] == version
        host, ctr = result["interfaces"]
        assert host["name"] == host_if and "sandbox" not in host
        assert ctr["name"] == "eth0" and ctr["sandbox"] == netns_path(pod.netns)
        (ip,) = result["ips"]
        assert ip["interface"] == 1 and ip["gateway"] == GATEWAY
        assert ip["address"].startswith("10.20.0.") and ip["address"].endswith("/24")
        assert ("version" in ip) == (version < "1.0.0")
        assert ("mtu" in ctr) == (version == "1.1.0")
        assert result["routes"] == [{"dst": "0.0.0.0/0", "gw": GATEWAY}]
        # MAC derived from the IP: 0a:58 + the four address bytes.
        octets = [int(x) for x in ip["address"].split("/")[0].split(".")]
        assert ctr["mac"] == "0a:58:" + ":".join(f"{o:02x}" for o in octets)

        # The kernel agrees with the result.
        link = json.loads(run(["ip", "-j", "-d", "addr", "show", "dev", "eth0"], pod.netns).stdout)[0]
        assert link["address"] == ctr["mac"] and link["mtu"] == 1450  # br-phy 1500 - VXLAN 50
        assert [f"{a['local']}/{a['prefixlen']}" for a in link["addr_info"]] == [ip["address"]]
        assert "default via 10.20.0.1 dev eth0" in run(["ip", "route"], pod.netns).stdout
        assert "tx-checksumming: off" in run(["ethtool", "-k", "eth0"], pod.netns).stdout
        host_link = json.loads(run(["ip", "-j", "addr", "show", "dev", host_if], cni.node.netns).stdout)[0]
        assert "NOARP" in host_link["flags"] and "UP" in host_link["flags"] and host_link["mtu"] == 1450
        assert host_link["addr_info"] == []  # no IPv6 link-local address of its own
        # ... and so does OVS: the port is on k-vswitch0 and says whose it is.
        ids = cni.owned_ports()[host_if]
        assert ids["container-id"] == f"c-{pod.name}" and ids["ifname"] == "eth0"
        assert ids["netns"] == netns_path(pod.netns) and ids["ip"] == ip["address"]
        assert ids["mac"] == ctr["mac"] and ids["cni-network"] == NETWORK
        assert (ids["pod-namespace"], ids["pod-name"], ids["pod-uid"]) == ("default", "test", "u-1")
        assert cni.node.ovs.vsctl("port-to-br", host_if).stdout.strip() == "k-vswitch0"
        assert cni.reserved_ips() == {ip["address"].split("/")[0]: f"c-{pod.name}/eth0"}

        check = cni.call("CHECK", {**conf, "prevResult": result}, pod)
        if version >= "0.4.0":
            expect_ok(check)
        else:
            assert check.error_code == 1  # CHECK came with 0.4.0

        for _ in range(2):  # DEL is idempotent
            expect_ok(cni.call("DEL", {**conf, "prevResult": result}, pod))
        assert cni.leftovers(pod) == {}

    def test_two_pods_reach_each_other_over_tcp(self, cni: CniNode, in_process: bool) -> None:
        conf = cni.conf(in_process=in_process)
        pods = [cni.new_pod() for _ in range(2)]
        ips = [expect_ok(cni.call("ADD", conf, p))["ips"][0]["address"].split("/")[0] for p in pods]

        async def probe() -> list[bool]:
            servers = [await EchoServer(p.netns, ip, 7000).start() for p, ip in zip(pods, ips, strict=True)]
            try:
                return [
                    await tcp_echo(pods[0].netns, ips[1], 7000, size=64 * 1024),
                    await tcp_echo(pods[1].netns, ips[0], 7000, size=64 * 1024),
                    await ping(pods[0].netns, GATEWAY),
                ]
            finally:
                for s in servers:
                    await s.stop()

        try:
            assert asyncio.run(probe()) == [True, True, True]
            # Only the gateway's owner answers ARP for it: the node's kernel stays quiet on the
            # host veths it also sees the pods' broadcasts on (they are NOARP).
            arping = run(["arping", "-c", "2", "-w", "3", "-I", "eth0", GATEWAY], pods[0].netns, check=False)
            bridge_mac = json.loads(run(["ip", "-j", "link", "show", "k-vswitch0"], cni.node.netns).stdout)[0]
            assert set(re.findall(r"\[([0-9A-F:]{17})\]", arping.stdout.upper())) == {
                bridge_mac["address"].upper()
            }, arping.stdout
        finally:
            for p in pods:
                expect_ok(cni.call("DEL", conf, p))
        assert cni.leftovers(*pods) == {}

    def test_mtu_explicit_auto_from_default_route_and_mac_random(self, cni: CniNode) -> None:
        pod = cni.new_pod()
        conf = cni.conf(mtu=1300, macMode="random")
        ctr = expect_ok(cni.call("ADD", conf, pod))["interfaces"][1]
        assert ctr["mtu"] == 1300 and not ctr["mac"].startswith("0a:58:")
        assert int(ctr["mac"][:2], 16) & 0b11 == 0b10  # locally administered unicast
        expect_ok(cni.call("DEL", conf, pod))

        # No underlayInterface: the default route's device (br-phy, 1500) minus GRE's 42 bytes.
        run(["ip", "route", "add", "default", "via", "10.250.0.1", "dev", "br-phy"], cni.node.netns)
        try:
            conf = cni.conf(encapsulation="gre")
            del conf["underlayInterface"]
            assert expect_ok(cni.call("ADD", conf, pod))["interfaces"][1]["mtu"] == 1458
            expect_ok(cni.call("DEL", conf, pod))
        finally:
            run(["ip", "route", "del", "default"], cni.node.netns)
        # runtimeConfig.mac (the "mac" capability) wins over the derived MAC.
        conf = cni.conf(capabilities={"mac": True}, runtimeConfig={"mac": "02:aa:bb:cc:dd:ee"})
        assert expect_ok(cni.call("ADD", conf, pod))["interfaces"][1]["mac"] == "02:aa:bb:cc:dd:ee"
        expect_ok(cni.call("DEL", conf, pod))
        assert cni.leftovers(pod) == {}

    def test_add_after_a_previous_plugin_appends_to_prev_result(self, cni: CniNode) -> None:
        pod = cni.new_pod()
        prev = {
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "lo0", "sandbox": netns_path(pod.netns)}],
            "ips": [{"address": "192.0.2.7/32", "interface": 0}],
            "dns": {"nameservers": ["192.0.2.53"]},
        }
        conf = cni.conf(version="1.0.0", prevResult=prev)
        result = expect_ok(cni.call("ADD", conf, pod))
        assert [i["name"] for i in result["interfaces"]] == ["lo0", cni.host_if(pod), "eth0"]
        assert [ip["interface"] for ip in result["ips"]] == [0, 2]
        assert result["dns"] == {"nameservers": ["192.0.2.53"]}
        expect_ok(cni.call("DEL", conf, pod))
        assert cni.leftovers(pod) == {}


# --- DEL in every state ---------------------------------------------------------------------------


class TestDel:
    def test_del_when_the_netns_is_gone(self, cni: CniNode, in_process: bool) -> None:
        pod = cni.new_pod()
        conf = cni.conf(in_process=in_process)
        expect_ok(cni.call("ADD", conf, pod))
        cni.bed.remove_pod(pod)  # the kernel destroys the veth with the namespace
        expect_ok(cni.call("DEL", conf, pod))
        expect_ok(cni.call("DEL", conf, pod, netns=""))  # and without CNI_NETNS at all
        assert cni.leftovers() == {}

    def test_del_when_the_port_is_gone(self, cni: CniNode, in_process: bool) -> None:
        pod = cni.new_pod()
        conf = cni.conf(in_process=in_process)
        expect_ok(cni.call("ADD", conf, pod))
        cni.node.ovs.vsctl("del-port", cni.host_if(pod))
        expect_ok(cni.call("DEL", conf, pod))
        assert cni.leftovers(pod) == {}

    def test_del_without_netns_or_anything_added(self, cni: CniNode, in_process: bool) -> None:
        pod = cni.new_pod()
        conf = cni.conf(in_process=in_process)
        expect_ok(cni.call("DEL", conf, pod, netns=""))
        expect_ok(cni.call("DEL", conf, container_id="never-added", netns="/var/run/netns/never-existed"))
        expect_ok(cni.call("ADD", conf, pod))
        expect_ok(cni.call("DEL", conf, pod, netns=""))
        assert cni.leftovers(pod) == {}

    def test_del_retried_while_ovsdb_was_down_finishes_later(self, bed: TestBed) -> None:
        """ovsdb unreachable: DEL releases what it can, says try again (11), then succeeds."""
        node = CniNode(bed)
        try:
            pod = node.new_pod()
            conf = node.conf()
            expect_ok(node.call("ADD", conf, pod))
            node.stop_server()  # the server's cached connection would otherwise retry for 5 s
            conf_down = {**conf, "serverSocket": "", "ovsdbSocket": "unix:" + str(node.workdir / "gone.sock")}
            failed = node.call("DEL", conf_down, pod)
            assert failed.error_code == 11, str(failed)
            assert node.reserved_ips() == {} and node.host_links() == []  # released anyway
            expect_ok(node.call("DEL", {**conf, "serverSocket": ""}, pod))
            assert node.leftovers(pod) == {}
        finally:
            node.close()


# --- CHECK ----------------------------------------------------------------------------------------


class TestCheck:
    def test_check_names_what_drifted(self, cni: CniNode) -> None:
        pod = cni.new_pod()
        conf = cni.conf()
        result = expect_ok(cni.call("ADD", conf, pod))
        checked = {**conf, "prevResult": result}
        try:
            expect_ok(cni.call("CHECK", checked, pod))

            run(["ip", "route", "del", "default"], pod.netns)
            failed = cni.call("CHECK", checked, pod)
            assert (
                failed.error_code == 103
                and "route 0.0.0.0/0 via 10.20.0.1 is missing" in failed.json()["details"]
            )
            run(["ip", "route", "add", "default", "via", GATEWAY], pod.netns)

            run(["ip", "link", "set", "eth0", "address", "02:00:00:00:00:99"], pod.netns)
            failed = cni.call("CHECK", checked, pod)
            assert failed.error_code == 103 and "has MAC 02:00:00:00:00:99" in failed.json()["details"]
            run(["ip", "link", "set", "eth0", "address", result["interfaces"][1]["mac"]], pod.netns)
            expect_ok(cni.call("CHECK", checked, pod))

            cni.node.ovs.vsctl("del-port", cni.host_if(pod))
            failed = cni.call("CHECK", checked, pod)
            assert failed.error_code == 103 and "OVS port" in failed.json()["details"]

            assert cni.call("CHECK", conf, pod).error_code == 7  # no prevResult
            other = cni.new_pod()
            wrong = cni.call("CHECK", checked, other)  # prevResult is not about this container
            assert wrong.error_code == 103
            cni.bed.remove_pod(other)
        finally:
            expect_ok(cni.call("DEL", conf, pod))
        assert cni.leftovers(pod) == {}

    def test_check_asks_ipam_about_the_reservation(self, cni: CniNode) -> None:
        pod = cni.new_pod()
        conf = cni.conf()
        result = expect_ok(cni.call("ADD", conf, pod))
        # Release the IP behind our back, as a buggy cleanup would: host-local's CHECK notices.
        ipam_conf = {**conf, "cniVersion": "1.0.0"}
        expect_ok(
            cni.plugins.exec("host-local", "DEL", ipam_conf, container_id=f"c-{pod.name}", ifname="eth0")
        )
        failed = cni.call("CHECK", {**conf, "prevResult": result}, pod)
        assert not failed.ok and "host-local CHECK failed" in failed.json()["msg"], str(failed)
        expect_ok(cni.call("DEL", conf, pod))
        assert cni.leftovers(pod) == {}


# --- STATUS ---------------------------------------------------------------------------------------


class TestStatus:
    def test_ready_when_agent_ovsdb_and_bridge_are(self, cni: CniNode) -> None:
        expect_ok(cni.call("STATUS", cni.conf()))
        # Without a server configured at all, the in-process plugin judges by OVS alone.
        expect_ok(cni.call("STATUS", cni.conf(in_process=True)))

    def test_not_ready_codes(self, cni: CniNode) -> None:
        nowhere = str(cni.workdir / "no-agent.sock")
        failed = cni.call("STATUS", cni.conf(serverSocket=nowhere))
        assert failed.error_code == 50 and "agent" in failed.json()["msg"]
        failed = cni.call("STATUS", cni.conf(ovsdbSocket="unix:/nonexistent/db.sock"))
        assert failed.error_code == 50 and "Open vSwitch" in failed.json()["msg"]
        assert cni.call("STATUS", cni.conf(version="1.0.0")).error_code == 1

    def test_bridge_missing_means_existing_pods_are_cut_off(self, cni: CniNode) -> None:
        cni.delete_bridge()
        try:
            failed = cni.call("STATUS", cni.conf())
            assert failed.error_code == 51 and "k-vswitch0" in failed.json()["msg"]
            pod = cni.new_pod()
            add = cni.call("ADD", cni.conf(), pod)
            assert add.error_code == 11  # try again once the agent made the bridge
            assert cni.leftovers(pod) == {}
        finally:
            cni.add_bridge()
        expect_ok(cni.call("STATUS", cni.conf()))


def test_ovsdb_restart_under_a_running_server(bed: TestBed) -> None:
    """The server's cached ovsdb connection goes stale: not ready, ADD says try again, then recovery."""
    node = CniNode(bed)
    try:
        expect_ok(node.call("STATUS", node.conf()))
        pid = node.node.ovs.ovsdb_pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        while process_alive(pid):
            time.sleep(0.01)
        failed = node.call("STATUS", node.conf())
        assert failed.error_code == 50 and "Open vSwitch" in failed.json()["msg"], str(failed)
        pod = node.new_pod()
        assert node.call("ADD", node.conf(), pod).error_code == 11
        assert node.host_links() == [] and node.reserved_ips() == {} and node.pod_links(pod) == ["lo"]
        node.node.ovs.start()  # the database survived; the IDL reconnects by itself
        deadline = time.monotonic() + 20
        while not (status := node.call("STATUS", node.conf())).ok and time.monotonic() < deadline:
            time.sleep(0.2)
        expect_ok(status)
        expect_ok(node.call("ADD", node.conf(), pod))
        expect_ok(node.call("DEL", node.conf(), pod))
        assert node.leftovers(pod) == {}
    finally:
        node.close()


# --- GC -------------------------------------------------------------------------------------------


class TestGc:
    def test_gc_removes_everything_not_listed(self, cni: CniNode, in_process: bool) -> None:
        conf = cni.conf(in_process=in_process)
        pods = [cni.new_pod() for _ in range(3)]
        results = [expect_ok(cni.call("ADD", conf, p)) for p in pods]
        # Leaks a crash could leave: a reservation without anything else, and a labelled veth
        # without a port.
        ipam_conf = {**conf, "cniVersion": "1.0.0"}
        expect_ok(
            cni.plugins.exec(
                "host-local",
                "ADD",
                ipam_conf,
                container_id="leaked",
                ifname="eth0",
                netns=netns_path(pods[2].netns),
            )
        )
        orphan = host_ifname(NETWORK, "orphan", "eth0")
        run(["ip", "link", "add", orphan, "type", "veth", "peer", "name", orphan + "p"], cni.node.netns)
        run(["ip", "link", "set", orphan, "alias", f"k-vswitch-cni {NETWORK} orphan eth0"], cni.node.netns)
        # Somebody else's network on the same bridge must be left alone.
        other_pod = cni.new_pod()
        other = {**conf, "name": "other-net"}
        expect_ok(cni.call("ADD", other, other_pod))

        keep = {"containerID": f"c-{pods[0].name}", "ifname": "eth0"}
        expect_ok(cni.call("GC", {**conf, "cni.dev/valid-attachments": [keep]}))

        assert set(cni.owned_ports()) == {
            cni.host_if(pods[0]),
            host_ifname("other-net", f"c-{other_pod.name}", "eth0"),
        }
        assert orphan not in cni.host_links() and cni.host_if(pods[1]) not in cni.host_links()
        assert set(cni.reserved_ips().values()) == {f"c-{pods[0].name}/eth0"}
        expect_ok(cni.call("CHECK", {**conf, "prevResult": results[0]}, pods[0]))  # untouched
        for p in pods[1:]:
            assert cni.pod_links(p) == ["lo"]

        # libcni's other spelling of the list works too; an empty list removes the rest.
        expect_ok(cni.call("GC", {**conf, "cni.dev/attachments": []}))
        theirs = host_ifname("other-net", f"c-{other_pod.name}", "eth0")
        assert cni.leftovers(*pods) == {"links": [theirs], "ports": [theirs]}
        expect_ok(cni.call("DEL", other, other_pod))
        assert cni.leftovers(*pods, other_pod) == {}


# --- chaining ---------------------------------------------------------------------------------------


class TestChaining:
    @pytest.mark.parametrize("version", ["0.4.0", "1.0.0"])
    def test_first_in_a_conflist_with_portmap_and_bandwidth(
        self, cni: CniNode, version: str, in_process: bool
    ) -> None:
        plugin = cni.conf(in_process=in_process)
        for k in ("cniVersion", "name"):
            del plugin[k]
        conflist = {
            "cniVersion": version,  # Debian's portmap/bandwidth (1.1.1) speak up to 1.0.0
            "name": NETWORK,
            "plugins": [
                plugin,
                {"type": "portmap", "capabilities": {"portMappings": True}},
                {"type": "bandwidth", "capabilities": {"bandwidth": True}},
            ],
        }
        chain = ConfList(conflist, cni.plugins)
        pod = cni.new_pod()
        att = cni.attachment(
            pod,
            portMappings=[{"hostPort": 18080, "containerPort": 8080, "protocol": "tcp"}],
            bandwidth={"ingressRate": 100_000_000, "ingressBurst": 1_000_000, "egressRate": 100_000_000,
                       "egressBurst": 1_000_000},
        )  # fmt: skip
        result = chain.add(att)
        try:
            host_if = cni.host_if(pod)
            assert [i["name"] for i in result["interfaces"]][:2] == [host_if, "eth0"]
            pod_ip = result["ips"][0]["address"].split("/")[0]
            assert "tbf" in tc_qdiscs(cni.node.netns, host_if)  # bandwidth found our host veth
            assert any(n.startswith("bwp") for n in cni.host_links())  # its ifb for egress

            async def through_host_port() -> bool:
                server = await EchoServer(pod.netns, pod_ip, 8080).start()
                try:
                    return await tcp_echo(cni.node.netns, cni.node.underlay_ip, 18080)
                finally:
                    await server.stop()

            assert asyncio.run(through_host_port())  # portmap's DNAT reaches the pod
            # Debian's portmap 1.1.1 fails CHECK on IPv4-only pods (containernetworking/plugins#819).
            chain.check(att, result, skip=frozenset({"portmap"}))
        finally:
            chain.delete(att, result)
        assert cni.leftovers(pod) == {}


# --- concurrency ------------------------------------------------------------------------------------


class TestConcurrency:
    def test_twenty_adds_at_once(self, cni: CniNode, in_process: bool) -> None:
        conf = cni.conf(in_process=in_process)
        pods = [cni.new_pod("c") for _ in range(20)]
        with ThreadPoolExecutor(20) as pool:
            adds = list(pool.map(lambda p: cni.call("ADD", conf, p), pods))
        try:
            assert all(a.ok for a in adds), [str(a) for a in adds if not a.ok]
            ips = {a.json()["ips"][0]["address"] for a in adds}
            assert len(ips) == 20
            ports = cni.owned_ports()
            assert {cni.host_if(p) for p in pods} == set(ports)
            assert {ids["ip"] for ids in ports.values()} == ips
            ofports = cni.node.ovs.vsctl("--bare", "--columns=ofport", "find", "interface", 'type=""').stdout
            assert len([x for x in ofports.split() if int(x) > 0]) >= 20  # vswitchd attached every one
        finally:
            with ThreadPoolExecutor(20) as pool:
                dels = list(pool.map(lambda p: cni.call("DEL", conf, p), pods))
            for p in pods:
                cni.bed.remove_pod(p)
        assert all(d.ok for d in dels), [str(d) for d in dels if not d.ok]
        assert cni.leftovers() == {}


# --- the entry point ----------------------------------------------------------------------------------


def _imported_modules(
    cni: CniNode, command: str, conf: dict[str, Any], pod: Any = None
) -> tuple[set[str], Any]:
    """Run the installed entry point under -X importtime; the modules it imported."""
    shim = cni.bin_dir / "k-vswitch-cni"
    python, flags = shim.read_text().splitlines()[0][2:].split(" ")
    traced = cni.bin_dir / "traced-cni"
    traced.write_text(f"#!/bin/sh\nexec {python} {flags} -X importtime {shim}\n")
    traced.chmod(0o755)
    try:
        run_ = cni.plugins.exec("traced-cni", command, conf, container_id=f"c-{pod.name}" if pod else "",
                                netns=netns_path(pod.netns) if pod else "", ifname="eth0")  # fmt: skip
    finally:
        traced.unlink()
    modules = set()
    for line in run_.stderr.decode().splitlines():
        if line.startswith("import time:") and "|" in line and "imported package" not in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "package":
                modules.add(name)
    return modules, run_


class TestEntryPoint:
    def test_imports_only_the_standard_library_on_the_fast_path(self, cni: CniNode) -> None:
        pod = cni.new_pod()
        conf = cni.conf()
        ours = {
            "kvswitch",
            "kvswitch.cni",
            "kvswitch.cni.main",
            "kvswitch.cni.client",
            "kvswitch.cni.spec",
            "kvswitch.cni.contract",
        }
        for command in ("VERSION", "ADD", "DEL"):
            modules, run_ = _imported_modules(cni, command, conf, pod)
            assert run_.ok, str(run_)
            foreign = {m for m in modules - ours if m.split(".")[0] not in sys.stdlib_module_names}
            assert not foreign, f"{command} imported {foreign}"
            assert "kvswitch.cni.main" in modules
            assert not {"json", "socket", "typing", "enum", "re", "dataclasses"} & modules
        assert cni.leftovers(pod) == {}

    def test_falls_back_in_process_when_no_server_answers(self, cni: CniNode) -> None:
        # A socket path with nothing behind it, and a stale socket file whose server died.
        stale = cni.workdir / "stale.sock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(stale))
        sock.close()
        for path in (cni.workdir / "absent.sock", stale):
            pod = cni.new_pod()
            conf = cni.conf(serverSocket=str(path))
            result = expect_ok(cni.call("ADD", conf, pod))
            assert result["interfaces"][1]["name"] == "eth0"
            expect_ok(cni.call("DEL", conf, pod))
            assert cni.leftovers(pod) == {}
        stale.unlink()

    def test_server_dying_mid_call_is_try_again_not_a_second_attempt(self, cni: CniNode) -> None:
        """A server that took the request and died: the call may be half-done there, so the
        plugin must not redo it in-process; it says "try again later" in the caller's version."""
        path = cni.workdir / "dies.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(1)

        def take_and_die() -> None:
            conn, _ = listener.accept()
            while conn.recv(65536):
                pass
            conn.close()

        pod = cni.new_pod()
        with ThreadPoolExecutor(1) as pool:
            dying = pool.submit(take_and_die)
            failed = cni.call("ADD", cni.conf(version="1.0.0", serverSocket=str(path)), pod)
            dying.result(10)
        listener.close()
        path.unlink()
        assert failed.error_code == 11 and failed.json()["cniVersion"] == "1.0.0", str(failed)
        assert cni.leftovers(pod) == {}

    def test_console_script_answers_version(self) -> None:
        script = Path(sys.executable).parent / "k-vswitch-cni"
        proc = subprocess.run(
            [str(script)],
            input=b"",
            env={**os.environ, "CNI_COMMAND": "VERSION"},
            capture_output=True,
            check=False,
        )
        assert proc.returncode == 0 and json.loads(proc.stdout)["supportedVersions"] == list(
            SUPPORTED_VERSIONS
        )


# --- the server as the agent hosts it -------------------------------------------------------------------


class TestServer:
    def test_runs_as_an_asyncio_task_and_cleans_up(self, bed: TestBed) -> None:
        bed.workdir.mkdir(parents=True, exist_ok=True)
        path = bed.workdir / "agent" / "cni.sock"

        async def scenario() -> None:
            server = CniServer(path)
            task = asyncio.create_task(server.serve_forever())
            for _ in range(200):
                if path.exists():
                    break
                await asyncio.sleep(0.01)
            assert oct(path.stat().st_mode & 0o777) == "0o600"
            reply = await asyncio.to_thread(client.call, str(path), {"CNI_COMMAND": "VERSION"}, b"")
            assert reply.code == 0 and b"supportedVersions" in reply.stdout
            reply = await asyncio.to_thread(client.call, str(path), {"CNI_COMMAND": "BOGUS"}, b"{}")
            assert reply.code == 1 and json.loads(reply.stdout)["code"] == 4
            with pytest.raises(RuntimeError, match="another CNI server"):
                await CniServer(path).start()  # a live socket is never stolen
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert not path.exists()
            # A stale socket (server killed) is replaced.
            stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            stale.bind(str(path))
            stale.close()
            async with CniServer(path) as again:
                assert again.serving
            assert not path.exists()

        asyncio.run(scenario())
        assert not find_leaks(bed.run_id).processes


def test_standalone_server_process_serves_and_stops_on_sigterm(cni: CniNode) -> None:
    """``k-vswitch-cni-server`` as its own process (until the agent hosts it)."""
    path = cni.workdir / "standalone" / "cni.sock"
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "k-vswitch-cni-server"), "--socket", str(path),
         "--host-netns", cni.node.netns, "--log-level", "warning"],
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not path.exists() and time.monotonic() < deadline and server.poll() is None:
            time.sleep(0.05)
        pod = cni.new_pod()
        conf = cni.conf(serverSocket=str(path))
        expect_ok(cni.call("STATUS", conf))  # only a server makes STATUS say "agent reachable"
        expect_ok(cni.call("ADD", conf, pod))
        expect_ok(cni.call("DEL", conf, pod))
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0
    assert not path.exists()
    assert cni.leftovers(pod) == {}


def test_an_abandoned_run_with_attachments_leaves_nothing() -> None:
    """Teardown copes with live attachments (a test that died half-way)."""
    bed = new_bed()
    try:
        node = CniNode(bed)
        pod = node.new_pod()
        expect_ok(node.call("ADD", node.conf(), pod))
        node.close()
    finally:
        teardown_run(bed.run_id)
    assert not find_leaks(bed.run_id)
