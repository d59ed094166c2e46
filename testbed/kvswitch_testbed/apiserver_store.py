"""The bottom layer of the fake API server: the object store and its change feed.

One dict of live objects per resource, indexes by uid and by owner uid, a global resourceVersion,
the watch cache (a bounded log of changes) and the subscribers it fans out to. Every write of every
layer above goes through :meth:`Store._commit`; all of it is synchronous and runs in the server's
event loop, which makes each store operation atomic for watchers.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import collections
import copy
import heapq
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
    # Per resource: the live keys in list order, kept sorted on every create and delete (a page of a
    # paginated list is found by bisection instead of sorting every object for every page).
    _order: dict[kmock.resource, list[Key]] = attrs.field(factory=dict, init=False)
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
        live = self._live[spec.ref]
        return [(key, obj) for key in self._ordered(spec.ref) if flt(obj := live[key])]

    def _ordered(self, ref: kmock.resource) -> list[Key]:
        """The live keys of a resource in list order (namespace, then name)."""
        order = self._order.get(ref)
        live = self._live[ref]
        if order is None or len(order) != len(live):  # first use, or a resource dropped wholesale
            order = self._order[ref] = sorted(live, key=_list_order)
        return order

    def list_objects(
        self, spec: ResourceSpec, ns: str | None, params: Mapping[str, str] | None = None
    ) -> JSON:
        """A list, or one page of it (``limit``, ``continue``) as kube-apiserver serves it: every page
        of a paginated list comes from the same snapshot, the first page's resourceVersion (changes
        since then are undone from the watch cache); a continue token older than the watch cache is
        410 Expired, and the client has to list from the start."""
        params = params or {}
        flt = self._filter(spec, ns, None, params)
        try:
            limit = int(params.get("limit") or 0)
        except ValueError:
            raise error(400, "BadRequest", "limit must be an integer") from None
        snapshot, after = self._rv, None
        if token := params.get("continue"):
            try:
                rv, after_ns, after_name = json.loads(base64.urlsafe_b64decode(token))
                snapshot, after = int(rv), (str(after_ns), str(after_name))
            except (ValueError, TypeError):
                raise error(400, "BadRequest", "invalid continue token") from None
        if snapshot > self._rv:
            raise error(400, "BadRequest", "invalid continue token")
        items, more = self._page(spec, flt, snapshot, after, limit)
        meta: JSON = {"resourceVersion": str(snapshot)}
        if more is not None:
            last = items[-1][0]
            meta["continue"] = base64.urlsafe_b64encode(
                json.dumps([snapshot, last[0] or "", last[1]]).encode()
            ).decode()
            if not (params.get("labelSelector") or params.get("fieldSelector")):
                meta["remainingItemCount"] = more  # kube-apiserver leaves it out for selective lists
        return {
            "kind": f"{spec.kind}List",
            "apiVersion": spec.api_version,
            "metadata": meta,
            "items": [o for _, o in items],
        }

    def _page(
        self, spec: ResourceSpec, flt: Filter, snapshot: int, after: tuple[str, str] | None, limit: int
    ) -> tuple[list[tuple[Key, JSON]], int | None]:
        """The objects matching ``flt`` as of ``snapshot``, in list order after the key ``after``: at
        most ``limit`` of them (0: all), and how many objects (matching or not) follow when more do."""
        live = self._live[spec.ref]
        past: dict[Key, JSON | None] = {}  # the objects changed since the snapshot, as they were then
        if snapshot < self._rv:
            oldest = self._log[0].rv if self._log else self._rv + 1
            if snapshot + 1 < oldest:
                raise error(
                    410,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list result. "
                    "You can start a new list without the continue parameter.",
                )
            for change in reversed(self._log):
                if change.rv <= snapshot:
                    break
                if change.ref == spec.ref:
                    meta = change.obj["metadata"]
                    past[(meta.get("namespace") if spec.namespaced else None, meta["name"])] = change.old
        order = self._ordered(spec.ref)
        start = 0 if after is None else bisect.bisect_right(order, after, key=_list_order)
        gone = sorted((k for k in past if k not in live and (after is None or _list_order(k) > after)),
                      key=_list_order)  # fmt: skip
        rest = (order[i] for i in range(start, len(order)))
        keys = heapq.merge(rest, gone, key=_list_order)
        items: list[tuple[Key, JSON]] = []
        for n, key in enumerate(keys):
            obj = past[key] if key in past else live[key]
            if obj is None or not flt(obj):
                continue
            if limit > 0 and len(items) == limit:  # the rest as of the snapshot (its count estimated)
                newer = sum(
                    1
                    for k, was in past.items()
                    if was is None and k in live and _list_order(k) >= _list_order(key)
                )
                return items, len(order) - start + len(gone) - n - newer
            items.append((key, obj))
        return items, None

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
            self._unorder(spec.ref, key)
            self._uids.pop(old["metadata"].get("uid", ""), None)
            stored = final
        else:
            assert obj is not None
            obj["metadata"]["resourceVersion"] = str(rv)
            if old is None and (order := self._order.get(spec.ref)) is not None:
                bisect.insort(order, key, key=_list_order)
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

    def _unorder(self, ref: kmock.resource, key: Key) -> None:
        order = self._order.get(ref)
        if order is not None:
            i = bisect.bisect_left(order, _list_order(key), key=_list_order)
            if i < len(order) and order[i] == key:
                del order[i]

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


def _list_order(key: Key) -> tuple[str, str]:
    return (key[0] or "", key[1])
