"""Where kvswitchctl finds things: each node's Open vSwitch and the Kubernetes API.

Three ways to say which nodes' OVS this invocation can reach:

* on a real node (the default): the local OVS only (``/var/run/openvswitch``, or ``--ovs-rundir`` /
  ``OVS_RUNDIR``); the node's name is ``--node``, ``NODE_NAME`` or the host name;
* ``--node-rundir NODE=DIR`` (repeatable): node NODE's OVS has its sockets in DIR
  (``DIR/db.sock``, ``DIR/ovs-vswitchd.ctl``, ``DIR/<bridge>.mgmt``);
* ``--sandbox RUNID``: a sandbox or test-bed run (``kvswitchctl sandbox``): every node directory
  under ``/run/kvs-RUNID/`` holding an ``ovs-vswitchd.ctl``, and the API of its
  ``kubeconfig.local``.

The API comes from ``--kubeconfig``, else in-cluster credentials, else ``KUBECONFIG``/~/.kube/config.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import socket
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvswitch.cni.contract import (
    DEFAULT_BRIDGE,
    DEFAULT_OVSDB_SOCKET,
    ID_IP,
    ID_MAC,
    ID_OWNER,
    ID_POD_NAME,
    ID_POD_NAMESPACE,
    PLUGIN_NAME,
)
from kvswitch.config import GROUP, PLURAL, VERSION, InvalidConfig, VSwitchConfigSpec, parse_spec
from kvswitch.ovs.ovsdb import Ovsdb, OvsdbError, PortInfo
from kvswitch.ovs.pipeline import OWNER_MASK, Category, cookie_category, owner_hash
from kvswitch.policy.compute import PolicyState
from kvswitch.policy.model import NamespaceInfo, PodInfo, Policy

SANDBOX_ROOT = Path("/run")
SANDBOX_PREFIX = "kvs-"  # the test kit's run directories: /run/kvs-<run id>


class CliError(RuntimeError):
    """Something the operator must fix or know; printed without a traceback (exit code 2)."""


def sandbox_dir(run_id: str) -> Path:
    return SANDBOX_ROOT / f"{SANDBOX_PREFIX}{run_id}"


def add_common_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("where (see docs/observability.md)")
    g.add_argument("--kubeconfig", help="kubeconfig of the cluster (default: in-cluster, then KUBECONFIG)")
    g.add_argument("--sandbox", metavar="RUNID", help="a sandbox/test-bed run: its nodes and its API")
    g.add_argument(
        "--node-rundir",
        metavar="NODE=DIR",
        action="append",
        default=[],
        help="node NODE's OVS sockets are in DIR (repeatable)",
    )
    g.add_argument("--node", help="this node's name (default: NODE_NAME, else the host name)")
    g.add_argument("--ovs-rundir", help="this node's OVS run directory (default: OVS_RUNDIR, OVS's own)")
    g.add_argument("--bridge", default=os.environ.get("KVSWITCH_BRIDGE") or DEFAULT_BRIDGE)
    parser.add_argument("-o", "--output", choices=["text", "json"], default="text")


def split_key(value: str) -> tuple[str, str]:
    """``NS/NAME`` (or ``NAME``, in ``default``) → (namespace, name)."""
    ns, sep, name = value.partition("/")
    if not sep:
        return "default", ns
    if not ns or not name or "/" in name:
        raise CliError(f"{value!r} is not NAMESPACE/NAME")
    return ns, name


@dataclass(frozen=True)
class NodeOvs:
    """One node's Open vSwitch, through its unix sockets."""

    name: str
    rundir: str | None  # None: OVS's defaults (a real node)
    bridge: str = DEFAULT_BRIDGE
    ovsdb: str = DEFAULT_OVSDB_SOCKET

    def _env(self) -> dict[str, str] | None:
        return {**os.environ, "OVS_RUNDIR": self.rundir} if self.rundir else None

    def _run(self, cmd: list[str]) -> str:
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, env=self._env(), timeout=30, check=False
            )
        except FileNotFoundError as exc:
            raise CliError(f"{cmd[0]} is not installed here: {exc}") from None
        if proc.returncode != 0:
            raise CliError(f"{' '.join(cmd[:3])} on {self.name}: {(proc.stderr or proc.stdout).strip()}")
        return proc.stdout

    def appctl(self, *args: str) -> str:
        ctl = Path(self.rundir) / "ovs-vswitchd.ctl" if self.rundir else None
        target = str(ctl) if ctl is not None and ctl.exists() else "ovs-vswitchd"
        return self._run(["ovs-appctl", "-t", target, *args])

    def ofctl(self, *args: str) -> str:
        return self._run(["ovs-ofctl", "-O", "OpenFlow15", *args])

    def ports(self) -> list[PortInfo]:
        try:
            db = Ovsdb(self.ovsdb, timeout=5.0)
        except (OvsdbError, OSError) as exc:
            raise CliError(f"cannot read ovsdb of {self.name} ({self.ovsdb}): {exc}") from None
        try:
            return db.find_ports(self.bridge)
        finally:
            db.close()


