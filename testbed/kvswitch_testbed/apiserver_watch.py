"""Watch streams as kube-apiserver serves them, from the store's watch cache.

Initial events (or none with ``sendInitialEvents=false``), resuming from a resourceVersion (410 Gone
once it left the cache), ``timeoutSeconds``, BOOKMARK events when allowed, the initial-events-end
bookmark of streaming lists, objects entering or leaving a selector as ADDED/DELETED, and one-row
Tables for ``kubectl get -w``. For fault injection, open streams can be armed to break in the middle
of their next event (:meth:`Watches.cut_watches`), as a dying proxy or API server would.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import aiohttp.web
import attrs
import kmock
import orjson

from kvswitch_testbed import apiserver_tables as tables
from kvswitch_testbed.apiserver_services import Services
from kvswitch_testbed.apiserver_types import JSON, Filter, ResourceLike, ResourceSpec, Watcher, error


@attrs.define(kw_only=True)
class Watches(Services):
    """Serves ``?watch=true`` requests."""

    bookmark_interval: float = 10.0  # seconds between BOOKMARK events on idle watches that allow them

    _streams: set[Watcher] = attrs.field(factory=set, init=False)  # the open watch streams' subscriptions
    _cut_armed: set[Watcher] = attrs.field(factory=set, init=False)  # streams to break at their next event
    cuts: int = attrs.field(default=0, init=False)  # streams broken mid-event so far

    def open_watches(self, resource: ResourceLike | None = None) -> int:
        """How many watch streams are open (of one resource, or of all)."""
        ref = None if resource is None else self.spec(resource).ref
        return sum(1 for w in self._streams if ref is None or w.ref == ref)

    def cut_watches(self, resource: ResourceLike | None = None) -> int:
        """Arm the open watch streams (of one resource, or all) to break in the middle of their next
        event: the first half of its line goes out, then the connection closes without ending the
        chunked body, so the client gets a truncated stream and that event only if it resumes from
        its last resourceVersion. Returns how many streams were armed."""
        ref = None if resource is None else self.spec(resource).ref
        armed = {w for w in self._streams if ref is None or w.ref == ref}
        self._cut_armed |= armed
        return len(armed)

    def disarm_cuts(self) -> None:
        self._cut_armed.clear()

    def _bookmark(self, spec: ResourceSpec) -> JSON:
        return {
            "kind": spec.kind,
            "apiVersion": spec.api_version,
            "metadata": {"resourceVersion": str(self._rv)},
        }

    def _backlog(
        self, spec: ResourceSpec, flt: Filter, params: Mapping[str, str]
    ) -> tuple[list[tuple[str, JSON]], JSON | None]:
        """Events a new watch gets before live ones: the initial state, or the log since its version."""
        since = params.get("resourceVersion") or ""
        initial = params.get("sendInitialEvents", "").lower() == "true"
        if since in ("", "0") or initial:
            if params.get("sendInitialEvents", "").lower() == "false":
                return [], None
            events = [("ADDED", obj) for _, obj in self._matching(spec, flt)]
            if initial:
                marker = self._bookmark(spec)
                marker["metadata"]["annotations"] = {"k8s.io/initial-events-end": "true"}
                events.append(("BOOKMARK", marker))
            return events, None
        try:
            rv = int(since)
        except ValueError:
            raise error(400, "BadRequest", f"invalid resource version: {since!r}") from None
        if rv >= self._rv:
            return [], None
        oldest = self._log[0].rv if self._log else self._rv + 1
        if rv + 1 < oldest:
            gone = {
                "apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure", "code": 410,
                "reason": "Expired", "message": f"too old resource version: {rv} ({oldest - 1})",
            }  # fmt: skip
            return [], gone
        events = []
        for change in self._log:
            if change.rv > rv and change.ref == spec.ref and (event := flt.event(change)):
                events.append(event)
        return events, None

    async def _serve_watch_stream(
        self, request: kmock.Request, spec: ResourceSpec, flt: Filter
    ) -> aiohttp.web.StreamResponse:
        params = request.params
        timeout = float(params.get("timeoutSeconds") or 0) or None
        bookmarks = params.get("allowWatchBookmarks", "").lower() == "true"
        # Synchronous: take the backlog and subscribe at the same instant, so no change is lost or doubled.
        backlog, gone = self._backlog(spec, flt, params)
        watcher = self.subscribe(spec)
        self._streams.add(watcher)
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout else None

        table = tables.wants_table(request.headers.get("Accept", ""))

        def line(kind: str, obj: JSON) -> bytes:
            if table and kind in ("ADDED", "MODIFIED", "DELETED"):  # kubectl get -w: one-row tables
                obj = spec.as_table([obj], {"resourceVersion": obj["metadata"]["resourceVersion"]}, params)
            return orjson.dumps({"type": kind, "object": obj}) + b"\n"  # compact, as apiserver_http

        try:
            assert request._raw_request is not None
            await response.prepare(request._raw_request)
            if gone is not None:
                await response.write(line("ERROR", gone))
                await response.write_eof()
                return response
            for kind, obj in backlog:
                await response.write(line(kind, obj))
            while True:
                wait = None if deadline is None else deadline - loop.time()
                if wait is not None and wait <= 0:
                    break
                if bookmarks:
                    wait = self.bookmark_interval if wait is None else min(wait, self.bookmark_interval)
                try:
                    change = await asyncio.wait_for(watcher.queue.get(), wait)
                except TimeoutError:
                    if bookmarks and (deadline is None or loop.time() < deadline):
                        await response.write(line("BOOKMARK", self._bookmark(spec)))
                    continue
                if change is None:
                    break
                if event := flt.event(change):
                    data = line(*event)
                    if watcher in self._cut_armed:
                        await self._cut(request, response, data)
                    await response.write(data)
            await response.write_eof()
        except ConnectionError:
            pass  # the client went away (or the stream was cut)
        finally:
            self.unsubscribe(watcher)
            self._streams.discard(watcher)
            self._cut_armed.discard(watcher)
        return response

    async def _cut(self, request: kmock.Request, response: aiohttp.web.StreamResponse, data: bytes) -> None:
        """Send half of an event line as a chunk of its own, then close the connection (its buffered
        bytes are flushed first) without the final chunk."""
        await response.write(data[: len(data) // 2])
        self.cuts += 1
        assert request._raw_request is not None
        transport = request._raw_request.transport
        if transport is not None:
            transport.close()
        raise ConnectionResetError("watch stream cut mid-event (fault injection)")
