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

    url = await server.listen(sock=netns_socket("underlay"), host="10.250.0.1", port=6443)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import os
import socket
import threading
from collections.abc import Callable, Coroutine, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import aiohttp.web
import yaml

from kvswitch_testbed.apiserver_http import Emulator
from kvswitch_testbed.apiserver_types import JSON, ApiError, ResourceLike, ResourceSpec

__all__ = [
    "ApiError",
    "ApiServer",
    "ApiServerThread",
    "Emulator",
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
        self._sites: list[aiohttp.web.SockSite] = []
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

    async def start(self, host: str = "127.0.0.1", port: int = 0, sock: socket.socket | None = None) -> str:
        """Start serving; ``sock`` may come from ``netns_socket()`` (bound here to host:port if unbound)."""
        if self._runner is not None:
            raise RuntimeError("the API server is already started; use listen() for more sockets")
        await self.emulator.__aenter__()
        server = aiohttp.web.Server(self.emulator, handler_cancellation=True)
        self._runner = aiohttp.web.ServerRunner(server, shutdown_timeout=1.0)
        await self._runner.setup()
        return await self.listen(host, port, sock)

    async def listen(self, host: str = "127.0.0.1", port: int = 0, sock: socket.socket | None = None) -> str:
        """Serve the same store on one more socket (e.g. the underlay address inside a netns)."""
        if self._runner is None:
            raise RuntimeError("the API server is not started")
        bound = _bind_socket(host, port, sock)
        site = aiohttp.web.SockSite(self._runner, bound)
        await site.start()
        self._sites.append(site)
        url = _url_of(bound, host)
        self.urls.append(url)
        return url

    async def stop(self) -> None:
        if self._runner is None:
            return
        self.emulator.close_watches()
        await asyncio.sleep(0)
        await self._runner.cleanup()
        self._runner = None
        self._sites.clear()
        self.urls.clear()
        await self.emulator.__aexit__(None, None, None)

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

    def listen(self, host: str = "127.0.0.1", port: int = 0, sock: socket.socket | None = None) -> str:
        return self.run(self.server.listen(host, port, sock))

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