@dataclass(frozen=True)
class PodPort:
    """A pod's attachment as the CNI recorded it on its OVS port."""

    port: str
    ofport: int
    mac: str
    ip: str
    namespace: str
    name: str

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def pod_ports(ports: Iterable[PortInfo]) -> list[PodPort]:
    found = []
    for p in ports:
        ids = p.external_ids
        if ids.get(ID_OWNER) != PLUGIN_NAME or p.ofport is None:
            continue
        ipv4 = [a for a in ids.get(ID_IP, "").split(",") if a and ":" not in a]
        found.append(
            PodPort(
                port=p.name,
                ofport=p.ofport,
                mac=ids.get(ID_MAC, "").lower(),
                ip=str(ipaddress.IPv4Interface(ipv4[0]).ip) if ipv4 else "",
                namespace=ids.get(ID_POD_NAMESPACE, ""),
                name=ids.get(ID_POD_NAME, ""),
            )
        )
    return found


@dataclass
class Context:
    nodes: dict[str, NodeOvs]  # the nodes whose OVS this invocation reaches
    kubeconfig: str | None
    local_node: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Context:
        bridge = args.bridge
        nodes: dict[str, NodeOvs] = {}
        kubeconfig = args.kubeconfig
        if args.sandbox:
            root = sandbox_dir(args.sandbox)
            if not root.is_dir():
                raise CliError(f"no sandbox run {args.sandbox} (no {root})")
            for d in sorted(root.iterdir()):
                if (d / "ovs-vswitchd.ctl").exists():
                    nodes[d.name] = NodeOvs(d.name, str(d), bridge, f"unix:{d / 'db.sock'}")
            if kubeconfig is None and (root / "kubeconfig.local").exists():
                kubeconfig = str(root / "kubeconfig.local")
        for item in args.node_rundir:
            name, sep, d = item.partition("=")
            if not sep or not name or not d:
                raise CliError(f"--node-rundir wants NODE=DIR, not {item!r}")
            nodes[name] = NodeOvs(name, d, bridge, f"unix:{Path(d) / 'db.sock'}")
        local = None
        if not nodes:
            local = args.node or os.environ.get("NODE_NAME") or socket.gethostname()
            rundir = args.ovs_rundir or os.environ.get("OVS_RUNDIR") or None
            ovsdb = os.environ.get("KVSWITCH_OVSDB") or (
                f"unix:{Path(rundir) / 'db.sock'}" if rundir else DEFAULT_OVSDB_SOCKET
            )
            nodes[local] = NodeOvs(local, rundir, bridge, ovsdb)
        return cls(nodes, kubeconfig, local)

    def node(self, name: str) -> NodeOvs | None:
        return self.nodes.get(name)

    def cluster(self) -> ClusterView:
        return asyncio.run(load_cluster(self.kubeconfig))


# --- the API: one snapshot of what the commands need ----------------------------------------------


