"""k-vswitchd: one per node, run standalone (``kopf run --standalone -m kvswitch.handlers.agent``).

Event handlers only (no finalizers, no state annotations): many agents watch the same objects and
none of them may block another's deletion. The node's own VSwitchConfig drives bridge, gateway,
tunnel and host routes; every other node's config becomes a tunnel route; Pods of this node tell
which attachments are gone; all Pods, Namespaces and NetworkPolicies feed the policy flows.

kopf watches the few objects (VSwitchConfigs, Services, EndpointSlices); the cluster's Pods,
Namespaces and NetworkPolicies, tens of thousands of them, come through lean informers instead
(kvswitch.handlers.informer: paginated lists, watches decoded line by line, no object kept).

While the API server is away the datapath stays as it is (only the CNI changes pods' own flows);
kopf, the informers and our own calls retry until it is back (kvswitch.kube), and objects deleted
meanwhile that no watch reports are found by listing again (kvswitch.handlers.relist for kopf's
kinds, the informers for theirs).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any, cast

import kopf

from kvswitch.config import GROUP, PLURAL, VERSION, AgentSettings, InvalidConfig, parse_spec
from kvswitch.handlers.informer import Informer
from kvswitch.handlers.relist import Kind, KnownObjects, RelistSweeper, Stub
from kvswitch.kube import VSwitchConfigs, api_client, list_objects, ride_out_api_outages
from kvswitch.node.agent import NodeAgent
from kvswitch.policy.model import NamespaceInfo, PodInfo, Policy
from kvswitch.services.model import UntranslatableService
from kvswitch.status import merge_condition, ready_condition

log = logging.getLogger(__name__)
SETTINGS = AgentSettings.from_env()
# The resources the agent follows (kopf or the informers watch them; start-up and relist sweeps
# list them).
VSWITCHCONFIGS, PODS, NAMESPACES = f"/apis/{GROUP}/{VERSION}/{PLURAL}", "/api/v1/pods", "/api/v1/namespaces"
NETWORKPOLICIES = "/apis/networking.k8s.io/v1/networkpolicies"
SERVICES, ENDPOINTSLICES = "/api/v1/services", "/apis/discovery.k8s.io/v1/endpointslices"
POD_LOOKUP_TIMEOUT = 2.0  # seconds: one GET of a pod for an ADD whose pod the watch has not brought
# Seconds between start-up attempts (kopf's default is 60): start-up fails when OVS is restarting.
STARTUP_RETRY = 2.0
CHUNK_SIZE = 500  # objects per page of kopf's own lists


@kopf.on.startup(backoff=STARTUP_RETRY)
async def start(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    report_slow_callbacks(os.environ.get("KVSWITCH_ASYNCIO_DEBUG_SLOW_MS"))
    # Pods are watched cluster-wide: NetworkPolicy peers live on every node.
    settings.posting.level = logging.WARNING
    settings.execution.max_workers = 4
    settings.watching.chunk_size = CHUNK_SIZE
    ride_out_api_outages(settings)
    api = await api_client()
    configs = VSwitchConfigs(api)
    agent = NodeAgent(SETTINGS)
    known = KnownObjects()
    feeds = PolicyFeeds(api, agent)
    memo.api, memo.configs, memo.agent, memo.known, memo.feeds = api, configs, agent, known, feeds
    memo.sweeper = relist_sweeper(api, agent, known)
    agent.pod_lookup = lambda namespace, name: read_pod(api, feeds.pods, namespace, name)
    try:
        await start_up(api, configs, agent, known, feeds)
    except BaseException:
        # kopf retries start-up from scratch, with a new agent: release what this attempt holds,
        # the CNI server's socket first (the next attempt's server refuses a live one, for ever).
        log.warning("start-up failed; releasing what it holds before kopf retries")
        for release in (memo.sweeper.close, feeds.stop, agent.stop, api.close):
            with contextlib.suppress(Exception):
                await release()
        raise


async def start_up(
    api: Any, configs: VSwitchConfigs, agent: NodeAgent, known: KnownObjects, feeds: PolicyFeeds
) -> None:
    # The start-up lists wait for the API (kvswitch.kube.call_api): the old round's flows stay.
    # The cluster's pods, namespaces and policies are listed meanwhile (the longest part).
    listing = asyncio.ensure_future(feeds.list_all())
    try:
        await agent.start()
        # Apply every known config before the old flow round is removed: no window without routes.
        for obj in await configs.list():
            known.record(VSWITCHCONFIGS, obj, deleted=False)
            await apply_config(agent, configs, obj)
        # Policies before the old round goes: a restarted agent never opens an isolated pod. Its
        # warm-start cache, when it gives exactly the policy flows installed, keeps them as they
        # are while the lists come; otherwise the lists come first.
        if not await agent.warm_start():
            await listing
            feeds.load()
        await agent.sync_ports()
        await agent.apply_policy()
        # Services too: established connections through a Service keep their endpoints' flows.
        await load_services(api, agent, known)
        await agent.apply_services()
        await agent.finish_startup()
        if agent.warm:
            await listing  # the cluster as it is now: what changed since comes in as one update
            feeds.load()
    finally:
        listing.cancel()
    feeds.start()  # watched from the versions listed: nothing since is missed


async def read_pod(api: Any, pods: Informer, namespace: str, name: str) -> PodInfo | None:
    """One GET of a pod, for an ADD whose pod the watch has not brought yet (no retries: the ADD
    waits for it); held by the pod informer as if listed, so its next list finds the pod's
    deletion too."""
    from kubernetes_asyncio import client

    try:
        obj = await api.call_api(
            f"/api/v1/namespaces/{namespace}/pods/{name}",
            "GET",
            header_params={"Accept": "application/json"},
            response_types_map={200: "object"},
            auth_settings=["BearerToken"],
            _return_http_data_only=True,
            _request_timeout=POD_LOOKUP_TIMEOUT,
        )
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise
    pods.record(obj)
    return PodInfo.parse(obj)


def relist_sweeper(api: Any, agent: NodeAgent, known: KnownObjects) -> RelistSweeper:
    """Deletions for kopf's kinds' objects that vanished while a watch was away (see
    kvswitch.handlers.relist); the informers find their own."""

    def lister(path: str) -> Any:
        return lambda: list_objects(api, path)

    async def forget_config(stub: Stub) -> None:
        await agent.set_remote(stub["metadata"]["name"], None)

    async def forget_service(stub: Stub) -> None:
        _service(agent, stub, deleted=True)

    async def forget_slice(stub: Stub) -> None:
        agent.set_endpoint_slice(_key(stub), None)

    kinds = {
        VSWITCHCONFIGS: Kind(lister(VSWITCHCONFIGS), forget_config),
        SERVICES: Kind(lister(SERVICES), forget_service),
        ENDPOINTSLICES: Kind(lister(ENDPOINTSLICES), forget_slice),
    }
    return RelistSweeper(known, kinds)


def _seen(memo: kopf.Memo, kind: str, event: kopf.RawEvent) -> None:
    """Record an event; a listing event (type None) means kopf listed again: sweep for deletions."""
    memo.known.record(kind, cast(dict[str, Any], event["object"]), event["type"] == "DELETED")
    if event["type"] is None:
        memo.sweeper.trigger()


async def load_services(api: Any, agent: NodeAgent, known: KnownObjects) -> None:
    for service in await list_objects(api, SERVICES):
        known.record(SERVICES, service, deleted=False)
        _service(agent, service, deleted=False, warn=False)
    for eps in await list_objects(api, ENDPOINTSLICES):
        known.record(ENDPOINTSLICES, eps, deleted=False)
        agent.set_endpoint_slice(_key(eps), eps)


def report_slow_callbacks(ms: str | None) -> None:
    """With ``ms`` set (tests: KVSWITCH_ASYNCIO_DEBUG_SLOW_MS=100), asyncio's debug mode on this
    loop only: it logs "Executing <callback> took N seconds" for whatever holds the loop that long
    (this loop also serves CNI calls, so nothing on it may block)."""
    if ms:
        loop = asyncio.get_running_loop()
        loop.set_debug(True)
        loop.slow_callback_duration = int(ms) / 1000


class PolicyFeeds:
    """The cluster's Pods, Namespaces and NetworkPolicies into the agent's policy inputs, through
    one informer each; this node's pods also to the datapath (which attachments are gone), in order
    and off the watch's path (a deletion awaits a port sync)."""

    def __init__(self, api: Any, agent: NodeAgent) -> None:
        self.agent = agent
        self.pods = Informer(api, PODS, self._pod)
        self.namespaces = Informer(api, NAMESPACES, self._namespace)
        self.policies = Informer(api, NETWORKPOLICIES, self._policy)
        self.informers = (self.pods, self.namespaces, self.policies)
        self.local: set[str] = set()  # keys of this node's pods
        self._local_changes: asyncio.Queue[tuple[str, str, bool]] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        # While loading: the parsed inputs, handed to the agent at once (replace_policy_inputs).
        self._loading: tuple[list[PodInfo], list[NamespaceInfo], list[Policy]] | None = None

    async def list_all(self) -> None:
        """List all three (at once, page by page), parsed for :meth:`load`."""
        self._loading = ([], [], [])
        started, cpu = time.monotonic(), time.process_time()
        await asyncio.gather(*(informer.list_all() for informer in self.informers))
        pods, namespaces, policies = (len(inputs) for inputs in self._loading)
        log.info(
            "policy inputs: %d pods, %d namespaces, %d NetworkPolicies listed in %.1f s (%.1f s of CPU)",
            pods, namespaces, policies, time.monotonic() - started, time.process_time() - cpu,
        )  # fmt: skip

    def load(self) -> None:
        """Replace the agent's policy inputs with what :meth:`list_all` listed."""
        assert self._loading is not None
        inputs, self._loading = self._loading, None
        self.agent.replace_policy_inputs(*inputs)

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.create_task(self._local_pods(), name="local pod changes")
        for informer in self.informers:
            informer.start()

    async def stop(self) -> None:
        for informer in self.informers:
            await informer.stop()
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None

    def _pod(self, key: str, obj: dict[str, Any] | None) -> None:
        pod = None if obj is None else PodInfo.parse(obj)
        if self._loading is not None and pod is not None:
            self._loading[0].append(pod)
        else:
            self.agent.set_pod(key, pod)
        local = obj is not None and (obj.get("spec") or {}).get("nodeName") == SETTINGS.node_name
        if local:
            self.local.add(key)
        elif key not in self.local:
            return
        if self._loading is None:
            namespace, name = key.split("/", 1)
            self._local_changes.put_nowait((namespace, name, local))
        if not local:
            self.local.discard(key)

    async def _local_pods(self) -> None:
        while True:
            namespace, name, present = await self._local_changes.get()
            try:
                if present:
                    await self.agent.pod_present(namespace, name)
                else:
                    await self.agent.pod_deleted(namespace, name)
            except Exception:
                log.exception("pod %s/%s: telling the datapath failed", namespace, name)

    def _namespace(self, key: str, obj: dict[str, Any] | None) -> None:
        ns = None if obj is None else NamespaceInfo.parse(obj)
        if self._loading is not None and ns is not None:
            self._loading[1].append(ns)
        else:
            self.agent.set_namespace(key.lstrip("/"), ns)

    def _policy(self, key: str, obj: dict[str, Any] | None) -> None:
        try:
            policy = None if obj is None else Policy.parse(obj)
        except (KeyError, ValueError, TypeError) as exc:
            log.error("NetworkPolicy %s cannot be parsed, ignoring it: %s", key, exc)
            return  # its previous version, if any, stays
        if self._loading is not None:
            if policy is not None:
                self._loading[2].append(policy)
        else:
            self.agent.set_policy(key, policy)


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    if "sweeper" in memo:
        await memo.sweeper.close()
    if "feeds" in memo:
        await memo.feeds.stop()
    if "agent" in memo:
        await memo.agent.stop()
    if "api" in memo:
        await memo.api.close()


