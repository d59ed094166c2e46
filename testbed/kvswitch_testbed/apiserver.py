"""A stateful fake Kubernetes API server for the sandbox and end-to-end tests, built on KMock.

No kube-apiserver can run on our machines, so real kopf operators and kubernetes-asyncio clients talk
to this one instead. It subclasses KMock's ``KubernetesEmulator`` (discovery scaffold, bundled built-in
resources, object history for assertions, the request DSL for injecting faults) and replaces the
parts that real clients trip over: object metadata and resource versions, namespaces from URLs,
status subresources, PUT and the three PATCH flavours, selectors in list and watch, resumable
watches with bookmarks, finalizers, garbage collection, namespace draining, CRDs with schema
validation, Status errors with the codes clients branch on, and enough OpenAPI and server-side
Tables for kubectl (``create -f`` with server-side validation, ``get -o wide``, ``-w``).

README.md next to this file lays out the modules (one layer each) and lists what a real
kube-apiserver does that this one does not.

Usage, in asyncio::

    server = ApiServer(crds=["crds/kvswitch.io_vswitchconfigs.yaml"])
    url = await server.start()                     # http://127.0.0.1:PORT
    write_kubeconfig(tmp_path / "kubeconfig", url)
    ...
    await server.stop()

From synchronous code (a thread with its own loop)::

    with ApiServerThread(crds=[...]) as api:
        api.create("v1/nodes", {"metadata": {"name": "node-a"}})

Inside a node's network namespace (the agents reach the API over the simulated underlay)::

    url = await server.listen(host="10.250.0.1", port=6443, sock_factory=lambda: netns_socket("underlay"))

Outages and faults, for tests of clients that must ride them out (the store is never touched)::

    await server.pause()              # stopped: connections refused, open ones (watches too) dropped
    server.create(...)                # the cluster's state moves on meanwhile (etcd, another replica)
    await server.resume()             # same addresses, same data, an empty watch cache (410 Gone)
    server.fail_requests(429, retry_after=1)   # every request answered 429 (or 500...) until
    server.clear_faults()                      # ...this
    server.cut_watches()              # open watch streams break in the middle of their next event
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import os
import socket
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import aiohttp.web
import yaml

from kvswitch_testbed.apiserver_http import Emulator, Fault
from kvswitch_testbed.apiserver_types import JSON, ApiError, ResourceLike, ResourceSpec

__all__ = [
    "ApiError",
    "ApiServer",
    "ApiServerThread",
    "Emulator",
    "Fault",
    "ResourceSpec",
    "write_kubeconfig",
]

T = TypeVar("T")


def _bind_socket(host: str, port: int, sock: socket.socket | None) -> socket.socket:
    if sock is None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        bound = sock.getsockname()[1] != 0
    except OSError:
        bound = False
    if not bound:
        sock.bind((host, port))
    return sock


def _url_of(sock: socket.socket, host: str) -> str:
    addr, port = sock.getsockname()[:2]
    if addr in ("0.0.0.0", "::"):
        addr = host if host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    return f"http://[{addr}]:{port}" if ":" in addr else f"http://{addr}:{port}"


SocketFactory = Callable[[], socket.socket]


@dataclass
class _Listener:
    """One listening address; ``factory`` makes its socket again after a pause (e.g. in a netns)."""

    host: str
    port: int  # as bound
    factory: SocketFactory | None
    resumable: bool  # False for a bare socket given without a factory
    site: aiohttp.web.SockSite | None = None


class ApiServer:
    """The fake API server in the caller's event loop: one store, any number of listening sockets."""

    def __init__(
        self,
        *,
        crds: Iterable[Mapping[str, Any] | str | os.PathLike[str]] = (),
        kopf_peering: bool = True,
        **options: Any,
    ) -> None:
        """``options`` go to :class:`Emulator` (watch_cache_size, bookmark_interval, max_events, ...)."""
        self.emulator = Emulator(kopf_peering=kopf_peering, **options)
        for crd in crds:
            self.emulator.register_crd(crd)
        self._runner: aiohttp.web.ServerRunner | None = None
        self._listeners: list[_Listener] = []
        self._paused = False
        self.urls: list[str] = []

    @property
    def url(self) -> str:
        if not self.urls:
            raise RuntimeError("the API server is not listening")
        return self.urls[0]

    @property
    def errors(self) -> list[Exception]:
        """Unexpected server-side failures (answered with 500); a passing test expects none."""
        return self.emulator.failures

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[ApiServer]:
        """Started on loopback, stopped whatever happens, and (when the body passed) checked for
        unexpected server-side failures: the tests' fixture."""
        await self.start()
        try:
            yield self
            assert self.errors == [], self.errors
        finally:
            await self.stop()

    async def start(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        sock: socket.socket | None = None,
        sock_factory: SocketFactory | None = None,
    ) -> str:
        """Start serving; ``sock`` may come from ``netns_socket()`` (bound here to host:port if unbound)."""
        if self._runner is not None:
            raise RuntimeError("the API server is already started; use listen() for more sockets")
        await self.emulator.__aenter__()
        server = aiohttp.web.Server(self.emulator, handler_cancellation=True)
        self._runner = aiohttp.web.ServerRunner(server, shutdown_timeout=1.0)
        await self._runner.setup()
        return await self.listen(host, port, sock, sock_factory)

    async def listen(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        sock: socket.socket | None = None,
        sock_factory: SocketFactory | None = None,
    ) -> str:
        """Serve the same store on one more socket (e.g. the underlay address inside a netns).

        ``sock_factory`` makes an unbound socket (``lambda: netns_socket(ns)``): the first one now
        unless ``sock`` is given, a new one on every :meth:`resume`. A plain address needs neither.
        A bare ``sock`` without a factory cannot be served again after :meth:`pause`.
        """
        if self._runner is None:
            raise RuntimeError("the API server is not started")
        if sock is None and sock_factory is not None:
            sock = sock_factory()
        resumable = sock is None or sock_factory is not None
        bound = _bind_socket(host, port, sock)
        listener = _Listener(host, bound.getsockname()[1], sock_factory, resumable)
        if not self._paused:
            listener.site = await self._serve(bound)
        else:
            bound.close()
        self._listeners.append(listener)
        url = _url_of(bound, host)
        self.urls.append(url)
        return url

    async def _serve(self, sock: socket.socket) -> aiohttp.web.SockSite:
        assert self._runner is not None
        site = aiohttp.web.SockSite(self._runner, sock)
        await site.start()
        return site

    async def stop(self) -> None:
        if self._runner is None:
            return
        self.emulator.close_watches()
        await asyncio.sleep(0)
        await self._runner.cleanup()
        self._runner = None
        self._listeners.clear()
        self._paused = False
        self.urls.clear()
        await self.emulator.__aexit__(None, None, None)

    # ---------------------------------------------------------------- outages and faults

    @property
    def paused(self) -> bool:
        return self._paused

    async def pause(self) -> None:
        """Stop serving as a stopped kube-apiserver does: every listening socket is closed (clients
        get "connection refused") and every open connection, watch streams included, is dropped
        (TCP reset). The store and everything in it stays; it may be changed directly meanwhile."""
        if self._runner is None:
            raise RuntimeError("the API server is not started")
        if self._paused:
            return
        if not all(lst.resumable for lst in self._listeners):
            raise RuntimeError("a socket given to listen() without sock_factory cannot be served again")
        self._paused = True
        for lst in self._listeners:
            if lst.site is not None:
                await lst.site.stop()
                lst.site = None
        self.drop_connections()
        await asyncio.sleep(0)

    async def resume(self, *, keep_watch_cache: bool = False) -> None:
        """Serve again on the same addresses with the same store. By default the watch cache starts
        empty, as after a real restart: watches resuming from an older resourceVersion get 410 Gone
        and must list again. ``keep_watch_cache=True`` models a server that was only unreachable."""
        if self._runner is None:
            raise RuntimeError("the API server is not started")
        if not self._paused:
            return
        if not keep_watch_cache:
            self.emulator.reset_watch_cache()
        for lst in self._listeners:
            sock = lst.factory() if lst.factory is not None else None
            lst.site = await self._serve(_bind_socket(lst.host, lst.port, sock))
        self._paused = False

    def drop_connections(self) -> int:
        """Reset every open client connection (watch streams and idle keep-alive ones); returns how
        many. The server keeps listening: clients reconnect at once."""
        if self._runner is None or self._runner.server is None:
            return 0
        dropped = 0
        for conn in self._runner.server.connections:
            transport = conn.transport
            if transport is not None and not transport.is_closing():
                transport.abort()
                dropped += 1
        return dropped

    def fail_requests(self, status: int, retry_after: int | None = None) -> None:
        """From now on every request gets ``status`` (a kube-apiserver Status body; ``Retry-After``
        with ``retry_after``) until :meth:`clear_faults`. Open watch streams go on: drop them with
        :meth:`drop_connections` to make their clients meet the fault."""
        self.emulator.fault = Fault(status, retry_after)

    def clear_faults(self) -> None:
        """Requests are served again; streams armed by :meth:`cut_watches` are disarmed."""
        self.emulator.fault = None
        self.emulator.disarm_cuts()

    def cut_watches(self, resource: ResourceLike | None = None) -> int:
        """Arm the open watch streams (of one resource, or all) to break in the middle of their next
        event (half a line, then the connection closes); returns how many were armed."""
        return self.emulator.cut_watches(resource)

    def open_watches(self, resource: ResourceLike | None = None) -> int:
        """The number of open watch streams (of one resource, or all)."""
        return self.emulator.open_watches(resource)

    async def __aenter__(self) -> Self:
        if self._runner is None:
            await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # Direct store access for tests and the sandbox: same semantics as the HTTP API, no HTTP.
    # Call them in the server's loop (ApiServerThread marshals them there). Failures raise ApiError.
    # They return copies: stored objects are shared with watch streams and the history.

    def register_crd(self, crd: Mapping[str, Any] | str | os.PathLike[str]) -> list[ResourceSpec]:
        return self.emulator.register_crd(crd)

    def declare_resource(self, group: str, version: str, plural: str, **kwargs: Any) -> ResourceSpec:
        return self.emulator.declare_resource(group, version, plural, **kwargs)

    def create(self, resource: ResourceLike, body: Mapping[str, Any], namespace: str | None = None) -> JSON:
        return copy.deepcopy(self.emulator.create_object(self.emulator.spec(resource), body, namespace))

    def get(self, resource: ResourceLike, name: str, namespace: str | None = None) -> JSON | None:
        spec = self.emulator.spec(resource)
        return copy.deepcopy(self.emulator.lookup(spec, namespace, name))

    def list_objects(
        self,
        resource: ResourceLike,
        namespace: str | None = None,
        *,
        label_selector: str = "",
        field_selector: str = "",
    ) -> list[JSON]:
        params = {"labelSelector": label_selector, "fieldSelector": field_selector}
        listed = self.emulator.list_objects(self.emulator.spec(resource), namespace, params)
        items: list[JSON] = copy.deepcopy(listed["items"])
        return items

    def patch(
        self,
        resource: ResourceLike,
        name: str,
        patch: Any,
        namespace: str | None = None,
        *,
        subresource: str | None = None,
        patch_type: str = "merge",
    ) -> JSON:
        """``patch_type``: merge, json, strategic or apply."""
        content_type = {
            "merge": "application/merge-patch+json",
            "json": "application/json-patch+json",
            "strategic": "application/strategic-merge-patch+json",
            "apply": "application/apply-patch+yaml",
        }[patch_type]
        spec = self.emulator.spec(resource)
        result = self.emulator.patch_object(
            spec, namespace, name, patch, content_type, subresource=subresource
        )
        return copy.deepcopy(result)

    def replace(
        self,
        resource: ResourceLike,
        name: str,
        body: Mapping[str, Any],
        namespace: str | None = None,
        *,
        subresource: str | None = None,
    ) -> JSON:
        spec = self.emulator.spec(resource)
        return copy.deepcopy(
            self.emulator.replace_object(spec, namespace, name, body, subresource=subresource)
        )

    def delete(
        self,
        resource: ResourceLike,
        name: str,
        namespace: str | None = None,
        *,
        propagation: str = "Background",
    ) -> JSON | None:
        """Delete like the API does; returns the last state, or None if there was no such object."""
        spec = self.emulator.spec(resource)
        if self.get(spec.ref, name, namespace) is None:
            return None
        options = {"propagationPolicy": propagation}
        return copy.deepcopy(self.emulator.delete_object(spec, namespace, name, options=options))


