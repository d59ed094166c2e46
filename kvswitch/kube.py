"""The few Kubernetes API calls the operators make themselves (kopf handles watching and events),
and how both daemons ride out an API server that goes away, answers 5xx or 429, or cuts its streams.

Every call here retries what is transient (connection refused or reset, timeouts, 429, 5xx) with
short jittered backoffs for as long as it takes, honouring Retry-After: a handler that gave up
would lose its event for good (kopf does not retry event handlers). kopf's own requests (lists,
watches) get the same backoffs through :func:`ride_out_api_outages`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import aiohttp
import kopf
from kubernetes_asyncio import client, config

from kvswitch.config import GROUP, KIND, PLURAL, VERSION

log = logging.getLogger(__name__)
T = TypeVar("T")

REQUEST_TIMEOUT = 60.0  # seconds for one API request, connection included (a hung server)
CONNECT_TIMEOUT = 5.0  # seconds to establish a connection (an unreachable server)
MAX_BACKOFF = 2.0  # seconds between retries at most: the API's return is noticed that fast
MAX_RETRY_AFTER = 30.0  # a server's Retry-After is honoured up to this
RETRIED_STATUSES = frozenset({429, 500, 502, 503, 504})


class Backoffs:
    """Seconds between retries: 0.25, 0.5, 1, then between 1 and 2 (jittered, so that many clients
    that failed together do not come back in lockstep), for ever.

    Iterable again for every request (kopf iterates ``error_backoffs`` once per request) and unsized,
    which kopf takes as "retry without end": a watch or list that gave up after kopf's default
    eight retries (54 s) would stop the operator on a 5xx, and its 8-13-21 s waits keep the daemons
    away from an API that is back for that long.
    """

    def __iter__(self) -> Iterator[float]:
        yield 0.25
        yield 0.5
        yield 1.0
        while True:
            yield random.uniform(1.0, MAX_BACKOFF)


def ride_out_api_outages(settings: kopf.OperatorSettings) -> None:
    """kopf settings for both daemons (call in a startup handler).

    - ``networking.error_backoffs``: :class:`Backoffs` for every request kopf makes (lists and the
      watch requests of every resource): never give up, wait at most 2 s (or what Retry-After asks).
    - ``networking.connect_timeout`` and ``watching.connect_timeout``: an unreachable server (SYNs
      unanswered) fails a connection attempt in 5 s instead of the request timeout.
    - ``networking.request_timeout``: 60 s instead of 300 s for a server that accepts and hangs.
    - Watches keep kopf's defaults: ``reconnect_backoff`` 0.1 s, ``inactivity_timeout`` 70 s (a
      silent stream, bookmarks included, is dropped and resumed) and no client or server timeout
      (a stream that breaks is resumed from its last resourceVersion at once; a 410 lists again).
    """
    settings.networking.error_backoffs = Backoffs()
    settings.networking.connect_timeout = CONNECT_TIMEOUT
    settings.networking.request_timeout = REQUEST_TIMEOUT
    settings.watching.connect_timeout = CONNECT_TIMEOUT


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: the server was unreachable or too busy, or failed on its side."""
    if isinstance(exc, client.ApiException):
        return exc.status in RETRIED_STATUSES
    return isinstance(exc, aiohttp.ClientError | TimeoutError | ConnectionError)


def _retry_after(exc: BaseException) -> float:
    headers = getattr(exc, "headers", None) if isinstance(exc, client.ApiException) else None
    try:
        return min(float((headers or {}).get("Retry-After", 0)), MAX_RETRY_AFTER)
    except (TypeError, ValueError):
        return 0.0


def _describe(exc: BaseException) -> str:
    if isinstance(exc, client.ApiException):
        return f"HTTP {exc.status} {exc.reason}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def call_api(what: str, call: Callable[[], Awaitable[T]]) -> T:
    """``await call()`` until it succeeds or fails for good (see :func:`is_transient`)."""
    delays = iter(Backoffs())
    failures = 0
    while True:
        try:
            result = await call()
        except Exception as exc:
            if not is_transient(exc):
                raise
            failures += 1
            delay = max(next(delays), _retry_after(exc))
            if failures == 1 or failures % 10 == 0:
                log.warning(
                    "%s: %s; retrying (attempt %d, next in %.1fs)", what, _describe(exc), failures, delay
                )
            await asyncio.sleep(delay)
            continue
        if failures:
            log.info("%s: succeeded after %d failed attempts", what, failures)
        return result


