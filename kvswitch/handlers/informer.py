"""A lean list-and-watch for the kinds the agent holds by the ten thousand: Pods, Namespaces and
NetworkPolicies of the whole cluster (kopf's per-object machinery costs ~2 ms of CPU an event and a
ResourceMemory an object; the agent's own part of an event is ~60 µs).

An :class:`Informer` lists its resource in pages (``limit``/``continue``; each page is decoded and
handed over object by object, then dropped) and watches from the list's resourceVersion with
bookmarks, decoding each event line as it arrives. It keeps no objects, only each one's key and
resourceVersion: enough to resume, and to find the deletions no watch reports.

* A watch that ends (the server's timeout, a proxy, a stream cut in the middle of an event) is
  resumed from the last resourceVersion at once: the API server replays what came since.
* 410 Gone (the version left the watch cache: a restarted API server, a compaction) or an
  expired continue token: list again. Objects whose resourceVersion did not change are not handed
  over again; objects held but missing from the new list are handed over as deleted. A key recorded
  from outside while that list runs (:meth:`Informer.record`, a GET of a pod) is not taken as gone.
* Every request rides out an API server that is away or failing (kvswitch.kube): transient
  failures are retried with short jittered backoffs, for ever; the handler keeps what it has.

The handler is synchronous (it updates the agent's in-memory model; slow work goes to a task of its
own) and is called with ``(key, object)`` for an object added or changed and ``(key, None)`` for one
deleted; a handler that raises is logged and the stream goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import Callable, Iterator
from typing import Any

from kubernetes_asyncio import client

from kvswitch.gc_pause import paused_gc
from kvswitch.kube import CONNECT_TIMEOUT, REQUEST_TIMEOUT, Backoffs, call_api

log = logging.getLogger(__name__)

Handler = Callable[[str, dict[str, Any] | None], None]

PAGE_SIZE = 500  # objects per list page: ~1.5 MB of pod JSON decoded at a time
# A watch silent this long (no event, no bookmark: kube-apiserver sends one a minute) is dropped and
# resumed: the connection may be dead without the kernel knowing.
INACTIVITY_TIMEOUT = 70.0
RECONNECT = 0.1  # seconds before a watch that ended is resumed
WATCH_TIMEOUT = (240, 360)  # seconds the server keeps a watch open (random: clients do not reconnect in step)


class Gone(Exception):
    """The resourceVersion is too old (410): list again."""


def key_of(obj: dict[str, Any]) -> str:
    meta = obj["metadata"]
    return f"{meta.get('namespace') or ''}/{meta['name']}"


class Informer:
    """List and watch one resource (``path``, e.g. ``/api/v1/pods``), feeding ``handler``."""

    def __init__(
        self, api: client.ApiClient, path: str, handler: Handler, page_size: int = PAGE_SIZE
    ) -> None:
        self.api, self.path, self.handler, self.page_size = api, path, handler, page_size
        self.held: dict[str, str] = {}  # key -> resourceVersion of every object handed over
        self.resource_version: str | None = None  # where the watch resumes; None: list first
        self.lists = 0  # complete lists so far
        self.watches = 0  # watch requests that got a stream
        self.events = 0  # watch events handed over
        self._touched: set[str] | None = None  # keys recorded from outside while a list runs
        self._task: asyncio.Task[None] | None = None

    # --- listing ------------------------------------------------------------------------------

    async def list_all(self) -> None:
        """List the resource (every page) and hand over what changed since the last list, and the
        deletions; sets where the watch starts. The first list hands over every object."""
        before, self._touched = self.held, set()
        try:
            while True:
                self.held = {key: before[key] for key in self._touched if key in before}
                try:
                    rv = await self._list_pages(before)
                    break
                except Gone:
                    log.info("list %s: the continue token expired; listing again", self.path)
            for key in before.keys() - self.held.keys() - self._touched:
                self._hand(key, None)
        finally:
            self._touched = None
        self.resource_version = rv
        self.lists += 1

    async def _list_pages(self, before: dict[str, str]) -> str:
        token, rv = "", ""
        page = asyncio.ensure_future(self._page(token))
        try:
            while True:
                body = await page
                meta = body.get("metadata") or {}
                rv = rv or str(meta.get("resourceVersion") or "")
                token = meta.get("continue") or ""
                if token:  # the next page is fetched while this one is handed over
                    page = asyncio.ensure_future(self._page(token))
                with paused_gc():  # what the handler builds: many objects, no cycles
                    for obj in body.get("items") or ():
                        key, version = key_of(obj), obj["metadata"].get("resourceVersion") or ""
                        self.held[key] = version
                        if before.get(key) != version or not version:
                            self._hand(key, obj)
                    del body
                if not token:
                    return rv
        finally:
            page.cancel()  # an error or a cancellation left the next page pending

    async def _page(self, token: str) -> dict[str, Any]:
        query = [("limit", str(self.page_size))] + ([("continue", token)] if token else [])

        async def get() -> dict[str, Any]:
            response = await self._request(query, REQUEST_TIMEOUT)
            try:
                data = await response.read()
            finally:
                response.release()
            with paused_gc():  # a page of 500 pods: ~100k objects, no cycles
                page: dict[str, Any] = json.loads(data)
            return page

        try:
            return await call_api(f"list {self.path}", get)
        except client.ApiException as exc:
            if exc.status == 410:
                raise Gone() from None
            raise

    async def _request(self, query: list[tuple[str, str]], timeout: Any) -> Any:
        """A GET whose body is read by the caller; a status other than 200 raises ApiException."""
        response = await self.api.call_api(
            self.path,
            "GET",
            query_params=query,
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
            _preload_content=False,
            _request_timeout=timeout,
        )
        self.api.last_response = None  # type: ignore[attr-defined]  # the client keeps its last response: not a 100 MB list
        if response.status != 200:
            try:
                body = await response.read()
            finally:
                response.release()
            exc = client.ApiException(status=response.status, reason=response.reason)
            exc.body, exc.headers = body, response.headers
            raise exc
        return response

    def record(self, obj: dict[str, Any]) -> None:
        """An object learnt from outside the watch (a GET): held like a listed one."""
        key = key_of(obj)
        self.held[key] = obj["metadata"].get("resourceVersion") or ""
        if self._touched is not None:
            self._touched.add(key)

    def _hand(self, key: str, obj: dict[str, Any] | None) -> None:
        try:
            self.handler(key, obj)
        except Exception:
            log.exception(
                "%s %s: handling the %s failed", self.path, key, "deletion" if obj is None else "object"
            )

    # --- watching -----------------------------------------------------------------------------

    def start(self) -> None:
        """Watch (and list again whenever needed) in a task of its own, until :meth:`stop`."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"informer {self.path}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        delays: Iterator[float] = iter(Backoffs())
        failures = 0
        while True:
            try:
                if self.resource_version is None:
                    await self.list_all()
                    log.info("listed %s: %d objects", self.path, len(self.held))
                if await self._watch():  # the stream was open: resume (kopf waits 0.1 s too)
                    delays, failures = iter(Backoffs()), 0
                    await asyncio.sleep(RECONNECT)
                    continue
            except asyncio.CancelledError:
                raise
            except Gone:
                log.info(
                    "watch %s: resourceVersion %s is gone; listing again", self.path, self.resource_version
                )
                self.resource_version = None
                continue
            except Exception as exc:
                failures += 1
                if failures == 1 or failures % 10 == 0:
                    log.warning("watch %s failed (%d in a row): %s", self.path, failures, _describe(exc))
            await asyncio.sleep(next(delays))

    async def _watch(self) -> bool:
        """One watch request from :attr:`resource_version`, its events handed over as they come.
        True once a stream was open (it ended, broke or went silent); raises what kept it from
        opening, and :class:`Gone`."""
        query = [
            ("watch", "true"),
            ("resourceVersion", self.resource_version or ""),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", str(random.randint(*WATCH_TIMEOUT))),
        ]
        try:
            response = await self._request(query, (CONNECT_TIMEOUT, INACTIVITY_TIMEOUT))
        except client.ApiException as exc:
            if exc.status == 410:
                raise Gone() from None
            raise
        self.watches += 1
        buffer = bytearray()
        try:
            async for chunk in response.content.iter_any():
                buffer += chunk
                start = 0
                while (end := buffer.find(b"\n", start)) >= 0:
                    line, start = buffer[start:end], end + 1
                    if line.strip():
                        self._event(json.loads(line))
                del buffer[:start]
        except (Gone, client.ApiException):  # an ERROR event
            raise
        except Exception as exc:  # broke, or went silent: resume from the last version
            log.info("watch %s ended: %s; resuming from %s", self.path, _describe(exc), self.resource_version)
        finally:
            response.release()
        return True

    def _event(self, event: dict[str, Any]) -> None:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise Gone()
            raise client.ApiException(status=obj.get("code") or 500, reason=obj.get("message"))
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if kind in ("ADDED", "MODIFIED"):
            key = key_of(obj)
            self.held[key] = version or ""
            self._hand(key, obj)
        elif kind == "DELETED":
            key = key_of(obj)
            self.held.pop(key, None)
            self._hand(key, None)
        elif kind != "BOOKMARK":
            log.warning("watch %s: unknown event type %r", self.path, kind)
            return
        self.events += kind != "BOOKMARK"
        if version:
            self.resource_version = version


def _describe(exc: BaseException) -> str:
    if isinstance(exc, client.ApiException):
        return f"HTTP {exc.status} {exc.reason}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