async def apply_config(agent: NodeAgent, configs: VSwitchConfigs, obj: dict[str, Any]) -> None:
    """One VSwitchConfig: ours drives the node, the others become tunnel routes."""
    name = obj["metadata"]["name"]
    own = name == SETTINGS.node_name
    generation = obj["metadata"].get("generation")
    try:
        spec = parse_spec(obj.get("spec"))
    except InvalidConfig as exc:
        log.error("VSwitchConfig %s is invalid, keeping the datapath as it is: %s", name, exc)
        if own:
            kopf.warn(cast(kopf.Body, obj), reason="InvalidSpec", message=str(exc))
            await report(configs, obj, False, "InvalidSpec", f"not applied: {exc}", generation)
        return
    if not own:
        await agent.set_remote(name, spec)
        return
    if agent.is_applied(spec) and _ready_for(obj, generation):
        return
    try:
        mtu = await agent.apply_local(spec)
    except Exception as exc:
        await report(configs, obj, False, "ApplyFailed", str(exc), generation)
        raise
    message = (
        f"bridge {SETTINGS.bridge}, {spec.overlay_type.value} overlay from {spec.overlay_ip}, "
        f"gateway {spec.gateway_ip}, pod MTU {mtu}"
    )
    await report(configs, obj, True, "Applied", message, generation)