@dataclass
class ClusterView:
    pods: list[dict[str, Any]] = field(default_factory=list)
    namespaces: list[dict[str, Any]] = field(default_factory=list)
    policies: list[dict[str, Any]] = field(default_factory=list)
    configs: list[dict[str, Any]] = field(default_factory=list)
    services: list[dict[str, Any]] = field(default_factory=list)

    def pod(self, namespace: str, name: str) -> dict[str, Any]:
        for p in self.pods:
            meta = p["metadata"]
            if meta.get("namespace") == namespace and meta["name"] == name:
                return p
        raise CliError(f"pod {namespace}/{name} not found in the API")

    def pod_by_ip(self, ip: str) -> dict[str, Any] | None:
        for p in self.pods:
            if (p.get("status") or {}).get("podIP") == ip and not (p.get("spec") or {}).get("hostNetwork"):
                return p
        return None

    def specs(self) -> dict[str, VSwitchConfigSpec]:
        out = {}
        for c in self.configs:
            try:
                out[c["metadata"]["name"]] = parse_spec(c.get("spec"))
            except InvalidConfig:
                continue
        return out

    def node_of_ip(self, ip: str) -> str | None:
        """The node whose pod CIDR holds ``ip``."""
        addr = ipaddress.IPv4Address(ip)
        for name, spec in self.specs().items():
            if addr in spec.pod_network:
                return name
        return None

    def node_of_overlay_ip(self, ip: str) -> str | None:
        return next((n for n, s in self.specs().items() if s.overlay_ip == ip), None)

    def parsed_policies(self) -> list[Policy]:
        """The NetworkPolicies the agents use (one they cannot parse they ignore)."""
        policies = []
        for obj in self.policies:
            try:
                policies.append(Policy.parse(obj))
            except (KeyError, ValueError, TypeError):
                continue
        return policies

    def policy_state(self) -> PolicyState:
        return PolicyState.build(
            [PodInfo.parse(p) for p in self.pods],
            [NamespaceInfo.parse(n) for n in self.namespaces],
            self.parsed_policies(),
        )

    def owner_names(self, node_ports: Iterable[PodPort]) -> dict[tuple[int, int], str]:
        """(category, owner hash) → a readable owner, for the cookies of one node's flows."""
        names: dict[tuple[int, int], str] = {}
        for p in node_ports:
            names[(Category.POD, owner_hash(p.port))] = f"pod {p.key} (port {p.port})"
        for c in self.configs:
            n = c["metadata"]["name"]
            names[(Category.REMOTE_NODE, owner_hash(n))] = f"remote node {n}"
        for s in self.services:
            key = f"{s['metadata'].get('namespace', '')}/{s['metadata']['name']}"
            names[(Category.SERVICE, owner_hash(key))] = f"service {key}"
        return names


def describe_cookie(cookie: int | None, names: dict[tuple[int, int], str]) -> str:
    if cookie is None:
        return ""
    try:
        category = Category(cookie_category(cookie))
    except ValueError:
        return f"cookie {cookie:#x}"
    return names.get((category, cookie & OWNER_MASK), category.name.lower())


async def load_cluster(kubeconfig: str | None) -> ClusterView:
    from kubernetes_asyncio import client, config

    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()  # type: ignore[no-untyped-call]
        api = client.ApiClient()
    else:
        cfg = client.Configuration()
        try:
            await config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        except Exception as exc:
            raise CliError(f"no usable kubeconfig ({kubeconfig or 'default'}): {exc}") from None
        api = client.ApiClient(configuration=cfg)
    try:
        core, net = client.CoreV1Api(api), client.NetworkingV1Api(api)
        custom = client.CustomObjectsApi(api)

        def plain(obj: Any) -> list[dict[str, Any]]:
            return [api.sanitize_for_serialization(i) for i in obj.items]

        try:
            pods, nss, pols, svcs, cfgs = await asyncio.gather(
                core.list_pod_for_all_namespaces(),
                core.list_namespace(),
                net.list_network_policy_for_all_namespaces(),
                core.list_service_for_all_namespaces(),
                custom.list_cluster_custom_object(GROUP, VERSION, PLURAL),
            )
        except (client.ApiException, OSError) as exc:
            raise CliError(f"cannot read the API: {exc}") from None
        return ClusterView(plain(pods), plain(nss), plain(pols), cfgs.get("items", []), plain(svcs))
    finally:
        await api.close()


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=False))
