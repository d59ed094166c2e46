"""sFlow and IPFIX export of pod traffic, configured in VSwitchConfig spec.telemetry: a 2-node
cluster (real daemons, real OVS) exports to real collectors from Debian's packages, sfcapd
(nfdump-sflow) and nfcapd (nfdump), running on the external host of the underlay; the records they
store, read back with nfdump, must hold the pods' own traffic. Bad settings are refused by the API
(the CRD) and by the agent's model alike, and leave the datapath as it was."""

from __future__ import annotations

import functools
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kvswitch_testbed import TestBed
from kvswitch_testbed.cluster import EXTERNAL_IP, Cluster, ClusterPod
from kvswitch_testbed.kubeclient import ApiError
from kvswitch_testbed.netns import in_netns
from kvswitch_testbed.probes import LoopThread, ping

from kvswitch.config import ControllerSettings, InvalidConfig, parse_spec
from kvswitch.handlers.controller import desired_spec, spec_patch
from kvswitch.ovs.ovsdb import EnsureBridge, Ovsdb, SetIpfix, SetSflow
from tests.conftest import register_run
from tests.test_chart import CRDS, load_yaml

SFLOW_PORT, IPFIX_PORT = 6343, 4739
SFLOW = f"{EXTERNAL_IP}:{SFLOW_PORT}"
IPFIX = f"{EXTERNAL_IP}:{IPFIX_PORT}"


class Collector:
    """sfcapd or nfcapd in the external host's namespace, writing into ``workdir``."""

    def __init__(self, binary: str, netns: str, port: int, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        cmd = [binary, "-b", EXTERNAL_IP, "-p", str(port), "-w", str(workdir), "-t", "3600"]
        self.proc = subprocess.Popen(
            in_netns(cmd, netns), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )

    def stop(self) -> None:
        """SIGTERM: the collector writes out what it holds and closes its file."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def records(self) -> list[tuple[str, str, str]]:
        """(protocol, source address, destination address) of every stored flow record."""
        files = sorted(p for p in self.workdir.rglob("nfcapd.*") if p.is_file())
        out = []
        for f in files:
            proc = subprocess.run(
                ["nfdump", "-q", "-r", str(f), "-o", "fmt:%pr|%sa|%da"],
                capture_output=True, text=True, timeout=30, check=True,
            )  # fmt: skip
            for line in proc.stdout.splitlines():
                parts = [p.strip() for p in line.split("|")]
                if len(parts) == 3:
                    out.append((parts[0], parts[1], parts[2]))
        return out


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    for tool in ("sfcapd", "nfcapd", "nfdump"):
        assert shutil.which(tool), f"{tool} missing: make setup installs nfdump and nfdump-sflow"
    c = Cluster(nodes=2, overlay="vxlan")
    register_run(c.bed.run_id)
    # The controller's cluster-wide default (the chart's telemetry.* values reach it the same way,
    # through its ConfigMap): the processes inherit this environment.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("KVSWITCH_SFLOW_COLLECTOR", SFLOW)
        env.setenv("KVSWITCH_SFLOW_SAMPLING", "32")
        c.start()
    try:
        for node in c.bed.nodes.values():
            c.add_pod(node, f"{node.name}-p0")
        yield c
    finally:
        c.stop()


def set_telemetry(c: Cluster, telemetry: dict[str, object] | None) -> None:
    """Replace spec.telemetry on every node (a merge patch would merge into what is there)."""
    gens = {n: c.edit_vswitchconfig(n, {"telemetry": None}) for n in c.bed.nodes}
    if telemetry is not None:
        gens = {n: c.edit_vswitchconfig(n, {"telemetry": telemetry}) for n in c.bed.nodes}
    for name, gen in gens.items():
        try:
            c.client.wait_for(f"{name} Ready at {gen}", functools.partial(c.ready, name, gen), 30)
        except TimeoutError:
            raise AssertionError(f"{name} not Ready at generation {gen}:\n{c.tail_logs()}") from None


def exporters(c: Cluster, node: str) -> dict[str, dict[str, str]]:
    """The bridge's sFlow and IPFIX rows as ovs-vsctl shows them ({} when none)."""
    ovs = c.bed.nodes[node].ovs
    out: dict[str, dict[str, str]] = {}
    for table, column in (("sflow", "sflow"), ("ipfix", "ipfix")):
        ref = ovs.vsctl("get", "bridge", "k-vswitch0", column).stdout.strip()
        if ref in ("[]", ""):
            continue
        text = ovs.vsctl("list", table, ref).stdout
        out[table] = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in text.splitlines())}
    return out


