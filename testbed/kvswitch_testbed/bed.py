"""Simulated nodes and pods: every node is a network namespace running its own Open vSwitch.

Topology::

    underlay ns  [ Linux bridge ul0 ] --veth-- node ns [ eth0 -> OVS br-phy (underlay IP) ]
                                                        [ pods: one netns each, veth into the node ns ]

Every name carries the run id, so two runs on one machine never collide; interfaces are created
directly inside their namespaces, so nothing of a run lives in the root namespace.
"""

from __future__ import annotations

import contextlib
import ipaddress
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from kvswitch.config import AgentSettings
from kvswitch_testbed.netns import create_netns, delete_netns, list_netns, run, sysctl
from kvswitch_testbed.ovsproc import OvsInstance

RUN_PREFIX = "kvs-"
RUN_ROOT = Path("/run")
UNDERLAY = ipaddress.IPv4Network("10.250.0.0/24")
UNDERLAY_BRIDGE = "ul0"
PHYS_BRIDGE = "br-phy"


def new_run_id() -> str:
    return secrets.token_hex(3)


def run_workdir(run_id: str) -> Path:
    return RUN_ROOT / f"{RUN_PREFIX}{run_id}"


def mac_for(kind: int, index: int) -> str:
    """A locally administered unicast MAC that is stable for (kind, index)."""
    return f"02:6b:{kind:02x}:{(index >> 16) & 0xFF:02x}:{(index >> 8) & 0xFF:02x}:{index & 0xFF:02x}"


@dataclass
class Pod:
    name: str
    netns: str
    node: Node
    ip: str | None = None
    ifname: str = "eth0"


@dataclass
class Node:
    name: str
    index: int
    netns: str
    underlay_ip: str
    underlay_mac: str
    ovs: OvsInstance
    pods: dict[str, Pod] = field(default_factory=dict)