async def list_objects(api: client.ApiClient, path: str) -> list[dict[str, Any]]:
    """All objects at ``path`` (e.g. ``/api/v1/pods``) as plain dicts, retried like every call: no
    model classes are built (a list of every pod of a big cluster would hold the event loop)."""

    async def get() -> Any:
        return await api.call_api(
            path,
            "GET",
            header_params={"Accept": "application/json"},
            response_types_map={200: "object"},
            auth_settings=["BearerToken"],
            _return_http_data_only=True,
            _request_timeout=REQUEST_TIMEOUT,
        )

    result = await call_api(f"list {path}", get)
    items: list[dict[str, Any]] = (result or {}).get("items") or []
    return items


async def api_client() -> client.ApiClient:
    """In-cluster credentials when running in a pod, else the kubeconfig (``KUBECONFIG``)."""
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()  # type: ignore[no-untyped-call]
        return client.ApiClient()
    cfg = client.Configuration()
    await config.load_kube_config(client_configuration=cfg)
    return client.ApiClient(configuration=cfg)


# kubernetes-asyncio would send a JSON patch for a list body and a strategic merge patch otherwise,
# which custom resources do not support.
MERGE_PATCH: dict[str, Any] = {"_content_type": "application/merge-patch+json"}


class VSwitchConfigs:
    """CRUD of the cluster-scoped VSwitchConfig resource; every call is retried (:func:`call_api`)."""

    def __init__(self, api: client.ApiClient) -> None:
        self.api = client.CustomObjectsApi(api)

    async def list(self) -> list[dict[str, Any]]:
        result = await call_api(
            f"list {PLURAL}",
            lambda: self.api.list_cluster_custom_object(
                GROUP, VERSION, PLURAL, _request_timeout=REQUEST_TIMEOUT
            ),
        )
        items: list[dict[str, Any]] = result.get("items", [])
        return items

    async def get(self, name: str) -> dict[str, Any] | None:
        try:
            obj: dict[str, Any] = await call_api(
                f"get {KIND} {name}",
                lambda: self.api.get_cluster_custom_object(
                    GROUP, VERSION, PLURAL, name, _request_timeout=REQUEST_TIMEOUT
                ),
            )
        except client.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return obj

    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        """A 409 may mean that an earlier attempt was created before its answer got lost."""
        obj: dict[str, Any] = await call_api(
            f"create {KIND} {body['metadata']['name']}",
            lambda: self.api.create_cluster_custom_object(
                GROUP, VERSION, PLURAL, body, _request_timeout=REQUEST_TIMEOUT
            ),
        )
        return obj

    async def patch(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        obj: dict[str, Any] = await call_api(
            f"patch {KIND} {name}",
            lambda: self.api.patch_cluster_custom_object(
                GROUP, VERSION, PLURAL, name, patch, _request_timeout=REQUEST_TIMEOUT, **MERGE_PATCH
            ),
        )
        return obj

    async def patch_status(self, name: str, status: dict[str, Any]) -> None:
        await call_api(
            f"patch {KIND} {name} status",
            lambda: self.api.patch_cluster_custom_object_status(
                GROUP, VERSION, PLURAL, name, {"status": status}, _request_timeout=REQUEST_TIMEOUT,
                **MERGE_PATCH,
            ),
        )  # fmt: skip

    async def delete(self, name: str) -> None:
        try:
            await call_api(
                f"delete {KIND} {name}",
                lambda: self.api.delete_cluster_custom_object(
                    GROUP, VERSION, PLURAL, name, _request_timeout=REQUEST_TIMEOUT
                ),
            )
        except client.ApiException as exc:
            if exc.status != 404:
                raise