def _ready_for(obj: dict[str, Any], generation: int | None) -> bool:
    conds = (obj.get("status") or {}).get("conditions") or []
    return any(
        c.get("type") == "Ready" and c.get("status") == "True" and c.get("observedGeneration") == generation
        for c in conds
    )


async def report(
    configs: VSwitchConfigs, obj: dict[str, Any], ok: bool, reason: str, message: str, generation: int | None
) -> None:
    status = obj.get("status") or {}
    conditions = merge_condition(status.get("conditions"), ready_condition(ok, reason, message, generation))
    if conditions is None and (not ok or status.get("observedGeneration") == generation):
        return
    patch: dict[str, Any] = {"conditions": conditions or status.get("conditions")}
    if ok:
        patch["observedGeneration"] = generation or 0
    await configs.patch_status(obj["metadata"]["name"], patch)


@kopf.on.event(GROUP, VERSION, PLURAL)
async def vswitchconfig_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    _seen(memo, VSWITCHCONFIGS, event)
    obj = dict(cast(dict[str, Any], event["object"]))
    if event["type"] == "DELETED":
        await memo.agent.set_remote(obj["metadata"]["name"], None)
        return
    await apply_config(memo.agent, memo.configs, obj)


@kopf.on.event("", "v1", "services")
async def service_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    _seen(memo, SERVICES, event)
    _service(memo.agent, cast(dict[str, Any], event["object"]), event["type"] == "DELETED")


@kopf.on.event("discovery.k8s.io", "v1", "endpointslices")
async def endpointslice_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    _seen(memo, ENDPOINTSLICES, event)
    obj = cast(dict[str, Any], event["object"])
    memo.agent.set_endpoint_slice(_key(obj), None if event["type"] == "DELETED" else obj)


def _service(agent: NodeAgent, obj: dict[str, Any], deleted: bool, warn: bool = True) -> None:
    """An untranslatable Service is skipped with a warning Event; every other Service, and its own
    previous flows, stay as they are."""
    try:
        agent.set_service(_key(obj), None if deleted else obj)
    except UntranslatableService as exc:
        log.error("Service %s cannot be programmed, skipping it: %s", _key(obj), exc)
        if warn and SETTINGS.node_name:
            kopf.warn(
                cast(kopf.Body, obj), reason="ServiceNotProgrammed", message=f"{SETTINGS.node_name}: {exc}"
            )


def _key(obj: dict[str, Any]) -> str:
    meta = obj["metadata"]
    return f"{meta.get('namespace', '')}/{meta['name']}"