class TestBed:
    """Start and stop nodes and pods for one run; :meth:`teardown` removes everything it made."""

    __test__ = False  # not a pytest test class

    def __init__(self, run_id: str | None = None) -> None:
        self.run_id = run_id or new_run_id()
        self.prefix = f"{RUN_PREFIX}{self.run_id}"
        self.workdir = run_workdir(self.run_id)
        self.underlay_ns = f"{self.prefix}-ul"
        self.nodes: dict[str, Node] = {}
        self._underlay_up = False

    # --- underlay -------------------------------------------------------------------------

    def _ensure_underlay(self) -> None:
        if self._underlay_up:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        create_netns(self.underlay_ns)
        sysctl(self.underlay_ns, "net.ipv6.conf.all.disable_ipv6", "1")
        run(["ip", "link", "add", UNDERLAY_BRIDGE, "type", "bridge"], self.underlay_ns)
        run(["ip", "link", "set", UNDERLAY_BRIDGE, "up"], self.underlay_ns)
        self._underlay_up = True

    def underlay_ip(self, index: int) -> str:
        return str(UNDERLAY.network_address + 10 + index)

    # --- nodes ----------------------------------------------------------------------------

    def add_node(self, name: str | None = None) -> Node:
        self._ensure_underlay()
        index = len(self.nodes) + 1
        name = name or f"node{index}"
        ns = f"{self.prefix}-{name}"
        node = Node(
            name=name,
            index=index,
            netns=ns,
            underlay_ip=self.underlay_ip(index),
            underlay_mac=mac_for(0xFE, index),
            ovs=OvsInstance(self.workdir / name, ns),
        )
        self.nodes[name] = node
        create_netns(ns)
        sysctl(ns, "net.ipv6.conf.all.disable_ipv6", "1")
        sysctl(ns, "net.ipv6.conf.default.disable_ipv6", "1")
        sysctl(ns, "net.ipv4.ip_forward", "1")
        uplink = f"up-{name}"[:15]
        run(
            ["ip", "link", "add", uplink, "type", "veth", "peer", "name", "eth0", "netns", ns],
            self.underlay_ns,
        )
        run(["ip", "link", "set", uplink, "master", UNDERLAY_BRIDGE, "up"], self.underlay_ns)
        # Packets the underlay sends into OVS (AF_PACKET on eth0) must carry real checksums.
        run(["ethtool", "-K", uplink, "tx", "off"], self.underlay_ns)
        # The kernel must not answer ARP on the veth OVS owns: OVS would learn the wrong MAC.
        run(["ip", "link", "set", "eth0", "arp", "off", "up"], ns)
        node.ovs.start()
        node.ovs.vsctl(
            "--may-exist",
            "add-br",
            PHYS_BRIDGE,
            "--",
            "set",
            "bridge",
            PHYS_BRIDGE,
            "datapath_type=netdev",
            f"other-config:hwaddr={node.underlay_mac}",
            "--",
            "--may-exist",
            "add-port",
            PHYS_BRIDGE,
            "eth0",
        )
        node.ovs.wait_bridge(PHYS_BRIDGE)
        run(["ip", "addr", "replace", f"{node.underlay_ip}/{UNDERLAY.prefixlen}", "dev", PHYS_BRIDGE], ns)
        run(["ip", "link", "set", PHYS_BRIDGE, "up"], ns)
        return node

    def add_nodes(self, count: int) -> list[Node]:
        return [self.add_node() for _ in range(count)]

    def seed_tunnel_neighbours(self) -> None:
        """Tell every node's tunnel code each peer's MAC, so no first packet is lost to resolution."""
        for node in self.nodes.values():
            for peer in self.nodes.values():
                if peer is not node:
                    node.ovs.appctl("tnl/neigh/set", PHYS_BRIDGE, peer.underlay_ip, peer.underlay_mac)

    def add_external_host(self, name: str = "ext", index: int = 200) -> tuple[str, str]:
        """A host on the underlay outside the cluster: (netns, IP). Pods reach it through SNAT."""
        self._ensure_underlay()
        ns = f"{self.prefix}-{name}"
        ip = str(UNDERLAY.network_address + index)
        create_netns(ns)
        sysctl(ns, "net.ipv6.conf.all.disable_ipv6", "1")
        uplink = f"up-{name}"[:15]
        veth = ["ip", "link", "add", uplink, "type", "veth", "peer", "name", "eth0", "netns", ns]
        run(veth, self.underlay_ns)
        run(["ip", "link", "set", uplink, "master", UNDERLAY_BRIDGE, "up"], self.underlay_ns)
        run(["ethtool", "-K", uplink, "tx", "off"], self.underlay_ns)
        run(["ip", "addr", "add", f"{ip}/{UNDERLAY.prefixlen}", "dev", "eth0"], ns)
        run(["ip", "link", "set", "eth0", "up"], ns)
        run(["ethtool", "-K", "eth0", "tx", "off"], ns)
        return ns, ip

    # --- pods -----------------------------------------------------------------------------

    def pod_netns(self, pod_name: str) -> str:
        return f"{self.prefix}-p-{pod_name}"

    def add_pod(self, node: Node, name: str) -> Pod:
        """Create the pod's namespace only; wiring it is the CNI plugin's job (or :meth:`plug`)."""
        pod = Pod(name=name, netns=self.pod_netns(name), node=node)
        create_netns(pod.netns)
        sysctl(pod.netns, "net.ipv6.conf.all.disable_ipv6", "1")
        node.pods[name] = pod
        return pod

    def plug(self, pod: Pod, bridge: str, cidr: str, mac: str | None = None) -> None:
        """Wire a pod straight into ``bridge`` without a CNI plugin (baseline and test-bed tests)."""
        node = pod.node
        host_if = f"v-{pod.name}"[:15]
        run(
            ["ip", "link", "add", host_if, "type", "veth", "peer", "name", pod.ifname, "netns", pod.netns],
            node.netns,
        )
        run(["ip", "link", "set", host_if, "up"], node.netns)
        if mac:
            run(["ip", "link", "set", pod.ifname, "address", mac], pod.netns)
        run(["ip", "addr", "add", cidr, "dev", pod.ifname], pod.netns)
        run(["ip", "link", "set", pod.ifname, "up"], pod.netns)
        # Userspace OVS does not fill in checksums the veth left to "hardware".
        run(["ethtool", "-K", pod.ifname, "tx", "off"], pod.netns)
        node.ovs.vsctl("--may-exist", "add-port", bridge, host_if)
        pod.ip = cidr.split("/")[0]

    def remove_pod(self, pod: Pod) -> None:
        delete_netns(pod.netns)
        pod.node.pods.pop(pod.name, None)

    # --- teardown -------------------------------------------------------------------------

    def teardown(self) -> None:
        """Remove everything of this run, also what a crashed earlier step left half-made."""
        teardown_run(self.run_id, [n.ovs for n in self.nodes.values()])
        self.nodes.clear()
        self._underlay_up = False

    def __enter__(self) -> TestBed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()


def agent_settings(node: Node, workdir: Path, **extra: object) -> AgentSettings:
    """An in-process agent for ``node`` (userspace datapath, its own OVS, CNI files under ``workdir``)."""
    return AgentSettings.model_validate(
        {
            "node_name": node.name,
            "ovsdb": node.ovs.db_remote,
            "ovs_rundir": str(node.ovs.workdir),
            "datapath_type": "netdev",
            "host_netns": node.netns,
            "cni_conf_dir": str(workdir / "net.d"),
            "cni_bin_dir": str(workdir / "cni-bin"),
            "cni_socket": str(workdir / "cni.sock"),
            "ipam_data_dir": str(workdir / "ipam"),
            "audit_log": str(workdir / "np.log"),
            "inputs_cache": str(workdir / "policy-inputs.cache"),
            **extra,
        }
    )


def teardown_run(run_id: str, instances: list[OvsInstance] | None = None) -> None:
    """Stop every OVS instance under the run's workdir and delete the run's namespaces."""
    workdir = run_workdir(run_id)
    found = list(instances or [])
    if workdir.is_dir():
        known = {i.workdir for i in found}
        found += [OvsInstance(d) for d in workdir.iterdir() if d.is_dir() and d not in known]
    for inst in found:
        with contextlib.suppress(Exception):
            inst.stop()
    prefix = f"{RUN_PREFIX}{run_id}-"
    for ns in list_netns():
        if ns.startswith(prefix):
            delete_netns(ns)
    shutil.rmtree(workdir, ignore_errors=True)