class ApiServerThread:
    """:class:`ApiServer` in a thread with its own event loop, for synchronous code (CLI sandbox, sync tests).

    The helpers (create, get, list_objects, patch, replace, delete, register_crd, declare_resource)
    run in the server's loop and return when done, so a following watch or kopf handler sees them.
    """

    def __init__(self, **options: Any) -> None:
        """``options`` are those of :class:`ApiServer`; the server is built in its own loop's thread."""
        self._options = options
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: ApiServer | None = None

    @property
    def server(self) -> ApiServer:
        if self._server is None:
            raise RuntimeError("the API server thread is not started")
        return self._server

    @property
    def url(self) -> str:
        return self.server.url

    def start(
        self, host: str = "127.0.0.1", port: int = 0, sock: socket.socket | None = None, timeout: float = 30.0
    ) -> str:
        if self._thread is not None:
            raise RuntimeError("the API server thread is already started")
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=self._run, args=(loop,), name="fake-apiserver", daemon=True)
        self._thread.start()

        async def boot() -> str:
            self._server = ApiServer(**self._options)
            return await self._server.start(host, port, sock)

        try:
            return self.run(boot(), timeout)
        except BaseException:
            self.stop()
            raise

    @staticmethod
    def _run(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()

    def listen(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        sock: socket.socket | None = None,
        sock_factory: SocketFactory | None = None,
    ) -> str:
        return self.run(self.server.listen(host, port, sock, sock_factory))

    def pause(self) -> None:
        """See :meth:`ApiServer.pause`; the store helpers below keep working meanwhile."""
        self.run(self.server.pause())

    def resume(self, *, keep_watch_cache: bool = False) -> None:
        self.run(self.server.resume(keep_watch_cache=keep_watch_cache))

    def drop_connections(self) -> int:
        return self.call(self.server.drop_connections)

    def fail_requests(self, status: int, retry_after: int | None = None) -> None:
        self.call(self.server.fail_requests, status, retry_after)

    def clear_faults(self) -> None:
        self.call(self.server.clear_faults)

    def cut_watches(self, resource: ResourceLike | None = None) -> int:
        return self.call(self.server.cut_watches, resource)

    def open_watches(self, resource: ResourceLike | None = None) -> int:
        return self.call(self.server.open_watches, resource)

    def stop(self, timeout: float = 30.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            if self._server is not None and loop.is_running():
                self.run(self._server.stop(), timeout)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)
            self._loop = self._thread = self._server = None

    def __enter__(self) -> Self:
        if self._thread is None:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = 30.0) -> T:
        """Run a coroutine in the server's loop and wait for its result."""
        if self._loop is None:
            coro.close()
            raise RuntimeError("the API server thread is not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a plain function in the server's loop (store operations must run there)."""
        if self._loop is None:
            raise RuntimeError("the API server thread is not started")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def invoke() -> None:
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as e:
                future.set_exception(e)

        self._loop.call_soon_threadsafe(invoke)
        return future.result(30.0)

    def register_crd(self, crd: Mapping[str, Any] | str | os.PathLike[str]) -> list[ResourceSpec]:
        return self.call(self.server.register_crd, crd)

    def declare_resource(self, group: str, version: str, plural: str, **kwargs: Any) -> ResourceSpec:
        return self.call(self.server.declare_resource, group, version, plural, **kwargs)

    def create(self, resource: ResourceLike, body: Mapping[str, Any], namespace: str | None = None) -> JSON:
        return self.call(self.server.create, resource, body, namespace)

    def get(self, resource: ResourceLike, name: str, namespace: str | None = None) -> JSON | None:
        return self.call(self.server.get, resource, name, namespace)

    def list_objects(
        self, resource: ResourceLike, namespace: str | None = None, **selectors: str
    ) -> list[JSON]:
        return self.call(self.server.list_objects, resource, namespace, **selectors)

    def patch(
        self, resource: ResourceLike, name: str, patch: Any, namespace: str | None = None, **kwargs: Any
    ) -> JSON:
        return self.call(self.server.patch, resource, name, patch, namespace, **kwargs)

    def replace(
        self,
        resource: ResourceLike,
        name: str,
        body: Mapping[str, Any],
        namespace: str | None = None,
        **kwargs: Any,
    ) -> JSON:
        return self.call(self.server.replace, resource, name, body, namespace, **kwargs)

    def delete(
        self, resource: ResourceLike, name: str, namespace: str | None = None, **kwargs: Any
    ) -> JSON | None:
        return self.call(self.server.delete, resource, name, namespace, **kwargs)


def write_kubeconfig(
    path: str | os.PathLike[str], url: str, *, namespace: str = "default", token: str = "kvswitch-testbed"
) -> Path:
    """A kubeconfig that kopf, kubernetes-asyncio and kubectl accept: plain http, a dummy token."""
    name = "kvswitch-testbed"
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name, "cluster": {"server": url}}],
        "users": [{"name": name, "user": {"token": token}}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name, "namespace": namespace}}],
        "current-context": name,
        "preferences": {},
    }
    target = Path(path)
    target.write_text(yaml.safe_dump(config, sort_keys=False))
    return target


async def login(url: str, kubeconfig: str | os.PathLike[str]) -> Any:
    """A kubernetes-asyncio ``ApiClient`` for ``url``, configured as a real client is: from a
    kubeconfig written at ``kubeconfig`` (:func:`write_kubeconfig`). The caller closes it."""
    from kubernetes_asyncio import client, config

    configuration = client.Configuration()
    path = write_kubeconfig(kubeconfig, url)
    await config.load_kube_config(config_file=str(path), client_configuration=configuration)
    return client.ApiClient(configuration)
