"""Malformed calls and faults in the middle of ADD: the right CNI error, and nothing left behind.

Each corpus entry is one call a runtime (or a broken configuration) could make. It must fail
with the spec's error code, print a CNI error object on stdout, exit non-zero, and leave no
veth, no OVS port and no IP reservation. Both paths (CNI server, in-process) run every entry.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from kvswitch_testbed import Pod, TestBed
from kvswitch_testbed.cni_harness import CniNode
from kvswitch_testbed.netns import run

from kvswitch.cni.spec import FAILPOINT_ENV
from tests.conftest import cni_node

Conf = dict[str, Any]


@dataclass(frozen=True)
class Case:
    code: int
    conf: Callable[[Conf], Conf | bytes] = lambda c: c
    command: str = "ADD"
    env: dict[str, str] = field(default_factory=dict)  # "" removes the variable
    says: str = ""  # must appear in msg or details
    setup: str = ""  # a named preparation, see _prepare


def drop(*keys: str) -> Callable[[Conf], Conf]:
    def f(c: Conf) -> Conf:
        for k in keys:
            c.pop(k, None)
        return c

    return f


def put(**fields: Any) -> Callable[[Conf], Conf]:
    return lambda c: {**c, **fields}


def put_key(key: str, value: Any) -> Callable[[Conf], Conf]:
    return lambda c: {**c, key: value}


def ipam(**fields: Any) -> Callable[[Conf], Conf]:
    return lambda c: {**c, "ipam": {**c["ipam"], **fields}}


def ipam_drop(key: str) -> Callable[[Conf], Conf]:
    return lambda c: {**c, "ipam": {k: v for k, v in c["ipam"].items() if k != key}}


def raw(data: bytes) -> Callable[[Conf], bytes]:
    return lambda c: data


GOOD_PREV = {
    "cniVersion": "1.1.0",
    "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/x"}],
    "ips": [{"address": "10.20.0.9/24", "interface": 0}],
}

CORPUS: list[Any] = [
    # --- 6: the bytes are not a network configuration
    pytest.param(Case(6, raw(b"")), id="empty-stdin"),
    pytest.param(Case(6, raw(b"not json")), id="not-json"),
    pytest.param(Case(6, raw(b"[1, 2]")), id="json-array"),
    pytest.param(Case(6, raw(b'"a string"')), id="json-string"),
    pytest.param(Case(6, raw(b'{"cniVersion": "1.1.0",')), id="truncated-json"),
    pytest.param(Case(6, raw(b'{"cniVersion": "1.1.0"} trailing')), id="trailing-garbage"),
    pytest.param(Case(6, raw(b'{"cniVersion": "1.1.0", "name": "\xff"}')), id="invalid-utf8"),
    pytest.param(Case(6, put(cniVersion=1.1)), id="version-not-a-string"),
    pytest.param(Case(6, put(prevResult={"ips": "all"}), command="CHECK"), id="prevresult-ips-not-list"),
    pytest.param(
        Case(6, put(prevResult={**GOOD_PREV, "ips": [{"address": "10.0.0.300/24"}]}), command="CHECK"),
        id="prevresult-bad-address",
    ),
    pytest.param(
        Case(6, put(prevResult={"ip4": {"ip": "10.0.0.1/24"}}), command="CHECK"), id="prevresult-0.2"
    ),
    # --- 1: versions
    pytest.param(Case(1, put(cniVersion="0.1.0")), id="version-0.1.0"),
    pytest.param(Case(1, put(cniVersion="0.2.0")), id="version-0.2.0"),
    pytest.param(Case(1, put(cniVersion="2.0.0")), id="version-2.0.0"),
    pytest.param(Case(1, put(cniVersion="banana")), id="version-banana"),
    pytest.param(Case(1, drop("cniVersion")), id="version-missing"),
    pytest.param(Case(1, put(cniVersion=None)), id="version-null"),
    pytest.param(
        Case(1, put(cniVersion="0.3.1", prevResult=GOOD_PREV), command="CHECK"), id="check-on-0.3.1"
    ),
    pytest.param(Case(1, put(cniVersion="1.0.0"), command="STATUS"), id="status-on-1.0.0"),
    pytest.param(
        Case(1, put(cniVersion="0.4.0", **{"cni.dev/valid-attachments": []}), command="GC"), id="gc-on-0.4.0"
    ),
    # --- 2: fields we do not know (the message names key and value)
    pytest.param(Case(2, put(foo=1), says="foo=1"), id="unknown-top-level"),
    pytest.param(Case(2, put(bridgeName="br0"), says="bridgeName"), id="unknown-bridgename"),
    pytest.param(
        Case(2, put(dns={"nameservers": [], "bogus": True}), says="dns.bogus"), id="unknown-dns-field"
    ),
    pytest.param(
        Case(
            2,
            put(**{"cni.dev/valid-attachments": [{"containerID": "a", "ifname": "e", "x": 1}]}),
            command="GC",
        ),
        id="unknown-attachment-field",
    ),
    # --- 7: invalid values
    pytest.param(Case(7, drop("name"), says="name"), id="name-missing"),
    pytest.param(Case(7, put(name="bad name")), id="name-with-space"),
    pytest.param(Case(7, put(name="")), id="name-empty"),
    pytest.param(Case(7, put(name=["list"])), id="name-not-a-string"),
    pytest.param(Case(7, drop("type")), id="type-missing"),
    pytest.param(Case(7, drop("ipam")), id="ipam-missing"),
    pytest.param(Case(7, put(ipam="host-local")), id="ipam-not-an-object"),
    pytest.param(Case(7, ipam_drop("type")), id="ipam-type-missing"),
    pytest.param(Case(7, ipam(type="../host-local")), id="ipam-type-path"),
    pytest.param(Case(7, ipam(type="no-such-ipam"), says="not found"), id="ipam-plugin-not-on-path"),
    pytest.param(Case(7, ipam_drop("subnet")), id="host-local-without-range"),
    pytest.param(Case(7, ipam(subnet="banana")), id="host-local-bad-subnet"),
    pytest.param(Case(7, ipam(ranges=[])), id="host-local-empty-ranges"),
    pytest.param(Case(7, ipam(rangeStart="10.8.0.5"), says="not in subnet"), id="host-local-start-outside"),
    pytest.param(Case(7, ipam(routes=[{"dst": "nope"}])), id="ipam-route-bad-dst"),
    pytest.param(Case(7, put(mtu="1400")), id="mtu-string"),
    pytest.param(Case(7, put(mtu=10)), id="mtu-too-small"),
    pytest.param(Case(7, put(mtu=100000)), id="mtu-too-large"),
    pytest.param(Case(7, put(mtu=True)), id="mtu-bool"),
    pytest.param(Case(7, put(bridge="")), id="bridge-empty"),
    pytest.param(Case(7, put(bridge="a-very-long-bridge-name")), id="bridge-too-long"),
    pytest.param(Case(7, put(ovsdbSocket="bogus")), id="ovsdb-remote-bogus"),
    pytest.param(Case(7, put(encapsulation="ipip")), id="encapsulation-unknown"),
    pytest.param(Case(7, put(tunnelOverhead=-1)), id="overhead-negative"),
    pytest.param(Case(7, put(macMode="sequential")), id="macmode-unknown"),
    pytest.param(Case(7, put(portTimeout=0)), id="port-timeout-zero"),
    pytest.param(Case(7, put(serverSocket=5)), id="server-socket-not-a-string"),
    pytest.param(Case(7, put(runtimeConfig={"mac": "zz:zz"})), id="runtime-mac-garbage"),
    pytest.param(Case(7, put(runtimeConfig={"mac": "01:00:5e:00:00:01"})), id="runtime-mac-multicast"),
    pytest.param(Case(7, put(dns={"nameservers": "8.8.8.8"})), id="dns-nameservers-not-list"),
    pytest.param(Case(7, put(capabilities={"mac": "yes"})), id="capabilities-not-bool"),
    pytest.param(Case(7, put(prevResult="{}"), command="CHECK"), id="prevresult-not-object"),
    pytest.param(Case(7, command="CHECK", says="prevResult"), id="check-without-prevresult"),
    pytest.param(Case(7, command="GC", says="valid-attachments"), id="gc-without-attachments"),
    pytest.param(
        Case(7, put(**{"cni.dev/valid-attachments": "all"}), command="GC"), id="gc-attachments-wrong-type"
    ),
    pytest.param(Case(7, put(underlayInterface="nosuchdev0"), says="nosuchdev0"), id="underlay-missing"),
    pytest.param(Case(7, put(mtu=None, underlayInterface="lo", tunnelOverhead=65500)), id="mtu-no-room"),
    # --- 4: the environment
    pytest.param(Case(4, env={"CNI_COMMAND": ""}, says="CNI_COMMAND"), id="command-missing"),
    pytest.param(Case(4, env={"CNI_COMMAND": "FOO"}, says="FOO"), id="command-unknown"),
    pytest.param(Case(4, env={"CNI_COMMAND": "add"}), id="command-lowercase"),
    pytest.param(Case(4, env={"CNI_CONTAINERID": ""}, says="CNI_CONTAINERID"), id="containerid-missing"),
    pytest.param(Case(4, env={"CNI_CONTAINERID": "-bad"}), id="containerid-leading-dash"),
    pytest.param(Case(4, env={"CNI_CONTAINERID": "a/b"}), id="containerid-slash"),
    pytest.param(Case(4, env={"CNI_CONTAINERID": ""}, command="DEL"), id="del-containerid-missing"),
    pytest.param(Case(4, env={"CNI_IFNAME": ""}, says="CNI_IFNAME"), id="ifname-missing"),
    pytest.param(Case(4, env={"CNI_IFNAME": "eth0123456789012"}), id="ifname-16-chars"),
    pytest.param(Case(4, env={"CNI_IFNAME": "."}), id="ifname-dot"),
    pytest.param(Case(4, env={"CNI_IFNAME": "eth/0"}), id="ifname-slash"),
    pytest.param(Case(4, env={"CNI_IFNAME": "eth 0"}), id="ifname-space"),
    pytest.param(Case(4, env={"CNI_IFNAME": "eth:0"}), id="ifname-colon"),
    pytest.param(Case(4, env={"CNI_NETNS": ""}, says="CNI_NETNS"), id="netns-missing"),
    pytest.param(Case(4, env={"CNI_NETNS": "var/run/netns/x"}), id="netns-relative"),
    pytest.param(Case(4, setup="netns-is-a-file", says="not a network namespace"), id="netns-regular-file"),
    pytest.param(Case(4, env={"CNI_ARGS": "FOO"}, says="CNI_ARGS"), id="args-no-equals"),
    pytest.param(Case(4, env={"CNI_ARGS": "FOO=1"}, says="FOO"), id="args-unknown-key"),
    pytest.param(Case(4, env={"CNI_ARGS": "IgnoreUnknown=1;a=b=c"}), id="args-double-equals"),
    pytest.param(Case(4, env={"CNI_PATH": ""}, says="CNI_PATH"), id="path-missing"),
    pytest.param(Case(4, env={"CNI_PATH": ""}, command="GC"), id="gc-path-missing"),
    pytest.param(Case(4, setup="eth0-exists", says="already exists"), id="ifname-taken-in-netns"),
    # --- 3: the container is not there
    pytest.param(Case(3, env={"CNI_NETNS": "/var/run/netns/kvs-no-such-ns"}), id="netns-nonexistent"),
    pytest.param(
        Case(
            3, put(prevResult=GOOD_PREV), command="CHECK", env={"CNI_NETNS": "/var/run/netns/kvs-no-such-ns"}
        ),
        id="check-netns-nonexistent",
    ),
    # --- 5: I/O
    pytest.param(Case(5, setup="stdin-write-only", says="stdin"), id="stdin-unreadable"),
    # --- 11: try again later
    pytest.param(
        Case(11, put(ovsdbSocket="unix:/nonexistent/db.sock"), says="ovsdb"), id="ovsdb-unreachable"
    ),
    pytest.param(Case(11, put(bridge="k-vswitch9"), says="k-vswitch9"), id="bridge-missing"),
    # --- IPAM failures (the delegate's own error, as plugin code 100)
    pytest.param(
        Case(100, setup="ipam-datadir-is-a-file", says="host-local ADD failed"), id="ipam-cannot-store"
    ),
    pytest.param(Case(100, setup="ipam-binary-broken", says="broken-ipam"), id="ipam-crashes"),
]


def _corpus_files(node: CniNode) -> None:
    """Inputs the corpus points at: files that are not namespaces, and a broken IPAM binary."""
    (node.workdir / "not-a-netns").write_text("")
    (node.workdir / "a-file").write_text("")
    extra = node.workdir / "extra-bin"
    extra.mkdir()
    os.symlink("/bin/false", extra / "broken-ipam")


@pytest.fixture(scope="module")
def cni() -> Iterator[CniNode]:
    with cni_node(_corpus_files) as node:
        yield node


@pytest.fixture(params=["server", "in-process"])
def in_process(request: pytest.FixtureRequest) -> bool:
    return bool(request.param == "in-process")


def _prepare(cni: CniNode, case: Case, pod: Pod, conf: Conf, env: dict[str, str]) -> tuple[Conf, int | None]:
    stdin_fd = None
    if case.setup == "netns-is-a-file":
        env["CNI_NETNS"] = str(cni.workdir / "not-a-netns")
    elif case.setup == "eth0-exists":
        run(["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"], pod.netns)
    elif case.setup == "stdin-write-only":
        stdin_fd = os.open(cni.workdir / "a-file", os.O_WRONLY)
    elif case.setup == "ipam-datadir-is-a-file":
        conf = {**conf, "ipam": {**conf["ipam"], "dataDir": str(cni.workdir / "a-file")}}
    elif case.setup == "ipam-binary-broken":
        conf = {**conf, "ipam": {**conf["ipam"], "type": "broken-ipam"}}
        env["CNI_PATH"] = f"{cni.bin_dir}:{cni.workdir / 'extra-bin'}:/usr/lib/cni"
    return conf, stdin_fd


@pytest.mark.parametrize("case", CORPUS)
def test_malformed_call_fails_cleanly(cni: CniNode, case: Case, in_process: bool) -> None:
    pod = cni.new_pod("m")
    env = dict(case.env)
    conf, stdin_fd = _prepare(cni, case, pod, cni.conf(in_process=in_process), env)
    data = case.conf(copy.deepcopy(conf))
    try:
        result = cni.call(case.command, data, pod, env=env, stdin_fd=stdin_fd)
    finally:
        if stdin_fd is not None:
            os.close(stdin_fd)
    assert result.code != 0, str(result)
    err = result.json()
    assert set(err) <= {"cniVersion", "code", "msg", "details"} and err["msg"], err
    assert err["code"] == case.code, str(result)
    assert case.says in err["msg"] + err.get("details", ""), err
    # Nothing left: no veth, no port, no reservation; the pod keeps only what it had.
    expected_pod_links = ["eth0", "eth0p", "lo"] if case.setup == "eth0-exists" else ["lo"]
    assert cni.pod_links(pod) == expected_pod_links
    assert cni.leftovers() == {}
    cni.bed.remove_pod(pod)


def test_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 50
    assert len({p.id for p in CORPUS}) == len(CORPUS)


# --- faults in the middle of ADD -----------------------------------------------------------------


@pytest.mark.parametrize("stage", ["ipam", "veth", "port", "pod", "result"])
def test_injected_fault_rolls_back_every_step(cni: CniNode, stage: str, in_process: bool) -> None:
    """Fail right after each step (the others may be half-way: they run concurrently)."""
    pod = cni.new_pod("f")
    conf = cni.conf(in_process=in_process)
    failed = cni.call("ADD", conf, pod, env={FAILPOINT_ENV: stage})
    assert failed.error_code == 110 and stage in failed.json()["msg"], str(failed)
    assert cni.leftovers(pod) == {}
    # The attachment can be made afterwards, as if nothing had happened.
    assert cni.call("ADD", conf, pod).ok
    assert cni.call("DEL", conf, pod).ok
    assert cni.leftovers(pod) == {}


def test_ipam_exhausted_after_the_veth_exists(cni: CniNode, in_process: bool) -> None:
    """A /30 has one address for pods: the second ADD's veth is made while IPAM fails."""
    conf = cni.conf(in_process=in_process, ipam={**cni.conf()["ipam"], "subnet": "10.21.0.0/30"})
    first, second = cni.new_pod("x"), cni.new_pod("x")
    assert cni.call("ADD", conf, first).ok
    try:
        failed = cni.call("ADD", conf, second)
        assert failed.error_code == 100 and "no IP addresses available" in failed.json()["msg"], str(failed)
        assert cni.pod_links(second) == ["lo"]
        assert set(cni.owned_ports()) == {cni.host_if(first)}
        assert list(cni.reserved_ips().values()) == [f"c-{first.name}/eth0"]
    finally:
        assert cni.call("DEL", conf, first).ok
    assert cni.leftovers(first, second) == {}


