"""Deletions a watch never reports, found by listing again: for the kinds kopf watches
(VSwitchConfigs, Services, EndpointSlices); the informers of Pods, Namespaces and NetworkPolicies
find their own (kvswitch.handlers.informer).

kopf resumes a broken watch from its last resourceVersion, and the API server replays what happened
meanwhile. When it cannot (410 Gone: a restarted API server starts with an empty watch cache, or
the version was compacted away), kopf lists the resource again and watches on from there: objects
created or changed meanwhile arrive as listing events (type None), but an object deleted meanwhile
simply is not in the list, and no DELETED event ever comes for it. The agent would keep its flows
(a deleted Service's flows, a deleted node's tunnel route) for good. The
same gap exists between the agent's own start-up lists and kopf's first listing.

So: every object the agent learns about is recorded with a sequence number (:class:`KnownObjects`);
a listing event (type None) after start-up means kopf listed again, and :class:`RelistSweeper`
then lists every resource itself and feeds a deletion for each known object missing from that list
(the same path as a DELETED event). An object that an event touched after the sweep's list request
went out is left alone: the list may predate it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

Stub = dict[str, Any]  # what a deletion needs of an object: its metadata names and spec.nodeName


def key_of(obj: Mapping[str, Any]) -> str:
    meta = obj["metadata"]
    return f"{meta.get('namespace') or ''}/{meta['name']}"


def stub_of(obj: Mapping[str, Any]) -> Stub:
    meta = obj["metadata"]
    stub: Stub = {"metadata": {k: meta[k] for k in ("name", "namespace", "uid") if meta.get(k)}}
    node = (obj.get("spec") or {}).get("nodeName")
    if node:
        stub["spec"] = {"nodeName": node}
    return stub


class KnownObjects:
    """Per resource kind: every object the agent holds, with the sequence number of its last event."""

    def __init__(self) -> None:
        self._seq = 0
        self._known: dict[str, dict[str, tuple[int, Stub]]] = {}

    def record(self, kind: str, obj: Mapping[str, Any], deleted: bool) -> None:
        self._seq += 1
        objects = self._known.setdefault(kind, {})
        if deleted:
            objects.pop(key_of(obj), None)
        else:
            objects[key_of(obj)] = (self._seq, stub_of(obj))

    def mark(self) -> int:
        """The current sequence number: take it before a list request goes out."""
        return self._seq

    def take_missing(self, kind: str, listed: Iterable[str], mark: int) -> list[Stub]:
        """Forget and return the objects of ``kind`` that a list (requested at ``mark``) lacks and
        that no event touched since."""
        objects = self._known.get(kind, {})
        present = set(listed)
        gone = [key for key, (seq, _) in objects.items() if key not in present and seq <= mark]
        return [objects.pop(key)[1] for key in gone]

    def keys(self, kind: str) -> set[str]:
        return set(self._known.get(kind, {}))


@dataclass
class Kind:
    """How to list one resource (plain objects) and how to feed the deletion of one of them."""

    list: Callable[[], Awaitable[list[dict[str, Any]]]]
    forget: Callable[[Stub], Awaitable[None]]


class RelistSweeper:
    """Runs a sweep of every kind ``delay`` seconds after :meth:`trigger` (a burst of listing events,
    and the other resources' watches listing again at about the same time, make one sweep); a
    trigger during a sweep makes one more."""

    def __init__(self, known: KnownObjects, kinds: Mapping[str, Kind], delay: float = 0.3) -> None:
        self.known = known
        self.kinds = dict(kinds)
        self.delay = delay
        self.sweeps = 0
        self._task: asyncio.Task[None] | None = None
        self._again = False

    def trigger(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="relist sweep")
        else:
            self._again = True

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.delay)
            self._again = False
            try:
                await self.sweep()
            except Exception:
                log.exception("sweeping for objects deleted while a watch was away failed")
            if not self._again:
                return

    async def sweep(self) -> int:
        """List every kind (at once: a busy API server answers them together); feed a deletion for
        each known object gone from the API. Returns how many."""
        mark = self.known.mark()
        lists = await asyncio.gather(*(how.list() for how in self.kinds.values()))
        forgotten = 0
        for (kind, how), objects in zip(self.kinds.items(), lists, strict=True):
            for stub in self.known.take_missing(kind, [key_of(obj) for obj in objects], mark):
                log.info("%s %s was deleted while its watch was away", kind, key_of(stub))
                await how.forget(stub)
                forgotten += 1
        self.sweeps += 1
        return forgotten

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
