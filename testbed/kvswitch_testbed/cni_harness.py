"""A test-bed node made ready for k-vswitch-cni: shared by the CNI tests and ``bench/cni.py``.

The node gets ``k-vswitch0`` (userspace datapath, one NORMAL flow, the pod gateway on its
internal port), the plugin installed as the runtime would find it, a per-run host-local data
directory, and optionally the CNI server hosted on a thread of this process.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

from kvswitch.cni.contract import (
    DEFAULT_BRIDGE,
    HOST_IF_PREFIX,
    ID_OWNER,
    LINK_ALIAS_PREFIX,
    PLUGIN_NAME,
    host_ifname,
)
from kvswitch.cni.install import install
from kvswitch.cni.netlink import Netns, open_rtnl
from kvswitch.cni.server import CniServer, ServerThread
from kvswitch_testbed import Node, Pod, TestBed
from kvswitch_testbed.cni_runner import Attachment, PluginRun, Plugins, netns_path
from kvswitch_testbed.netns import run

CNI_BIN = "/usr/lib/cni"
SUBNET = "10.20.0.0/24"
GATEWAY = "10.20.0.1"
NETWORK = "kvs-test"


class CniNode:
    """One node of ``bed`` wired for CNI calls; :meth:`close` stops the server (the bed the rest)."""

    def __init__(self, bed: TestBed, node: Node | None = None, *, server: bool = True) -> None:
        self.bed = bed
        self.node = node or bed.add_node()
        self.workdir = bed.workdir / f"cni-{self.node.name}"
        self.bin_dir = self.workdir / "bin"
        self.ipam_dir = self.workdir / "ipam"
        self.socket = self.workdir / "cni.sock"
        install(self.bin_dir)
        self.plugins = Plugins([str(self.bin_dir), CNI_BIN], netns=self.node.netns)
        self.server: ServerThread | None = None
        self._pods = 0
        self.add_bridge()
        if server:
            self.start_server()

    # --- node -------------------------------------------------------------------------------

    def add_bridge(self) -> None:
        ovs = self.node.ovs
        ovs.vsctl(
            "--may-exist", "add-br", DEFAULT_BRIDGE, "--", "set", "bridge", DEFAULT_BRIDGE,
            "datapath_type=netdev", "fail_mode=secure",
        )  # fmt: skip
        ovs.wait_bridge(DEFAULT_BRIDGE)
        ovs.ofctl("add-flow", DEFAULT_BRIDGE, "actions=NORMAL")
        run(["ip", "addr", "replace", f"{GATEWAY}/24", "dev", DEFAULT_BRIDGE], self.node.netns)
        run(["ip", "link", "set", DEFAULT_BRIDGE, "up"], self.node.netns)

    def delete_bridge(self) -> None:
        self.node.ovs.vsctl("--if-exists", "del-br", DEFAULT_BRIDGE)

    def start_server(self, *, defer_veth_delete: bool = True) -> None:
        self.stop_server()
        server = CniServer(
            self.socket, host_netns=netns_path(self.node.netns), defer_veth_delete=defer_veth_delete
        )
        self.server = ServerThread(server).start()

    def stop_server(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def settle(self) -> None:
        """Let the server finish work it does after answering (deferred veth deletions)."""
        if self.server is not None:
            self.server.drain()

    def close(self) -> None:
        self.stop_server()

    # --- calls ------------------------------------------------------------------------------

    def conf(self, *, in_process: bool = False, version: str = "1.1.0", **fields: Any) -> dict[str, Any]:
        """The plugin's netconf; ``in_process`` sets serverSocket "" (never ask the server)."""
        conf: dict[str, Any] = {
            "cniVersion": version,
            "name": NETWORK,
            "type": PLUGIN_NAME,
            "ovsdbSocket": self.node.ovs.db_remote,
            "serverSocket": "" if in_process else str(self.socket),
            "underlayInterface": "br-phy",
            "ipam": {"type": "host-local", "subnet": SUBNET, "dataDir": str(self.ipam_dir)},
        }
        conf.update(fields)
        return conf

    def new_pod(self, prefix: str = "p") -> Pod:
        self._pods += 1
        return self.bed.add_pod(self.node, f"{prefix}{self._pods}")

    def call(
        self,
        command: str,
        conf: dict[str, Any] | bytes,
        pod: Pod | None = None,
        *,
        container_id: str | None = None,
        ifname: str = "eth0",
        netns: str | None = None,
        args: str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=test;K8S_POD_UID=u-1",
        env: dict[str, str] | None = None,
        stdin_fd: int | None = None,
    ) -> PluginRun:
        if netns is None:
            netns = netns_path(pod.netns) if pod is not None else ""
        if container_id is None:
            container_id = f"c-{pod.name}" if pod is not None else ""
        return self.plugins.exec(
            PLUGIN_NAME, command, conf,
            container_id=container_id, netns=netns, ifname=ifname, args=args, env=env, stdin_fd=stdin_fd,
        )  # fmt: skip

    def attachment(self, pod: Pod, ifname: str = "eth0", **capability_args: Any) -> Attachment:
        return Attachment(
            container_id=f"c-{pod.name}",
            netns=netns_path(pod.netns),
            ifname=ifname,
            args="IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=" + pod.name,
            capability_args=capability_args,
        )

    # --- what exists --------------------------------------------------------------------------

    def host_links(self) -> list[str]:
        """Host interfaces the plugin (or a chained plugin: bandwidth's ifb) could have left."""
        with Netns(netns_path(self.node.netns)) as ns, open_rtnl(ns.fd) as rtnl:
            return sorted(
                link.name
                for link in rtnl.links()
                if link.name.startswith((HOST_IF_PREFIX, "bwp")) or link.alias.startswith(LINK_ALIAS_PREFIX)
            )

    def owned_ports(self) -> dict[str, dict[str, str]]:
        out = self.node.ovs.vsctl(
            "--format=json",
            "--columns=name,external_ids",
            "find",
            "port",
            f"external_ids:{ID_OWNER}={PLUGIN_NAME}",
        ).stdout
        rows = json.loads(out)["data"]
        return {row[0]: dict(row[1][1]) for row in rows}

    def reserved_ips(self) -> dict[str, str]:
        """host-local's reservations: IP -> "containerID/ifname"."""
        net = self.ipam_dir / NETWORK
        if not net.is_dir():
            return {}
        out = {}
        for f in net.iterdir():
            if f.name[0].isdigit() or ":" in f.name:
                cid, _, ifname = f.read_text().strip().partition("\n")
                out[f.name] = f"{cid.strip()}/{ifname.strip()}"
        return out

    def pod_links(self, pod: Pod) -> list[str]:
        with Netns(netns_path(pod.netns)) as ns, open_rtnl(ns.fd) as rtnl:
            return sorted(link.name for link in rtnl.links())

    def leftovers(self, *pods: Pod) -> dict[str, Any]:
        """Everything an attachment leaves behind; empty when nothing is left (after settling)."""
        self.settle()
        found: dict[str, Any] = {
            "links": self.host_links(),
            "ports": sorted(self.owned_ports()),
            "ips": self.reserved_ips(),
        }
        for pod in pods:
            extra = [n for n in self.pod_links(pod) if n != "lo"]
            if extra:
                found[f"pod {pod.name}"] = extra
        return {k: v for k, v in found.items() if v}

    def host_if(self, pod: Pod, ifname: str = "eth0") -> str:
        return host_ifname(NETWORK, f"c-{pod.name}", ifname)


def tc_qdiscs(netns: str, dev: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", netns, "tc", "qdisc", "show", "dev", dev],
        capture_output=True, text=True, check=False,
    ).stdout  # fmt: skip