def traffic(c: Cluster, a: ClusterPod, b: ClusterPod) -> None:
    with LoopThread() as loop:
        assert loop.run(ping(a.netns, b.ip, count=40, interval=0.05))
        assert loop.run(ping(b.netns, a.ip, count=40, interval=0.05))


def test_the_controllers_default_reaches_every_node(cluster: Cluster) -> None:
    for node in cluster.bed.nodes:
        assert (cluster.vswitchconfig(node) or {})["spec"]["telemetry"] == {
            "sflow": {"collector": SFLOW, "sampling": 32}
        }
        ex = exporters(cluster, node)
        assert set(ex) == {"sflow"} and ex["sflow"]["sampling"] == "32", ex


def test_a_nodes_own_telemetry_wins_over_the_controllers() -> None:
    settings = ControllerSettings.model_validate(
        {"telemetry": {"sflow": {"collector": SFLOW, "sampling": 32}}}
    )
    node = {"metadata": {"name": "n1", "uid": "u1"}, "spec": {"podCIDR": "10.244.1.0/24"},
            "status": {"addresses": [{"type": "InternalIP", "address": "10.250.0.11"}]}}  # fmt: skip
    desired = desired_spec(node, settings)
    assert desired["telemetry"] == {"sflow": {"collector": SFLOW, "sampling": 32}}
    assert parse_spec(desired).telemetry == settings.telemetry
    edited = {**desired, "telemetry": {"ipfix": {"collector": IPFIX}}}  # kubectl edit vsc n1
    patch, owned = spec_patch(edited, desired, desired)
    assert "telemetry" not in patch and owned["telemetry"] == desired["telemetry"]
    removed = {k: v for k, v in desired.items() if k != "telemetry"}  # the user removed it
    patch, _ = spec_patch(removed, desired, desired)
    assert "telemetry" not in patch
    # the default dropped from the chart: the controller takes back what it wrote, nothing else
    patch, _ = spec_patch(desired, desired, desired_spec(node, ControllerSettings()))
    assert patch == {"telemetry": None}


def test_sflow_and_ipfix_collectors_receive_pod_traffic(cluster: Cluster, tmp_path: Path) -> None:
    a, b = cluster.pods[("default", "node1-p0")], cluster.pods[("default", "node2-p0")]
    sflow = Collector("sfcapd", cluster.external_ns, SFLOW_PORT, tmp_path / "sflow")
    ipfix = Collector("nfcapd", cluster.external_ns, IPFIX_PORT, tmp_path / "ipfix")
    try:
        set_telemetry(cluster, {
            "sflow": {"collector": SFLOW, "sampling": 1, "polling": 1},
            "ipfix": {"collector": IPFIX, "sampling": 1, "cacheActiveTimeout": 1},
        })  # fmt: skip
        for node in cluster.bed.nodes:
            ex = exporters(cluster, node)
            assert ex["sflow"]["targets"] == f'["{SFLOW}"]' and ex["sflow"]["sampling"] == "1"
            assert ex["ipfix"]["targets"] == f'["{IPFIX}"]' and ex["ipfix"]["cache_active_timeout"] == "1"
        traffic(cluster, a, b)
        time.sleep(3)  # IPFIX reports each flow after cacheActiveTimeout; sFlow polls every second
    finally:
        sflow.stop()
        ipfix.stop()
    pods = {a.ip, b.ip}
    sampled = [r for r in sflow.records() if {r[1], r[2]} == pods]
    assert sampled, f"sfcapd stored no sample of {a.ip} <-> {b.ip}: {sflow.records()[:10]}"
    assert all(r[0] == "ICMP" for r in sampled)
    exported = [r for r in ipfix.records() if {r[1], r[2]} == pods]
    assert exported, f"nfcapd stored no IPFIX record of {a.ip} <-> {b.ip}: {ipfix.records()[:10]}"
    # both directions, seen on both nodes' bridges
    assert {(r[1], r[2]) for r in exported} == {(a.ip, b.ip), (b.ip, a.ip)}