def test_kernel_refuses_a_route_while_the_port_is_being_added(cni: CniNode, in_process: bool) -> None:
    routes = [{"dst": "10.99.0.0/16", "gw": "10.20.0.5"}, {"dst": "10.99.0.0/16", "gw": "10.20.0.6"}]
    conf = cni.conf(in_process=in_process, ipam={**cni.conf()["ipam"], "routes": routes})
    pod = cni.new_pod("r")
    failed = cni.call("ADD", conf, pod)
    assert failed.error_code == 102 and "File exists" in failed.json()["details"], str(failed)
    assert cni.leftovers(pod) == {}


def test_vswitchd_down_ovs_never_attaches_the_port(bed: TestBed) -> None:
    """ovsdb takes the port but no vswitchd numbers it: try again later, and nothing stays."""
    node = CniNode(bed)
    try:
        pod = node.new_pod()
        node.node.ovs.kill_vswitchd()
        for in_process in (False, True):
            conf = node.conf(in_process=in_process, portTimeout=0.5)
            failed = node.call("ADD", conf, pod)
            assert failed.error_code == 11 and "ofport" in failed.json()["details"], str(failed)
            assert node.leftovers(pod) == {}
        node.node.ovs.start_vswitchd()
        node.add_bridge()  # vswitchd restarted: the flow and the gateway address are new again
        conf = node.conf()
        assert node.call("ADD", conf, pod).ok
        assert node.call("DEL", conf, pod).ok
        assert node.leftovers(pod) == {}
    finally:
        node.close()


def test_failed_add_then_del_is_still_success(cni: CniNode, in_process: bool) -> None:
    """The runtime DELs after a failed ADD; that must succeed whatever ADD left (nothing)."""
    pod = cni.new_pod("d")
    conf = cni.conf(in_process=in_process)
    assert cni.call("ADD", conf, pod, env={FAILPOINT_ENV: "port"}).error_code == 110
    for _ in range(2):
        assert cni.call("DEL", conf, pod).ok
    assert cni.leftovers(pod) == {}
