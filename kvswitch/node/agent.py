"""The node agent's core, independent of kopf: VSwitchConfigs and OVS ports in, datapath out.

Handlers (kvswitch/handlers/agent.py) only translate API events into calls here. All flows come
from the pure functions of :mod:`kvswitch.datapath` and reach OVS through the reconciler.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvswitch.cni import install as cni_install
from kvswitch.cni.plugin import ID_IP, ID_MAC, ID_OWNER, ID_POD_NAME, ID_POD_NAMESPACE
from kvswitch.cni.server import CniServer
from kvswitch.cni.spec import PLUGIN_NAME
from kvswitch.config import AgentSettings, VSwitchConfigSpec
from kvswitch.datapath import LocalPod, RemoteNode, node_flows, pod_flows, remote_node_flows
from kvswitch.node.host import HostNetwork
from kvswitch.ovs.openflow import FlowReconciler, Ofctl
from kvswitch.ovs.ovsdb import AsyncOvsdb, Ovsdb, PortInfo
from kvswitch.ovs.pipeline import (
    EXT_ROLE,
    GATEWAY_MAC,
    GATEWAY_OFPORT,
    GATEWAY_PORT,
    NODE_OWNER,
    POLICY_OWNER,
    TUNNEL_OFPORT,
    TUNNEL_PORT,
    Category,
    Owner,
)
from kvswitch.policy.compute import PolicyState
from kvswitch.policy.flows import ConjIds, policy_flows
from kvswitch.policy.model import NamespaceInfo, PodInfo, Policy

log = logging.getLogger(__name__)

CONFLIST_NAME = "10-k-vswitch.conflist"
NETWORK_NAME = "k-vswitch"
CONFLIST_VERSION = "1.0.0"


def pod_from_port(info: PortInfo) -> LocalPod | None:
    """A pod attachment, if this port is one the CNI made and vswitchd has numbered."""
    ids = info.external_ids
    if ids.get(ID_OWNER) != PLUGIN_NAME or info.ofport is None:
        return None
    ipv4 = [a for a in ids.get(ID_IP, "").split(",") if a and ":" not in a]
    mac = ids.get(ID_MAC)
    if not ipv4 or not mac:
        return None
    return LocalPod(
        port=info.name,
        ofport=info.ofport,
        ip=str(ipaddress.IPv4Interface(ipv4[0]).ip),
        mac=mac.lower(),
        namespace=ids.get(ID_POD_NAMESPACE, ""),
        name=ids.get(ID_POD_NAME, ""),
    )


def conflist(settings: AgentSettings, spec: VSwitchConfigSpec, mtu: int) -> dict[str, Any]:
    """k-vswitch first (it makes the interface and asks host-local for the IP), then portmap."""
    ipam: dict[str, Any] = {
        "type": "host-local",
        "ranges": [[{"subnet": spec.pod_cidr, "gateway": spec.gateway_ip}]],
    }
    if settings.ipam_data_dir:
        ipam["dataDir"] = settings.ipam_data_dir
    return {
        # 1.0.0, not 1.1.0: the portmap/bandwidth plugins that distributions ship (e.g. Debian's
        # 1.1.1) refuse 1.1.0 configs, and a chain runs at the version every plugin supports.
        "cniVersion": CONFLIST_VERSION,
        "name": NETWORK_NAME,
        "plugins": [
            {
                "type": PLUGIN_NAME,
                "bridge": settings.bridge,
                "mtu": mtu,
                "encapsulation": spec.overlay_type.value,
                "ovsdbSocket": settings.ovsdb,
                "serverSocket": settings.cni_socket,
                "ipam": ipam,
            },
            {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True},
        ],
    }


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


@dataclass
class AgentState:
    local: VSwitchConfigSpec | None = None
    remotes: dict[str, RemoteNode] = field(default_factory=dict)
    pods: dict[str, LocalPod] = field(default_factory=dict)  # by port name
    deleted_pods: set[tuple[str, str]] = field(default_factory=set)  # (namespace, name)
    # every pod of the cluster as the API reports it (namespaces and policies live in PolicyState)
    api_pods: dict[str, PodInfo] = field(default_factory=dict)


class NodeAgent:
    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.state = AgentState()
        self.host = HostNetwork(settings.host_netns)
        self.ofctl = Ofctl(settings.bridge, settings.ovs_rundir)
        self.reconciler = FlowReconciler(self.ofctl)
        self.ovsdb: AsyncOvsdb | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._lock = asyncio.Lock()
        self.cni_server = CniServer(settings.cni_socket, host_netns=settings.host_netns)
        self._conj_ids = ConjIds()
        self.policy_state = PolicyState()
        self._local_keys: set[str] = set()
        self._policy_dirty = asyncio.Event()
        self.policy_applied = 0  # increments each time policy flows were (re)computed and installed

    @property
    def db(self) -> AsyncOvsdb:
        if self.ovsdb is None:
            raise RuntimeError("agent not started")
        return self.ovsdb

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Bridge first, then a new flow round; flows of the previous round stay until finish_startup."""
        s = self.settings
        self.ovsdb = await AsyncOvsdb.connect(s.ovsdb)
        await self.db.call(self.db.db.ensure_bridge, s.bridge, datapath_type=s.datapath_type)
        await asyncio.to_thread(_wait_for_mgmt, self.ofctl)
        await self.reconciler.start(self.db, s.bridge)
        if s.install_cni:
            await asyncio.to_thread(cni_install.install, s.cni_bin_dir)
        await self.cni_server.start()

    async def finish_startup(self) -> None:
        await self.sync_ports()
        report = await self.reconciler.finish_startup(self.db)
        log.info("startup complete: round %d, %s", self.reconciler.round, report)
        self._tasks.append(
            asyncio.create_task(self.reconciler.watch(resync_interval=self.settings.resync_interval))
        )
        self._tasks.append(asyncio.create_task(self._watch_ports()))
        self._tasks.append(asyncio.create_task(self._policy_loop()))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()
        await self.cni_server.stop()
        if self.ovsdb is not None:
            await self.ovsdb.close()
            self.ovsdb = None

    # --- this node ------------------------------------------------------------------------

    def pod_mtu(self, spec: VSwitchConfigSpec) -> int:
        underlay = self.host.interface_mtu_for(spec.overlay_ip) or self.settings.underlay_mtu
        return spec.pod_mtu(underlay)

    async def apply_local(self, spec: VSwitchConfigSpec) -> None:
        """Converge bridge ports, host networking and flows to this node's VSwitchConfig."""
        async with self._lock:
            s, db = self.settings, self.db
            previous = self.state.local
            await db.call(db.db.ensure_bridge, s.bridge, datapath_type=s.datapath_type)
            await db.call(
                db.db.ensure_port,
                s.bridge,
                TUNNEL_PORT,
                spec.overlay_type.value,
                options={"remote_ip": "flow", "key": "flow"},
                external_ids={EXT_ROLE: "tunnel"},
                ofport_request=TUNNEL_OFPORT,
            )
            await db.call(
                db.db.ensure_port,
                s.bridge,
                GATEWAY_PORT,
                "internal",
                external_ids={EXT_ROLE: "gateway"},
                ofport_request=GATEWAY_OFPORT,
            )
            await db.call(db.db.wait_ofport, GATEWAY_PORT)
            await db.call(db.db.wait_ofport, TUNNEL_PORT)
            mtu = await asyncio.to_thread(self.pod_mtu, spec)
            prefix = spec.pod_network.prefixlen
            await asyncio.to_thread(self._host_setup, spec, f"{spec.gateway_ip}/{prefix}", mtu, previous)
            await self.reconciler.set_flows(NODE_OWNER, node_flows(spec, GATEWAY_OFPORT, TUNNEL_OFPORT))
            # The conflist last: the runtime starts sending pods once it exists.
            text = json.dumps(conflist(s, spec, mtu), indent=2) + "\n"
            await asyncio.to_thread(write_atomically, Path(s.cni_conf_dir) / CONFLIST_NAME, text)
            self.state.local = spec

    def _host_setup(
        self, spec: VSwitchConfigSpec, gw_cidr: str, mtu: int, previous: VSwitchConfigSpec | None
    ) -> None:
        self.host.ensure_gateway(GATEWAY_PORT, gw_cidr, GATEWAY_MAC, mtu)
        if previous is not None and previous.cluster_cidr != spec.cluster_cidr:
            self.host.remove_route(previous.cluster_cidr)
        self.host.ensure_route(spec.cluster_cidr, GATEWAY_PORT, mtu)
        self.host.ensure_forwarding()
        self.host.ensure_snat(spec.cluster_cidr)

    # --- other nodes ----------------------------------------------------------------------

    async def set_remote(self, name: str, spec: VSwitchConfigSpec | None) -> None:
        owner = Owner(Category.REMOTE_NODE, name)
        if spec is None or name == self.settings.node_name:
            self.state.remotes.pop(name, None)
            await self.reconciler.delete_owner(owner)
            return
        node = RemoteNode(name, spec.pod_cidr, spec.overlay_ip)
        await self.reconciler.set_flows(owner, remote_node_flows(node, TUNNEL_OFPORT))
        self.state.remotes[name] = node

    # --- pods -----------------------------------------------------------------------------

    async def sync_ports(self) -> None:
        """Pod flows for exactly the CNI-made ports that exist (and whose pod was not deleted)."""
        ports = await self.db.call(_snapshot_ports, self.db.db, self.settings.bridge)
        attached = [p for p in map(pod_from_port, ports) if p is not None]
        self.state.deleted_pods &= {(p.namespace, p.name) for p in attached}  # port gone too: forget
        wanted = {p.port: p for p in attached if (p.namespace, p.name) not in self.state.deleted_pods}
        changes: dict[Owner, list[LocalPod]] = {}
        for port, pod in wanted.items():
            if self.state.pods.get(port) != pod:
                changes[Owner(Category.POD, port)] = [pod]
        for port in self.state.pods.keys() - wanted.keys():
            changes[Owner(Category.POD, port)] = []
        if changes:
            await self.reconciler.set_many(
                {owner: [f for pod in pods for f in pod_flows(pod)] for owner, pods in changes.items()}
            )
            self.state.pods = wanted
            self._policy_dirty.set()
            log.info("pods on this node: %d (%d changed)", len(wanted), len(changes))

    async def pod_deleted(self, namespace: str, name: str) -> None:
        self.state.deleted_pods.add((namespace, name))
        await self.sync_ports()

    async def pod_present(self, namespace: str, name: str) -> None:
        if (namespace, name) in self.state.deleted_pods:
            self.state.deleted_pods.discard((namespace, name))
            await self.sync_ports()

    async def _watch_ports(self) -> None:
        """A second ovsdb connection blocks on changes, so ports are seen within milliseconds."""
        watcher = await AsyncOvsdb.connect(self.settings.ovsdb)
        try:
            seqno = -1
            while True:
                new = await watcher.call(watcher.db.wait_change, seqno, 1.0)
                if new != seqno:
                    seqno = new
                    try:
                        await self._repair_node_ports(watcher)
                        await self.sync_ports()
                    except Exception:  # keep watching; the periodic resync repairs
                        log.exception("syncing pod ports failed")
        finally:
            await watcher.close()

    async def _repair_node_ports(self, watcher: AsyncOvsdb) -> None:
        """Someone deleted the bridge, or the gateway or tunnel port: build them again (the
        reconciler's sentinel then sees the empty table and replays every flow)."""
        spec = self.state.local
        if spec is None:
            return
        present = await watcher.call(_node_ports_present, watcher.db, self.settings.bridge)
        if not present:
            log.warning("bridge %s or its gateway/tunnel port vanished; rebuilding", self.settings.bridge)
            self.state.local = None  # force a full apply
            await self.apply_local(spec)

    # --- NetworkPolicy ----------------------------------------------------------------------

    def set_pod(self, key: str, pod: PodInfo | None) -> None:
        _put(self.state.api_pods, key, pod)
        if pod is not None and pod.node == self.settings.node_name:
            self._local_keys.add(key)
        else:
            self._local_keys.discard(key)
        self.policy_state.set_pod(key, self._effective(key))
        self._policy_dirty.set()

    def set_namespace(self, name: str, ns: NamespaceInfo | None) -> None:
        self.policy_state.set_namespace(name, ns)
        self._policy_dirty.set()

    def set_policy(self, key: str, policy: Policy | None) -> None:
        self.policy_state.set_policy(key, policy)
        self._policy_dirty.set()

    def replace_policy_inputs(
        self, pods: list[PodInfo], namespaces: list[NamespaceInfo], policies: list[Policy]
    ) -> None:
        """Start over from a full listing (agent start-up, tests)."""
        self.state.api_pods = {p.key: p for p in pods}
        self._local_keys = {p.key for p in pods if p.node == self.settings.node_name}
        effective = [e for k in self.state.api_pods if (e := self._effective(k)) is not None]
        self.policy_state = PolicyState.build(effective, namespaces, policies)
        self._policy_dirty.set()

    def _effective(self, key: str) -> PodInfo | None:
        """The API's pod, with the IP the CNI recorded while the API does not know it yet."""
        pod = self.state.api_pods.get(key)
        if pod is None or pod.ip or key not in self._local_keys:
            return pod
        ip = next((p.ip for p in self.state.pods.values() if f"{p.namespace}/{p.name}" == key), None)
        return pod if ip is None else dataclasses.replace(pod, ip=ip)

    def _refresh_local_ips(self) -> None:
        for key in self._local_keys:
            pod = self._effective(key)
            if pod != self.policy_state.pods.get(key):
                self.policy_state.set_pod(key, pod)

    async def apply_policy(self) -> int:
        """Recompute the policies of this node's namespaces; only flow differences reach OVS."""
        self._policy_dirty.clear()
        self._refresh_local_ips()
        local = [p for k in self._local_keys if (p := self.policy_state.pods.get(k)) is not None]
        result = self.policy_state.compute(namespaces={p.namespace for p in local})
        changed = await self.reconciler.set_flows(POLICY_OWNER, policy_flows(result, local, self._conj_ids))
        self.policy_applied += 1
        return changed

    async def _policy_loop(self, settle: float = 0.02) -> None:
        """Coalesce bursts of events (a namespace relabel touches many pods) into one recompute."""
        while True:
            await self._policy_dirty.wait()
            await asyncio.sleep(settle)
            try:
                await self.apply_policy()
            except Exception:
                log.exception("applying NetworkPolicy failed; will retry on the next change")
                await asyncio.sleep(1.0)
                self._policy_dirty.set()


def _put(store: dict[str, Any], key: str, value: Any) -> None:
    if value is None:
        store.pop(key, None)
    else:
        store[key] = value


def _node_ports_present(db: Ovsdb, bridge: str) -> bool:
    db.refresh()
    return all(
        (info := db.port_info(name)) is not None and info.bridge == bridge
        for name in (GATEWAY_PORT, TUNNEL_PORT)
    )


def _snapshot_ports(db: Ovsdb, bridge: str) -> list[PortInfo]:
    db.refresh()
    return db.find_ports(bridge)


def _wait_for_mgmt(ofctl: Ofctl, timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not asyncio.run(ofctl.reachable()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"bridge {ofctl.target} has no OpenFlow management socket")
        time.sleep(0.05)
