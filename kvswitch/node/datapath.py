"""The node's datapath: bridge, gateway and tunnel ports, host networking, and the flows of this
node, of the other nodes and of the pods attached here. Knows nothing about the Kubernetes API.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field

from kvswitch.cni.contract import ID_IP, ID_MAC, ID_OWNER, ID_POD_NAME, ID_POD_NAMESPACE, PLUGIN_NAME
from kvswitch.config import AgentSettings, VSwitchConfigSpec
from kvswitch.datapath import LocalPod, RemoteNode, node_flows, pod_flows, remote_node_flows
from kvswitch.node.host import HostNetwork
from kvswitch.node.telemetry import telemetry_commands
from kvswitch.ovs.appctl import appctl
from kvswitch.ovs.coherence import megaflow_purge_needed
from kvswitch.ovs.flows import Flow
from kvswitch.ovs.openflow import FlowReconciler, Ofctl, ResyncReport
from kvswitch.ovs.ovsdb import AsyncOvsdb, EnsureBridge, EnsurePort, PortInfo
from kvswitch.ovs.pipeline import (
    AUDIT_METER,
    CT_ZONE,
    EXT_ROLE,
    GATEWAY_MAC,
    GATEWAY_OFPORT,
    GATEWAY_PORT,
    NODE_OWNER,
    NODEPORT_VIP,
    TUNNEL_OFPORT,
    TUNNEL_PORT,
    Category,
    Owner,
)

log = logging.getLogger(__name__)


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


class PurgingReconciler(FlowReconciler):
    """A reconciler that calls ``after_change`` once a bundle (or a resync repair) changed the
    bridge: every flow-table change, whoever made it, is followed by it."""

    def __init__(
        self,
        ofctl: Ofctl,
        after_change: Callable[[], Awaitable[None]],
        before_resync: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        super().__init__(ofctl)
        self._after_change = after_change
        self._before_resync = before_resync

    async def after_change(self) -> None:
        await self._after_change()

    async def resync(self) -> ResyncReport:
        if self._before_resync is not None:  # what flows refer to (meters) goes in first
            await self._before_resync()
        report = await super().resync()
        if report.changed:
            await self._after_change()
        return report


@dataclass
class DatapathState:
    local: VSwitchConfigSpec | None = None
    remotes: dict[str, RemoteNode] = field(default_factory=dict)
    pods: dict[str, LocalPod] = field(default_factory=dict)  # by port name
    deleted_pods: set[tuple[str, str]] = field(default_factory=set)  # (namespace, name)


class NodeDatapath:
    """Bridge, ports, host networking and non-policy flows; ``on_pods_changed`` is told when the
    set of local pods changes (their policy flows depend on it)."""

    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.state = DatapathState()
        self.host = HostNetwork(settings.host_netns)
        self.ofctl = Ofctl(settings.bridge, settings.ovs_rundir)
        self.reconciler = PurgingReconciler(self.ofctl, self.purge_stale_megaflows, self.ensure_meters)
        # OVS's userspace datapath before 2.17.8/3.0.5/3.1.3/3.2.0 can leave a megaflow with its old
        # actions after a flow-table change (docs/networkpolicy.md, "Datapath cache"): decided at
        # start from the running vswitchd's version and the datapath type.
        self.megaflow_purge = False
        self.megaflow_purges = 0  # purges run (for tests and metrics)
        self.ovs_version = ""
        self._purge_lock = asyncio.Lock()
        self._purge_wanted = 0  # changes that asked for a purge
        self._purge_covered = 0  # changes a completed purge started after
        self._ovsdb: AsyncOvsdb | None = None
        self._lock = asyncio.Lock()
        self.pods_changed = asyncio.Event()
        # Held while the pod set or flows derived from it are computed and installed.
        self.pods_lock = asyncio.Lock()
        self.flows_with_pods: Callable[[], Mapping[Owner, list[Flow]]] | None = None

    @property
    def db(self) -> AsyncOvsdb:
        if self._ovsdb is None:
            raise RuntimeError("datapath not started")
        return self._ovsdb

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Bridge first, then a new flow round; flows of the previous round stay until finish_startup."""
        s = self.settings
        self._ovsdb = await AsyncOvsdb.connect(s.ovsdb)
        await self.db.ensure_bridge(s.bridge, datapath_type=s.datapath_type)
        await self._wait_for_mgmt()
        await self.decide_megaflow_purge()
        await self.ensure_meters()
        await self.reconciler.start(self.db, s.bridge)

    async def ensure_meters(self) -> None:
        """The audit log's meter (a bridge that lost its flows lost its meters too)."""
        s = self.settings
        if await self.ofctl.ensure_meter(AUDIT_METER, s.audit_rate, s.audit_burst or s.audit_rate):
            log.info("audit meter %d: %d packets/s", AUDIT_METER, s.audit_rate)

    async def finish_startup(self) -> None:
        await self.sync_ports()
        report = await self.reconciler.finish_startup(self.db)
        log.info("startup complete: round %d, %s", self.reconciler.round, report)

    async def stop(self) -> None:
        if self._ovsdb is not None:
            await self._ovsdb.close()
            self._ovsdb = None

    async def _wait_for_mgmt(self, timeout: float = 10.0) -> None:
        """vswitchd creates the bridge's OpenFlow socket a moment after the bridge row."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not await self.ofctl.reachable():
            if loop.time() > deadline:
                raise TimeoutError(f"bridge {self.ofctl.target} has no OpenFlow management socket")
            await asyncio.sleep(0.05)

    # --- this node ------------------------------------------------------------------------

    def local_config(self) -> VSwitchConfigSpec | None:
        return self.state.local

    def pod_mtu(self, spec: VSwitchConfigSpec) -> int:
        """Blocking (netlink): call from a thread."""
        underlay = self.host.interface_mtu_for(spec.overlay_ip) or self.settings.underlay_mtu
        return spec.pod_mtu(underlay)

    async def apply_local(self, spec: VSwitchConfigSpec) -> int:
        """Converge bridge ports, host networking and flows to this node's VSwitchConfig; the pod MTU."""
        async with self._lock:
            s = self.settings
            previous = self.state.local
            await self.db.execute(
                EnsureBridge(s.bridge, datapath_type=s.datapath_type),
                EnsurePort(
                    s.bridge,
                    TUNNEL_PORT,
                    spec.overlay_type.value,
                    options={"remote_ip": "flow", "key": "flow"},
                    external_ids={EXT_ROLE: "tunnel"},
                    ofport_request=TUNNEL_OFPORT,
                ),
                EnsurePort(
                    s.bridge,
                    GATEWAY_PORT,
                    "internal",
                    external_ids={EXT_ROLE: "gateway"},
                    ofport_request=GATEWAY_OFPORT,
                ),
                *telemetry_commands(s.bridge, spec.telemetry),
                what=f"node ports on {s.bridge}",
            )
            await self.db.wait_ofport(GATEWAY_PORT)
            await self.db.wait_ofport(TUNNEL_PORT)
            mtu = await asyncio.to_thread(self.pod_mtu, spec)
            gw_cidr = f"{spec.gateway_ip}/{spec.pod_network.prefixlen}"
            await asyncio.to_thread(self._host_setup, spec, gw_cidr, mtu, previous)
            await self.reconciler.set_flows(NODE_OWNER, node_flows(spec, GATEWAY_OFPORT, TUNNEL_OFPORT))
            self.state.local = spec
            return mtu

    def _host_setup(
        self, spec: VSwitchConfigSpec, gw_cidr: str, mtu: int, previous: VSwitchConfigSpec | None
    ) -> None:
        self.host.ensure_gateway(GATEWAY_PORT, gw_cidr, GATEWAY_MAC, mtu)
        if previous is not None and previous.cluster_cidr != spec.cluster_cidr:
            self.host.remove_route(previous.cluster_cidr)
        self.host.ensure_route(spec.cluster_cidr, GATEWAY_PORT, mtu)
        # The node and host-network pods reach Services through OVS (its proxy, or the host's NAT
        # first with kube-proxy); the ARP responder answers the host for the whole service CIDR.
        if previous is not None and previous.service_cidr != spec.service_cidr:
            self.host.remove_route(previous.service_cidr)
        self.host.ensure_route(spec.service_cidr, GATEWAY_PORT, mtu)
        self.host.ensure_route(f"{NODEPORT_VIP}/32", GATEWAY_PORT, mtu)
        self.host.ensure_forwarding()
        self.host.ensure_no_redirects(GATEWAY_PORT)
        self.host.ensure_snat(spec.cluster_cidr)

    async def flush_udp_conntrack(self, frontend: str, port: int, endpoint: str, endpoint_port: int) -> None:
        """Forget UDP connections to ``frontend:port`` that were sent to ``endpoint:endpoint_port``.

        Partial tuples (OVS ≥ 3.1): the original one names the Service frontend, the reply one the
        endpoint (a DNATed connection's reply comes from it), so other Services' clients of the same
        endpoint keep theirs."""
        orig = f"ct_nw_dst={frontend},ct_nw_proto=17,ct_tp_dst={port}"
        reply = f"ct_nw_src={endpoint},ct_nw_proto=17,ct_tp_src={endpoint_port}"
        try:
            await self.appctl("dpctl/flush-conntrack", f"zone={CT_ZONE}", orig, reply)
        except RuntimeError as exc:
            log.warning(
                "flushing UDP conntrack of %s:%d via %s:%d failed: %s",
                frontend,
                port,
                endpoint,
                endpoint_port,
                exc,
            )

    async def decide_megaflow_purge(self) -> bool:
        """Ask the running ovs-vswitchd its version: purge stale megaflows after flow changes only on
        a userspace datapath without "dpif-netdev: Fix dpif_netdev_flow_put"."""
        try:
            self.ovs_version = (await self.appctl("version")).strip()
        except RuntimeError as exc:
            self.ovs_version = ""
            log.warning("cannot read the ovs-vswitchd version (%s); assuming it needs purges", exc)
        self.megaflow_purge = megaflow_purge_needed(self.ovs_version, self.settings.datapath_type)
        if self.megaflow_purge:
            log.info(
                "%s with datapath %s: the megaflow cache is purged after every flow-table change "
                "(stale megaflows; fixed in OVS 2.17.8, 3.0.5, 3.1.3, 3.2.0)",
                self.ovs_version or "unknown OVS",
                self.settings.datapath_type,
            )
        return self.megaflow_purge

    async def purge_stale_megaflows(self) -> None:
        """After a flow-table change, on an affected OVS: drop every cached megaflow so that the
        next packet of each flow is translated from the tables as they are now.

        ``revalidator/purge`` deletes the megaflows together with their revalidator state (the
        ``dpctl/del-flows`` alternative leaves that state behind, and each flow stays on the slow
        path until the next revalidator round). Concurrent callers share one purge when it started
        after their change; a purge that started before it does not count."""
        if not self.megaflow_purge:
            return
        self._purge_wanted += 1
        mine = self._purge_wanted
        async with self._purge_lock:
            if self._purge_covered >= mine:
                return
            covers = self._purge_wanted
            try:
                await self.appctl("revalidator/purge")
            except RuntimeError as exc:  # vswitchd restarting: its cache starts empty anyway
                log.warning("purging the megaflow cache failed: %s", exc)
                return
            self._purge_covered = covers
            self.megaflow_purges += 1

    async def appctl(self, *args: str) -> str:
        return await appctl(self.settings.ovs_rundir, *args)

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

    def local_pods(self) -> list[LocalPod]:
        return list(self.state.pods.values())

    async def sync_ports(self, known: Iterable[PortInfo] = ()) -> None:
        """Pod flows for exactly the CNI-made ports that exist (and whose pod was not deleted).

        ``known``: ports the caller has just seen (the CNI server, right after plugging one), in
        case this connection's copy of ovsdb has not caught up yet. When ``flows_with_pods`` is set,
        the flows it returns for the new set of pods (NetworkPolicy) go into the same bundle: a
        pod's delivery flow never exists without its isolation. With ``known`` they are installed
        even when no pod changed: the port watch may have installed the pod's flows before the
        API's pod (and so its policy) was known, and ADD must not return before that policy is in."""
        known = list(known)
        async with self.pods_lock:
            found = {p.name: p for p in await self.db.find_ports(self.settings.bridge)}
            for info in known:
                if info.bridge == self.settings.bridge and info.ofport is not None:
                    found[info.name] = info
            attached = [p for p in map(pod_from_port, found.values()) if p is not None]
            self.state.deleted_pods &= {(p.namespace, p.name) for p in attached}  # port gone: forget
            wanted = {p.port: p for p in attached if (p.namespace, p.name) not in self.state.deleted_pods}
            changes: dict[Owner, list[Flow]] = {}
            for port, pod in wanted.items():
                if self.state.pods.get(port) != pod:
                    changes[Owner(Category.POD, port)] = pod_flows(pod)
            for port in self.state.pods.keys() - wanted.keys():
                changes[Owner(Category.POD, port)] = []
            if not changes and not (known and self.flows_with_pods is not None):
                return
            previous, self.state.pods = self.state.pods, wanted
            try:
                extra = self.flows_with_pods() if self.flows_with_pods is not None else {}
                await self.reconciler.set_many({**changes, **extra})
            except BaseException:
                self.state.pods = previous
                raise
            if not changes:
                return
            if self.flows_with_pods is None:
                self.pods_changed.set()
            log.info("pods on this node: %d (%d changed)", len(wanted), len(changes))

    async def pod_deleted(self, namespace: str, name: str) -> None:
        self.state.deleted_pods.add((namespace, name))
        await self.sync_ports()

    async def pod_present(self, namespace: str, name: str) -> None:
        if (namespace, name) in self.state.deleted_pods:
            self.state.deleted_pods.discard((namespace, name))
            await self.sync_ports()

    async def watch_ports(self) -> None:
        """A second ovsdb connection blocks on changes, so ports are seen within milliseconds."""
        watcher = await AsyncOvsdb.connect(self.settings.ovsdb)
        try:
            seqno = -1
            while True:
                new = await watcher.wait_change(seqno, 1.0)
                if new != seqno:
                    seqno = new
                    try:
                        await self._repair_node_ports(watcher)
                        await self.sync_ports()
                    except Exception:  # keep watching; the periodic resync repairs
                        log.exception("syncing pod ports failed")
        finally:
            with contextlib.suppress(Exception):
                await watcher.close()

    async def _repair_node_ports(self, watcher: AsyncOvsdb) -> None:
        """Someone deleted the bridge, or the gateway or tunnel port: build them again (the
        reconciler's sentinel then sees the empty table and replays every flow)."""
        spec = self.state.local
        if spec is None:
            return
        bridge = self.settings.bridge
        await watcher.refresh()
        for name in (GATEWAY_PORT, TUNNEL_PORT):
            info = await watcher.port_info(name, refresh=False)
            if info is None or info.bridge != bridge:
                log.warning("bridge %s or its gateway/tunnel port vanished; rebuilding", bridge)
                self.state.local = None  # force a full apply
                await self.apply_local(spec)
                return
