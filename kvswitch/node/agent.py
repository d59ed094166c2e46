"""The node agent's core, independent of kopf: VSwitchConfigs, pods and policies in, datapath out.

Two parts: :class:`~kvswitch.node.datapath.NodeDatapath` (bridge, ports, host networking, flows
of nodes and pods) and :class:`~kvswitch.node.policy.PolicyInputs` (the cluster's pods, namespaces
and policies, turned into this node's policy flows). This class wires them to the CNI server and the
CNI files on the node. Handlers (kvswitch/handlers/agent.py) call its methods and never read its
state.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import pickle
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from kvswitch import metrics
from kvswitch.cni import install as cni_install
from kvswitch.cni.contract import ID_POD_NAME, ID_POD_NAMESPACE
from kvswitch.cni.server import CniServer
from kvswitch.cni.spec import CniError, Code
from kvswitch.config import AgentSettings, ServiceProxy, VSwitchConfigSpec
from kvswitch.node.audit import AuditLog
from kvswitch.node.datapath import NodeDatapath
from kvswitch.node.policy import PolicyInputs
from kvswitch.ovs.flows import Flow
from kvswitch.ovs.groups import Group
from kvswitch.ovs.ovsdb import PortInfo
from kvswitch.ovs.pipeline import AUDIT_USERDATA, NODEPORT_VIP, Category, Owner, Table, category_filter
from kvswitch.ovs.reject import RejectResponder
from kvswitch.policy.compute import paused_gc
from kvswitch.policy.model import NamespaceInfo, PodInfo, Policy
from kvswitch.policy.stats import CounterDeltas, RuleCounters, RuleRef, parse_counter_flows, rule_counters
from kvswitch.services.flows import NodeContext
from kvswitch.services.health import HealthCheckServers
from kvswitch.services.state import ServiceState

log = logging.getLogger(__name__)
POD_EVENT_WAIT = 2.0  # seconds ADD waits for the API's pod before installing flows without it
POD_LOOKUP_AFTER = 0.2  # seconds ADD waits for the pod watch before asking the API for the pod itself
POLICY_INPUTS_WAIT = 10.0  # seconds ADD to a starting agent waits for its NetworkPolicy listing
# One GET of a pod (namespace, name) from the API: None when it does not exist.
PodLookup = Callable[[str, str], Awaitable[PodInfo | None]]


class NodeAgent:
    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.datapath = NodeDatapath(settings)
        self.policy = PolicyInputs(settings.node_name, self.datapath.local_pods)
        self.cni_server = CniServer(
            settings.cni_socket, host_netns=settings.host_netns, attached=self.pod_attached
        )
        # Policy flows changed by a new pod set go into the pod flows' bundle (confirmed by the
        # next apply_policy, which resends them until then: a no-op when they went in).
        self.datapath.flows_with_pods = self.policy.flow_changes
        self._tasks: list[asyncio.Task[None]] = []
        self._policy_dirty = asyncio.Event()
        self.policy_applied = 0  # increments each time policy flows were (re)computed and installed
        self.services = ServiceState(NodeContext(settings.node_name, ()))
        self._services_dirty: set[str] = set()
        self._services_wake = asyncio.Event()
        self._programmed_services: set[str] = set()
        self._udp_backends: dict[str, set[tuple[str, int, str, int]]] = {}
        self.services_applied = 0
        self.reject = RejectResponder(self.datapath.ofctl.target, settings.ovs_rundir)
        self.health = HealthCheckServers(settings.host_netns)
        names = _PolicyNames(self)
        self.audit = AuditLog(
            settings.audit_log, names, settings.audit_log_max_bytes, settings.audit_log_backups
        )
        self.reject.handlers[AUDIT_USERDATA] = self.audit.handle
        self.rule_stats: dict[tuple[bool, int], RuleCounters] = {}  # as last read: (ingress, rule id)
        self._rule_deltas = CounterDeltas()
        self._counted_rules: dict[int, RuleRef] = {}
        # ADD's fallback when the pod watch lags (a restarted agent's watch starts after start-up):
        # set by the handlers; without it ADD waits for the watch alone.
        self.pod_lookup: PodLookup | None = None
        # Set once the cluster's policy inputs are known (a full listing, or start-up finished):
        # before that, flows computed for a new pod could leave an isolated pod open.
        self._inputs_ready = asyncio.Event()
        # Started from the warm-start cache (warm_start): the real lists are still to come.
        self.warm = False

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Bridge and a new flow round; flows of the previous round stay until finish_startup."""
        await self.datapath.start()
        try:
            await asyncio.to_thread(self.audit.start)
        except OSError as exc:  # no audit log is no reason to leave the node without a network
            log.error("NetworkPolicy audit log %s unavailable: %s", self.settings.audit_log, exc)
        if self.settings.install_cni:
            await asyncio.to_thread(cni_install.install, self.settings.cni_bin_dir)
        await self.cni_server.start()

    async def finish_startup(self) -> None:
        if not self.warm:  # (warm: the inputs are the cache's until the lists replace them)
            self._inputs_ready.set()
        await self.datapath.finish_startup()
        self._spawn(self.datapath.reconciler.watch(resync_interval=self.settings.resync_interval))
        self._spawn(self.datapath.watch_ports())
        self._spawn(self._policy_loop())
        self._spawn(self._service_loop())
        self._spawn(self.reject.run())
        if self.settings.inputs_cache:
            self._spawn(self._save_inputs_loop(spacing=self.settings.inputs_cache_spacing))
        if self.settings.policy_stats_interval > 0:
            self._spawn(self._policy_stats_loop(self.settings.policy_stats_interval))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self._tasks.append(asyncio.create_task(coro))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()
        await self.cni_server.stop()
        await self.health.close()
        await asyncio.to_thread(self.audit.stop)
        if self.settings.inputs_cache and self._inputs_ready.is_set():
            with contextlib.suppress(Exception):
                await self.save_inputs()
        await self.datapath.stop()

    # --- this node ------------------------------------------------------------------------

    def is_applied(self, spec: VSwitchConfigSpec) -> bool:
        """True when ``spec`` is what the datapath was last converged to."""
        return self.datapath.local_config() == spec

    def pod_mtu(self, spec: VSwitchConfigSpec) -> int:
        """Blocking (netlink): call from a thread."""
        return self.datapath.pod_mtu(spec)

    async def apply_local(self, spec: VSwitchConfigSpec) -> int:
        """Converge the node to its VSwitchConfig, then (re)write the conflist; the pod MTU."""
        previous = self.datapath.local_config()
        mtu = await self.datapath.apply_local(spec)
        s = self.settings
        node = NodeContext(s.node_name, (spec.overlay_ip, spec.gateway_ip))
        self._mark_services(self.services.set_node(node))
        if previous is None or previous.service_proxy != spec.service_proxy:
            self._mark_services(set(self.services.services) | self._programmed_services)
        conf = cni_install.conflist(
            bridge=s.bridge,
            mtu=mtu,
            encapsulation=spec.overlay_type.value,
            ovsdb_socket=s.ovsdb,
            server_socket=s.cni_socket,
            pod_cidr=spec.pod_cidr,
            gateway_ip=spec.gateway_ip,
            ipam_data_dir=s.ipam_data_dir,
        )
        await asyncio.to_thread(cni_install.install_conflist, s.cni_conf_dir, conf)
        return mtu

    async def set_remote(self, name: str, spec: VSwitchConfigSpec | None) -> None:
        await self.datapath.set_remote(name, spec)

    # --- pods of this node ----------------------------------------------------------------

    # (a change of the local pods wakes the policy loop through ``datapath.pods_changed``)

    async def sync_ports(self) -> None:
        await self.datapath.sync_ports()

    async def pod_attached(self, port: PortInfo) -> None:
        """The CNI server plugged ``port``: its pod's flows, NetworkPolicy included, are in OVS
        before ADD returns (the runtime starts the containers right after)."""
        namespace, name = port.external_ids.get(ID_POD_NAMESPACE, ""), port.external_ids.get(ID_POD_NAME, "")
        if not self._inputs_ready.is_set():
            # A restarting agent serves CNI before it has listed the cluster's policies.
            try:
                await asyncio.wait_for(self._inputs_ready.wait(), POLICY_INPUTS_WAIT)
            except TimeoutError:
                raise CniError(
                    Code.TRY_AGAIN_LATER,
                    "the k-vswitch agent is starting",
                    "its NetworkPolicy inputs are not loaded yet",
                ) from None
        if namespace or name:
            await self._learn_pod(namespace, name)
        await self.datapath.sync_ports(known=[port])

    async def _learn_pod(self, namespace: str, name: str) -> None:
        """Know the API's pod (its labels select its NetworkPolicy) before its flows go in.

        The runtime calls ADD right after the kubelet saw the pod; our watch sees it at about the
        same time, or much later when the agent has just restarted (its watch starts once start-up
        is over) or the API is slow: after a moment, ask the API for the pod itself."""
        key = f"{namespace}/{name}"
        loop = asyncio.get_running_loop()
        start = loop.time()
        asked = self.pod_lookup is None
        while not self.policy.knows(key) and loop.time() - start < POD_EVENT_WAIT:
            if asked or loop.time() - start < POD_LOOKUP_AFTER:
                await asyncio.sleep(0.01)
                continue
            asked = True
            assert self.pod_lookup is not None
            try:
                left = POD_EVENT_WAIT - (loop.time() - start)
                pod = await asyncio.wait_for(self.pod_lookup(namespace, name), max(left, 1.0))
            except Exception as exc:
                log.warning("looking pod %s up in the API failed: %s", key, str(exc) or type(exc).__name__)
                continue
            if pod is not None and not self.policy.knows(key):  # an event may have come meanwhile
                self.set_pod(key, pod)
        if not self.policy.knows(key):
            log.warning("pod %s is not in the API yet; its policy follows when it is", key)

    async def pod_deleted(self, namespace: str, name: str) -> None:
        await self.datapath.pod_deleted(namespace, name)

    async def pod_present(self, namespace: str, name: str) -> None:
        await self.datapath.pod_present(namespace, name)

    # --- NetworkPolicy inputs -------------------------------------------------------------

    def set_pod(self, key: str, pod: PodInfo | None) -> None:
        self.policy.set_pod(key, pod)
        self._policy_dirty.set()

    def set_namespace(self, name: str, ns: NamespaceInfo | None) -> None:
        self.policy.set_namespace(name, ns)
        self._policy_dirty.set()

    def set_policy(self, key: str, policy: Policy | None) -> None:
        self.policy.set_policy(key, policy)
        self._policy_dirty.set()

    def replace_policy_inputs(
        self, pods: list[PodInfo], namespaces: list[NamespaceInfo], policies: list[Policy]
    ) -> None:
        self.policy.replace(pods, namespaces, policies)
        self._inputs_ready.set()
        # The cluster just loaded lives as long as the agent: keep the collector from scanning it
        # again and again (a full collection over a 50k-pod cluster stalls an event by 100s of ms).
        gc.freeze()
        self._policy_dirty.set()

    async def apply_policy(self) -> int:
        """Recompute what the events since the last call touched, for the policies of this node's
        namespaces; only the owners (flow buckets) whose flows changed are diffed and sent."""
        async with self.datapath.pods_lock:  # computed from the pod set that is installed
            self._policy_dirty.clear()
            self.datapath.pods_changed.clear()
            changed = await self.datapath.reconciler.set_many(self.policy.flow_changes())
            self.policy.installed()
        self.policy_applied += 1
        return changed

    # --- Services (the OpenFlow service proxy) ------------------------------------------------

    def set_service(self, key: str, obj: dict[str, Any] | None) -> None:
        """Raises UntranslatableService for a Service that cannot be programmed (its old flows stay)."""
        self._mark_services(self.services.set_service(key, obj))

    def set_endpoint_slice(self, key: str, obj: dict[str, Any] | None) -> None:
        self._mark_services(self.services.set_slice(key, obj))

    def _mark_services(self, keys: set[str]) -> None:
        if keys:
            self._services_dirty |= keys
            self._services_wake.set()

    def _proxy_enabled(self) -> bool:
        spec = self.datapath.local_config()
        return spec is not None and spec.service_proxy == ServiceProxy.OPENFLOW

    async def apply_services(self) -> int:
        """Program the Services that changed (all of them when the proxy mode flipped)."""
        self._services_wake.clear()
        enabled = self._proxy_enabled()
        if enabled:
            dirty = self._services_dirty | (self._programmed_services - self.services.services.keys())
        else:
            dirty = set(self._programmed_services)  # kube-proxy balances: remove ours
        self._services_dirty = set() if enabled else self._services_dirty | dirty
        if not dirty:
            return 0
        udp_before = {key: self._udp_backends.pop(key, set()) for key in dirty}
        programmed: dict[str, bool] = {}

        def translate(owner: Owner) -> tuple[list[Flow], list[Group]]:
            f, g = self.services.translate(owner.name) if enabled else ([], [])
            programmed[owner.name] = bool(f)
            return f, g

        try:
            # Translated one by one as ovs-ofctl takes them in (a full sync of 10k Services
            # overlaps its translation with ovs-ofctl's parsing). The cyclic collector is off:
            # the 100k+ objects built have no cycles, it would only rescan them.
            with paused_gc():
                owners = [Owner(Category.SERVICE, key) for key in sorted(dirty)]
                changed = await self.datapath.reconciler.set_streamed(owners, translate)
        except BaseException:
            if enabled:
                self._services_dirty |= dirty  # OVS refused the bundle: try them again
            for key, before in udp_before.items():
                if before:
                    self._udp_backends[key] = before
            raise
        cluster_ports, local_ports = self.services.node_ports() if enabled else (set(), set())
        await asyncio.to_thread(self.datapath.host.ensure_nodeports, NODEPORT_VIP, cluster_ports, local_ports)
        await self.health.sync(self.services.health_checks() if enabled else {})
        # UDP has no end: without this a client keeps its conntrack entry to a removed endpoint.
        for key in dirty:
            now = self.services.udp_backends(key) if enabled else set()
            if now:
                self._udp_backends[key] = now
            for frontend, port, endpoint, endpoint_port in sorted(udp_before[key] - now):
                await self.datapath.flush_udp_conntrack(frontend, port, endpoint, endpoint_port)
        for key in dirty:
            if programmed[key]:
                self._programmed_services.add(key)
            else:
                self._programmed_services.discard(key)
        self.services_applied += 1
        return changed

    async def _service_loop(self, settle: float = 0.01) -> None:
        while True:
            await self._services_wake.wait()
            await asyncio.sleep(settle)
            try:
                await self.apply_services()
            except Exception:
                log.exception("programming Services failed; will retry")
                await asyncio.sleep(1.0)
                self._services_wake.set()

    async def _policy_loop(self, settle: float = 0.02) -> None:
        """Coalesce bursts of events (a namespace relabel touches many pods) into one recompute.
        Local pods change from the port watch too, so that event is awaited as well."""
        while True:
            dirty = asyncio.ensure_future(self._policy_dirty.wait())
            pods = asyncio.ensure_future(self.datapath.pods_changed.wait())
            try:
                await asyncio.wait({dirty, pods}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                dirty.cancel()
                pods.cancel()
            await asyncio.sleep(settle)
            try:
                await self.apply_policy()
            except Exception:
                log.exception("applying NetworkPolicy failed; will retry on the next change")
                await asyncio.sleep(1.0)
                self._policy_dirty.set()

    # --- warm start ------------------------------------------------------------------------

    async def warm_start(self) -> bool:
        """Take this node's policy inputs from the warm-start cache, if they give exactly the
        policy flows the previous agent left installed: then the new round can replace the old
        one at once, before the cluster-wide lists (seconds at scale) are in, and nothing in the
        datapath changes meanwhile; those lists follow as a normal update. Otherwise (no cache,
        unreadable, another node's, older than the flows): False, and of the cache only its
        conjunction ids are kept (those of the installed flows: fewer flows change later)."""
        path = self.settings.inputs_cache
        if not path:
            return False
        try:
            snapshot = await asyncio.to_thread(_read_cache, path)
        except FileNotFoundError:
            return False
        except Exception as exc:  # a damaged cache costs the warm start, nothing else
            log.warning("warm-start cache %s unreadable: %s", path, exc)
            return False
        if not self.policy.restore(snapshot):
            log.warning("warm-start cache %s is not this node's agent's; ignored", path)
            return False
        live = await self.datapath.ofctl.dump(category_filter(Category.POLICY))
        installed = {(f.table, f.priority, f.match, f.actions) for f in live}
        desired = self.policy.flows()
        # (flows are authored as OVS prints them; any that are not are compared canonicalised)
        other = [f for f in desired if (f.table, f.priority, f.match, f.actions) not in installed]
        canonical = installed & {(f.table, f.priority, f.match, f.actions) for f in desired}
        if other:
            canonical |= await asyncio.to_thread(self.datapath.reconciler.canonical, other)
        if canonical != installed or len(desired) != len(installed):
            log.info(
                "warm-start cache %s differs from the installed policy flows (%d vs %d): listing first",
                path, len(canonical), len(installed),
            )  # fmt: skip
            self.policy.replace([], [], [])
            return False
        self.warm = True
        log.info("warm start: %d policy flows from %s, as installed", len(installed), path)
        return True

    async def save_inputs(self) -> None:
        """Write the cache (atomically): the inputs of the policy flows installed last."""
        await asyncio.to_thread(_write_cache, self.settings.inputs_cache, self.policy.snapshot())

    async def _save_inputs_loop(self, quiet: float = 2.0, spacing: float = 10.0) -> None:
        """Save once the inputs have been installed and stayed unchanged for ``quiet`` seconds, at
        most every ``spacing`` seconds (pickling a 50k-pod cluster's inputs, 4 MB, holds the
        interpreter for ~0.15 s)."""
        saved, last = -1, -spacing
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(quiet)
            if not self._inputs_ready.is_set() or self._policy_dirty.is_set() or saved == self.policy_applied:
                continue
            if loop.time() - last < spacing:
                continue
            last = loop.time()
            applied = self.policy_applied
            try:
                await self.save_inputs()
            except Exception as exc:
                log.warning("writing the warm-start cache failed: %s", exc)
                continue
            saved = applied

    # --- NetworkPolicy statistics -------------------------------------------------------------

    async def read_policy_stats(self) -> dict[tuple[bool, int], RuleCounters]:
        """Read the rule counter flows once: :attr:`rule_stats` and the Prometheus counters."""
        ofctl = self.datapath.ofctl
        text = "".join(
            [
                await ofctl.dump_with_stats(f"table={int(t)}")
                for t in (Table.EGRESS_METRIC, Table.INGRESS_METRIC)
            ]
        )
        flows = parse_counter_flows(text)
        refs = {rule: RuleRef.parse(name) for rule, name in self.policy.table.rules().items()}
        metrics.record_rule_counters(self._rule_deltas.update(flows), refs)
        gone = {rule: ref for rule, ref in self._counted_rules.items() if rule not in refs}
        metrics.forget_rules(gone.values())
        self._counted_rules = refs
        self.rule_stats = rule_counters(flows)
        return self.rule_stats

    async def _policy_stats_loop(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.read_policy_stats()
            except Exception as exc:
                log.warning("reading NetworkPolicy rule counters failed: %s", exc)


class _PolicyNames:
    """Names for the audit log, from the agent's state."""

    def __init__(self, agent: NodeAgent) -> None:
        self.agent = agent

    def rule(self, rule: int) -> RuleRef | None:
        name = self.agent.policy.table.rules().get(rule)
        return RuleRef.parse(name) if name else None

    def pod(self, ip: str) -> str | None:
        return next((f"{p.namespace}/{p.name}" for p in self.agent.datapath.local_pods() if p.ip == ip), None)

    def isolating(self, ip: str, ingress: bool) -> list[str]:
        return self.agent.policy.table.audited_policies(ip, ingress)


def _read_cache(path: str) -> tuple[object, ...]:
    # The cache is written by this agent only, as root, in a directory only root can write
    # (the chart's /var/run/k-vswitch): unpickling it trusts no one else.
    with open(path, "rb") as f:
        data = pickle.load(f)
    if not isinstance(data, tuple):
        raise ValueError("not a snapshot")
    return data


def _write_cache(path: str, snapshot: tuple[object, ...]) -> None:
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        pickle.dump(snapshot, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)
