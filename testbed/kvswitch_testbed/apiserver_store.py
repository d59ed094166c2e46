"""The bottom layer of the fake API server: the object store and its change feed.

One dict of live objects per resource, indexes by uid and by owner uid, a global resourceVersion,
the watch cache (a bounded log of changes) and the subscribers it fans out to. Every write of every
layer above goes through :meth:`Store._commit`; all of it is synchronous and runs in the server's
event loop, which makes each store operation atomic for watchers.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import copy
import json
from collections.abc import Iterator, Mapping

import attrs
import kmock

from kvswitch_testbed.apiserver_selectors import FieldSelector, LabelSelector, SelectorError
from kvswitch_testbed.apiserver_types import (
    EVENT_RESOURCES,
    JSON,
    Change,
    Filter,
    Key,
    ResourceLike,
    ResourceSpec,
    Watcher,
    error,
    not_found,
    version_priority,
)


@attrs.define(kw_only=True)
class Store(kmock.KubernetesEmulator):
    """Live objects, their history in KMock's ``objects``, the watch cache and its subscribers."""

    watch_cache_size: int = 10_000  # events kept for resuming watches; older resourceVersions get 410
    max_history: int = 50  # versions kept per object in ``objects`` (KMock keeps all)

    _rv: int = attrs.field(default=0, init=False)
    _live: dict[kmock.resource, dict[Key, JSON]] = attrs.field(
        factory=lambda: collections.defaultdict(dict), init=False
    )
    _uids: dict[str, tuple[kmock.resource, Key]] = attrs.field(factory=dict, init=False)
    _dependents: dict[str, set[str]] = attrs.field(factory=lambda: collections.defaultdict(set), init=False)
    _specs: dict[kmock.resource, ResourceSpec] = attrs.field(factory=dict, init=False)
    _log: collections.deque[Change] = attrs.field(init=False)
    _watchers: set[Watcher] = attrs.field(factory=set, init=False)

    @_log.default
    def _new_log(self) -> collections.deque[Change]:
        return collections.deque(maxlen=self.watch_cache_size)

    # ---------------------------------------------------------------- resources

    def _get_resources(self) -> list[kmock.resource]:
        # Only declared resources: KMock also lists those of stored objects, incl. deleted CRDs'.
        return kmock.KubernetesScaffold._get_resources(self)

    def spec(self, resource: ResourceLike) -> ResourceSpec:
        """Resolve ``v1/pods``, ``pods``, ``Pod``, ``vsc``, ``vswitchconfigs.kvswitch.io``..."""
        wanted = resource if isinstance(resource, kmock.resource) else kmock.resource(resource)
        name = (wanted.plural or "").lower()
        candidates = []
        for res in self._get_resources():
            if (wanted.group is not None and res.group != wanted.group) or (
                wanted.version is not None and res.version != wanted.version
            ):
                continue
            info = self.resources[res]
            aliases = {res.plural, (info.kind or "").lower(), info.singular, *info.shortnames}
            if name in aliases:
                candidates.append(res)
        if len(candidates) > 1:  # prefer the core group, then the preferred version
            core = [c for c in candidates if c.group == ""]
            candidates = core or candidates
            groups = {c.group for c in candidates}
            if len(groups) == 1:
                candidates = sorted(
                    candidates, key=lambda c: version_priority(c.version or ""), reverse=True
                )[:1]
        if len(candidates) != 1:
            problem = "ambiguous" if candidates else "unknown"
            raise ValueError(f"{problem} resource {resource!r}: {sorted(map(repr, candidates))}")
        return self._spec_for(candidates[0])

    def _spec_for(self, ref: kmock.resource) -> ResourceSpec:
        ref = kmock.resource(group=ref.group or "", version=ref.version, plural=ref.plural)
        if ref in self._specs:
            return self._specs[ref]
        if ref not in self.resources:
            raise not_found()
        info = self.resources[ref]
        spec = ResourceSpec(
            ref=ref,
            kind=info.kind or (ref.plural or "").capitalize(),
            namespaced=bool(info.namespaced),
            status_subresource="status" in info.subresources,
        )
        self._specs[ref] = spec
        return spec

    # ---------------------------------------------------------------- reads

    def _next_rv(self) -> int:
        self._rv += 1
        return self._rv

    def lookup(self, spec: ResourceSpec, ns: str | None, name: str) -> JSON | None:
        """The stored object (shared, not a copy), or None."""
        return self._live[spec.ref].get((ns if spec.namespaced else None, name))

    def _get(self, spec: ResourceSpec, ns: str | None, name: str) -> JSON:
        obj = self.lookup(spec, ns, name)
        if obj is None:
            raise error(
                404,
                "NotFound",
                f'{spec.qualified} "{name}" not found',
                name=name,
                group=spec.group,
                kind=spec.plural,
            )
        return obj

    def read_object(self, spec: ResourceSpec, ns: str | None, name: str) -> JSON:
        return self._get(spec, ns, name)

    def _filter(
        self, spec: ResourceSpec, ns: str | None, name: str | None, params: Mapping[str, str]
    ) -> Filter:
        try:
            return Filter(
                namespace=ns if spec.namespaced else None,
                name=name,
                labels=LabelSelector.parse(params.get("labelSelector", "")),
                fields=FieldSelector.parse(params.get("fieldSelector", "")),
            )
        except SelectorError as e:
            raise error(400, "BadRequest", str(e)) from None

    def _matching(self, spec: ResourceSpec, flt: Filter) -> list[tuple[Key, JSON]]:
        items = [(key, obj) for key, obj in self._live[spec.ref].items() if flt(obj)]
        return sorted(items, key=lambda kv: (kv[0][0] or "", kv[0][1]))

    def list_objects(
        self, spec: ResourceSpec, ns: str | None, params: Mapping[str, str] | None = None
    ) -> JSON:
        params = params or {}
        items = self._matching(spec, self._filter(spec, ns, None, params))
        meta: JSON = {"resourceVersion": str(self._rv)}
        if token := params.get("continue"):
            try:
                after = tuple(json.loads(base64.urlsafe_b64decode(token)))
            except ValueError:
                raise error(400, "BadRequest", "invalid continue token") from None
            items = [(k, o) for k, o in items if ((k[0] or ""), k[1]) > after]
        try:
            limit = int(params.get("limit") or 0)
        except ValueError:
            raise error(400, "BadRequest", "limit must be an integer") from None
        if limit > 0 and len(items) > limit:
            last = items[limit - 1][0]
            meta["continue"] = base64.urlsafe_b64encode(
                json.dumps([last[0] or "", last[1]]).encode()
            ).decode()
            meta["remainingItemCount"] = len(items) - limit
            items = items[:limit]
        return {
            "kind": f"{spec.kind}List",
            "apiVersion": spec.api_version,
            "metadata": meta,
            "items": [o for _, o in items],
        }

    def _all_live(self) -> Iterator[tuple[ResourceSpec, Key, JSON]]:
        for ref, objs in list(self._live.items()):
            if ref in self._specs or ref in self.resources:
                spec = self._spec_for(ref)
                for key, obj in list(objs.items()):
                    yield spec, key, obj

    # ---------------------------------------------------------------- the single write path

    def _commit(self, spec: ResourceSpec, key: Key, kind: str, obj: JSON | None) -> JSON:
        """Store a new state (or the deletion), log it and fan it out to watchers: the single write path."""
        live = self._live[spec.ref]
        old = live.get(key)
        rv = self._next_rv()
        self._index_owners(old, add=False)
        if kind == "DELETED":
            final = copy.deepcopy(obj if obj is not None else old)
            assert final is not None and old is not None
            final["metadata"]["resourceVersion"] = str(rv)
            del live[key]
            self._uids.pop(old["metadata"].get("uid", ""), None)
            stored = final
        else:
            assert obj is not None
            obj["metadata"]["resourceVersion"] = str(rv)
            live[key] = obj
            self._uids[obj["metadata"]["uid"]] = (spec.ref, key)
            self._index_owners(obj, add=True)
            stored = obj
        self._record(spec, key, None if kind == "DELETED" else stored)
        change = Change(rv, spec.ref, kind, stored, old)
        self._log.append(change)
        for watcher in self._watchers:
            if watcher.ref == spec.ref:
                watcher.queue.put_nowait(change)
        if kind == "DELETED":
            self._after_delete(spec, stored)
        return stored

    def _after_delete(self, spec: ResourceSpec, obj: JSON) -> None:
        """Called once an object is gone from the store; the layers above extend it (with super())."""

    def _record(self, spec: ResourceSpec, key: Key, obj: JSON | None) -> None:
        """Mirror into KMock's ``objects`` so that its history assertions keep working."""
        okey = (spec.ref, key[0], key[1])
        if okey not in self.objects:
            if obj is not None:
                self.objects[okey] = obj
            return
        history = self.objects[okey].history
        history.append(obj)
        if spec.ref in EVENT_RESOURCES and obj is None:
            del self.objects[okey]
        elif len(history) > self.max_history:
            del history[: len(history) - self.max_history]

    def _index_owners(self, obj: JSON | None, *, add: bool) -> None:
        if obj is None:
            return
        uid = obj["metadata"].get("uid", "")
        for owner in obj["metadata"].get("ownerReferences") or []:
            if isinstance(owner, Mapping) and owner.get("uid"):
                if add:
                    self._dependents[owner["uid"]].add(uid)
                else:
                    self._dependents[owner["uid"]].discard(uid)

    # ---------------------------------------------------------------- subscribers

    def subscribe(
        self, resource: ResourceLike | ResourceSpec, queue: asyncio.Queue[Change | None] | None = None
    ) -> Watcher:
        """Receive every later change of a resource in ``watcher.queue`` (None: the server stops).

        For in-process controllers (see endpointslices.py, which shares one ``queue`` among several
        resources) and watch streams; call it in the server's loop and :meth:`unsubscribe` when done.
        """
        spec = resource if isinstance(resource, ResourceSpec) else self.spec(resource)
        watcher = Watcher(spec.ref, asyncio.Queue() if queue is None else queue)
        self._watchers.add(watcher)
        return watcher

    def unsubscribe(self, watcher: Watcher) -> None:
        self._watchers.discard(watcher)

    def reset_watch_cache(self) -> None:
        """Forget the change log, as a restarted kube-apiserver does (its watch cache starts empty at
        the current resourceVersion): a watch resuming from an older version gets 410 Gone and has to
        list again. The objects and their resourceVersions (etcd's part) stay."""
        self._log.clear()

    def close_watches(self) -> None:
        """End every watch stream cleanly (clients see EOF and reconnect): used at shutdown."""
        for watcher in self._watchers:
            watcher.queue.put_nowait(None)