def test_removing_telemetry_removes_the_exporters(cluster: Cluster) -> None:
    set_telemetry(cluster, {"sflow": {"collector": SFLOW}})
    assert set(exporters(cluster, "node1")) == {"sflow"}
    assert exporters(cluster, "node1")["sflow"]["sampling"] == "64"  # the default
    set_telemetry(cluster, None)
    for node in cluster.bed.nodes:
        assert exporters(cluster, node) == {}


@pytest.mark.parametrize(
    ("telemetry", "field"),
    [
        ({"sflow": {"collector": EXTERNAL_IP}}, "spec.telemetry.sflow.collector"),
        ({"ipfix": {"collector": IPFIX, "sampling": 0}}, "spec.telemetry.ipfix.sampling"),
        ({"sflow": {"collector": SFLOW, "header": 1000}}, "spec.telemetry.sflow.header"),
    ],
)
def test_bad_settings_are_refused_and_change_nothing(
    cluster: Cluster, telemetry: dict[str, object], field: str
) -> None:
    set_telemetry(cluster, {"ipfix": {"collector": IPFIX}})
    before = exporters(cluster, "node1")
    with pytest.raises(ApiError) as refused:
        cluster.edit_vswitchconfig("node1", {"telemetry": telemetry})
    assert refused.value.status == 422 and field in str(refused.value)
    spec = (cluster.vswitchconfig("node1") or {})["spec"]
    assert spec["telemetry"] == {"ipfix": {"collector": IPFIX}}
    with pytest.raises(InvalidConfig, match=field.removeprefix("spec.")):
        parse_spec({**spec, "telemetry": telemetry})  # the agent refuses it too, had it come through
    time.sleep(0.5)
    assert exporters(cluster, "node1") == before
    assert cluster.ready("node1")
    set_telemetry(cluster, None)


def test_the_sample_with_telemetry_round_trips_through_the_model() -> None:
    spec = load_yaml(CRDS / "samples" / "valid" / "node-d-telemetry.yaml")["spec"]
    assert parse_spec(spec).to_api() == spec


def test_exporters_on_a_bridge_made_in_the_same_transaction(bed: TestBed) -> None:
    """The agent rebuilds a deleted bridge, its ports and its exporters in one transaction."""
    node = bed.add_node()
    db = Ovsdb(node.ovs.db_remote)
    try:
        for _ in range(2):  # created, then found
            db.execute(EnsureBridge("br-tel", datapath_type="netdev"), SetSflow("br-tel", (SFLOW,), 8),
                       SetIpfix("br-tel"))  # fmt: skip
            sflow = node.ovs.vsctl("get", "bridge", "br-tel", "sflow").stdout.strip()
            assert node.ovs.vsctl("get", "sflow", sflow, "sampling").stdout.strip() == "8"
            assert node.ovs.vsctl("get", "bridge", "br-tel", "ipfix").stdout.strip() == "[]"
        db.execute(SetSflow("br-tel"))
        assert node.ovs.vsctl("get", "bridge", "br-tel", "sflow").stdout.strip() == "[]"
        assert node.ovs.vsctl("list", "sflow").stdout.strip() == ""  # not a root table: gone
    finally:
        db.close()
