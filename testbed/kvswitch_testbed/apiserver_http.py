"""The fake API server's HTTP face: KMock's request handling with our URL parser and Status errors.

:class:`Emulator` is the top of the layer stack (see README.md): it parses requests, lets KMock's DSL
reactions (fault injection) take them first, and serves the rest from the layers below: verbs,
subresources (status, namespaces' finalize, pods' binding), watches, server-side Tables, warnings,
and protobuf bodies of ``kubectl create namespace``.
"""

from __future__ import annotations

import gzip
import importlib.resources
import json
import logging
import math
import re
from collections.abc import Iterator
from typing import NoReturn

import aiohttp.web
import attrs
import kmock
import orjson
from kmock._internal.rendering import StreamingError

from kvswitch_testbed import apiserver_tables as tables
from kvswitch_testbed.apiserver_discovery import Discovery
from kvswitch_testbed.apiserver_types import (
    JSON,
    KOPF_PEERING_CRDS,
    NAMESPACES,
    PODS,
    SYSTEM_NAMESPACES,
    ApiPath,
    error,
    is_watch,
    not_found,
)

logger = logging.getLogger("kvswitch_testbed.apiserver")


class _Emulate(Exception):
    """Raised by our fallback reaction: no user reaction took the request, so the emulator serves it."""


@attrs.frozen
class Fault:
    """An API server in trouble: every request is answered with ``status`` (500, 429, 503...) and a
    Status body as kube-apiserver words it; a 429 carries ``Retry-After`` (whole seconds, as the
    real one sends it) and ``details.retryAfterSeconds``."""

    status: int
    retry_after: int | None = None

    def response(self) -> aiohttp.web.Response:
        reason, message = {
            429: ("TooManyRequests", "Too many requests, please try again later."),
            500: ("InternalError", "Internal error occurred: injected fault"),
            503: ("ServiceUnavailable", "the server is currently unable to handle the request"),
        }.get(self.status, ("InternalError", f"injected fault {self.status}"))
        details: JSON = {}
        headers: dict[str, str] = {}
        if self.retry_after is not None:
            details["retryAfterSeconds"] = self.retry_after
            headers["Retry-After"] = str(self.retry_after)
        body = {
            "apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "details": details, "code": self.status,
        }  # fmt: skip
        return aiohttp.web.json_response(body, status=self.status, headers=headers)


def _protobuf_fields(buf: bytes) -> Iterator[tuple[int, bytes | int]]:
    """Protobuf wire format: (field number, bytes or varint) pairs; fixed-width fields are skipped."""
    i = 0

    def varint() -> int:
        nonlocal i
        value = shift = 0
        while True:
            byte = buf[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    while i < len(buf):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            yield number, varint()
        elif wire == 2:
            size = varint()
            yield number, buf[i : i + size]
            i += size
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def _decode_protobuf_namespace(body: bytes) -> JSON:
    """kubectl's typed generators send protobuf; ``kubectl create namespace`` is the one worth decoding.

    The envelope is ``k8s\\0`` + runtime.Unknown{typeMeta, raw}; only metadata name, generateName,
    labels and annotations of a Namespace are read. Anything else is 415, as a JSON-only server would.
    """
    hint = "protobuf bodies are unsupported (but for kubectl create namespace): use kubectl apply -f"
    unsupported = error(415, "UnsupportedMediaType", hint)
    try:
        if not body.startswith(b"k8s\x00"):
            raise unsupported
        envelope = dict(_protobuf_fields(body[4:]))
        type_meta = dict(_protobuf_fields(bytes(envelope.get(1, b""))))
        if (type_meta.get(1), type_meta.get(2)) != (b"v1", b"Namespace"):
            raise unsupported
        namespace = dict(_protobuf_fields(bytes(envelope.get(2, b""))))
        meta: JSON = {}
        for number, value in _protobuf_fields(bytes(namespace.get(1, b""))):
            if number in (1, 2) and isinstance(value, bytes) and value:
                meta["name" if number == 1 else "generateName"] = value.decode()
            elif number in (11, 12) and isinstance(value, bytes):
                entry = dict(_protobuf_fields(value))
                key, val = bytes(entry.get(1, b"")).decode(), bytes(entry.get(2, b"")).decode()
                meta.setdefault("labels" if number == 11 else "annotations", {})[key] = val
    except (IndexError, ValueError, UnicodeDecodeError):
        raise unsupported from None
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": meta}


@attrs.define(kw_only=True)
class Emulator(Discovery):
    """KMock's Kubernetes emulator with the semantics real clients rely on.

    Requests go through KMock's DSL first: ``emulator['patch', kmock.resource('v1/pods')] << 500``
    still injects faults, and ``emulator.objects[...]`` keeps every object's history. Whatever no
    user reaction takes is served by :meth:`_emulate`, which owns the store. All store operations are
    synchronous and must run in the server's event loop; this makes each of them atomic for watchers.

    Options (keyword arguments) of the layers: ``watch_cache_size`` and ``max_history`` (store),
    ``max_events`` (Event expiry), ``service_cidr``, ``node_port_range`` and ``kubernetes_service``
    (Services), ``bookmark_interval`` (watch), ``kopf_peering`` and ``max_recorded_requests`` (here).
    """

    kopf_peering: bool = True
    max_recorded_requests: int = 20_000  # requests kept for KMock's assertions (KMock keeps all)

    failures: list[Exception] = attrs.field(factory=list, init=False)  # unexpected ones, answered with 500
    # Fault injection (see ApiServer.fail_requests): while set, every request gets this answer.
    fault: Fault | None = attrs.field(default=None, init=False)
    faulted: int = attrs.field(default=0, init=False)  # requests answered by a fault so far
    _user_reactions_seen: tuple[int, bool] = attrs.field(default=(-1, False), init=False)

    def __attrs_post_init__(self) -> None:
        # KubernetesEmulator's own fallbacks store objects as sent and are skipped; the scaffold's
        # discovery endpoints are kept (and corrected in the discovery layer).
        kmock.KubernetesScaffold.__attrs_post_init__(self)
        self.fallback[self._is_api_request] << self._emulate_marker
        for path in ("/healthz", "/livez", "/readyz"):
            self.fallback[f"get {path}"] << b"ok"
        self.fallback["get /openapi/v3"] << self._serve_openapi_root
        self.fallback["get", re.compile(r"/openapi/v3/apis?/.+")] << self._serve_openapi_group_version
        # KMock's own load_bundled() uses a deprecated importlib API; same data, read directly.
        bundled = importlib.resources.files("kmock._internal").joinpath("resources.json.gz").read_bytes()
        self.resources.load_data(gzip.decompress(bundled))
        for ns in SYSTEM_NAMESPACES:
            self.create_object(self.spec("v1/namespaces"), {"metadata": {"name": ns}})
        if self.kubernetes_service:
            self._create_kubernetes_service()
        if self.kopf_peering:
            for crd in KOPF_PEERING_CRDS:
                self.register_crd(crd)

    # ---------------------------------------------------------------- HTTP plumbing

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        """KMock's entry point with our URL parser and Status errors that do not pile up in memory."""
        raw_response: aiohttp.web.StreamResponse | None = None
        if self.fault is not None:
            self.faulted += 1
            return self.fault.response()
        try:
            request = await self._parse(raw_request)
            self._requests.append(request)
            self._trim_requests()
            try:
                return await self._handle(request)
            except StreamingError as e:  # a user-defined stream failed after sending its headers
                raw_response = e.args[0]
                raise e.__cause__ or e from None
        except kmock.KubernetesError as e:
            return await self._error_response(e, raw_response)
        except Exception as e:
            logger.exception("fake API server failed on %s %s", raw_request.method, raw_request.path_qs)
            self.failures.append(e)
            if self._errors:
                self._errors[-1].append(e)
            return await self._error_response(
                error(500, "InternalError", f"{type(e).__name__}: {e}"), raw_response
            )

    async def _parse(self, raw_request: aiohttp.web.BaseRequest) -> kmock.Request:
        body = await raw_request.read()
        text = body.decode("utf-8", errors="replace")
        try:
            data = json.loads(body) if body else None
        except ValueError:
            data = None
        path = ApiPath.parse(raw_request.path)
        params = dict(raw_request.query)
        method = raw_request.method.upper()
        action: kmock.action | None = None
        if path.group is not None:
            action = {
                "GET": kmock.action.WATCH
                if is_watch(params)
                else (kmock.action.FETCH if path.name else kmock.action.LIST),
                "POST": kmock.action.CREATE,
                "PATCH": kmock.action.UPDATE,
                "PUT": kmock.action.UPDATE,
                "DELETE": kmock.action.DELETE,
            }.get(method)
        resource = (
            None
            if path.group is None
            else kmock.resource(group=path.group, version=path.version, plural=path.plural)
        )
        return kmock.Request(
            id=len(self._requests),
            raw_request=raw_request,
            url=raw_request.url,
            method=raw_request.method,
            params=params,
            headers=dict(raw_request.headers),
            cookies=dict(raw_request.cookies),
            body=body,
            text=text,
            data=data,
            action=action,
            resource=resource,
            namespace=path.namespace,
            name=path.name,
            subresource=path.subresource,
        )

    def _trim_requests(self) -> None:
        limit = self.max_recorded_requests
        if len(self._requests) > 2 * limit:
            del self._requests[:-limit]
            for payload in self._payloads:
                del payload._requests[:-limit]

    async def _error_response(
        self, exc: kmock.KubernetesError, raw_response: aiohttp.web.StreamResponse | None
    ) -> aiohttp.web.StreamResponse:
        status = {
            "apiVersion": "v1",
            "kind": "Status",
            "metadata": {},
            "status": "Failure",
            "message": exc.message or "",
            "reason": exc.reason or "",
            "details": exc.details or {},
            "code": exc.status,
        }
        if raw_response is not None and raw_response.prepared:
            await raw_response.write(json.dumps({"type": "ERROR", "object": status}).encode() + b"\n")
            await raw_response.write_eof()
            return raw_response
        return aiohttp.web.json_response(status, status=exc.status)

    def _user_reactions(self) -> bool:
        """Whether any reaction was added through KMock's DSL (fallbacks have a -inf priority);
        computed again only when the number of reactions changes (priorities cost a tree walk)."""
        count = len(self._payloads)
        if self._user_reactions_seen[0] != count:
            found = any(not p.priorities or p.priorities[0] != -math.inf for p in self._payloads)
            self._user_reactions_seen = (count, found)
        return self._user_reactions_seen[1]

    def _is_api_request(self, request: kmock.Request) -> bool:
        return request.resource is not None and request.resource.plural is not None

    def _emulate_marker(self) -> NoReturn:
        raise _Emulate()

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        # Skip KubernetesEmulator._handle: it mutates the store as sent before any reaction runs.
        if self._is_api_request(request) and not self._user_reactions():
            # No DSL reaction can take it and no fallback before ours serves a resource path: skip
            # KMock's matching (~7 ms of filter checks a request, which dominates a busy server's time).
            return await self._emulate(request)
        try:
            return await kmock.RawHandler._handle(self, request)
        except _Emulate:
            return await self._emulate(request)

    async def _emulate(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        assert request.resource is not None and request.resource.plural is not None
        spec = self._spec_for(request.resource)
        ns, name, sub = request.namespace, request.name, request.subresource
        if ns is not None and not spec.namespaced:
            raise not_found()
        if name is not None and spec.namespaced and ns is None:
            raise not_found()
        allowed = {None, "status" if spec.status_subresource else None}
        allowed |= {"finalize"} if spec.ref == NAMESPACES else {"binding"} if spec.ref == PODS else set()
        if sub not in allowed:
            raise not_found()
        if sub == "binding" and request.method.value.upper() != "POST":
            raise error(405, "MethodNotAllowed", "only POST is allowed on pods/binding")
        params = request.params
        dry_run = bool(params.get("dryRun"))
        warnings: list[str] = []
        method = request.method.value.upper()
        status = 200
        result: JSON
        if method == "GET" and is_watch(params):
            return await self._serve_watch_stream(request, spec, self._filter(spec, ns, name, params))
        table = tables.wants_table(request.headers.get("Accept", ""))
        if method == "GET" and name is not None:
            result = self.read_object(spec, ns, name)
            if table:
                result = spec.as_table(
                    [result], {"resourceVersion": result["metadata"]["resourceVersion"]}, params
                )
        elif method == "GET":
            result = self.list_objects(spec, ns, params)
            if table:
                result = spec.as_table(result["items"], result["metadata"], params)
        elif method == "POST" and name is not None and sub == "binding" and spec.ref == PODS:
            result, status = self._bind(spec, ns, name, self._body(request)), 201
        elif method == "POST" and name is None and spec.ref == "v1/bindings":  # what schedulers post
            body = self._body(request)
            pod = str((body.get("metadata") or {}).get("name", ""))
            result, status = self._bind(self._spec_for(PODS), ns, pod, body), 201
        elif method == "POST" and name is None:
            validation = params.get("fieldValidation")
            body = self._body(request)
            result = self.create_object(
                spec, body, ns, dry_run=dry_run, field_validation=validation, warnings=warnings
            )
            status = 201
        elif method == "PUT" and name is not None:
            result = self.replace_object(
                spec, ns, name, self._body(request), subresource=sub, dry_run=dry_run,
                field_validation=params.get("fieldValidation"), warnings=warnings,
            )  # fmt: skip
        elif method == "PATCH" and name is not None:
            content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
            existed = (ns if spec.namespaced else None, name) in self._live[spec.ref]
            result = self.patch_object(
                spec, ns, name, request.body, content_type, subresource=sub, dry_run=dry_run,
                field_validation=params.get("fieldValidation"), warnings=warnings,
            )  # fmt: skip
            if not existed:  # an apply patch created it
                status = 201
        elif method == "DELETE" and name is not None:
            options = dict(self._body(request, default={}))  # DeleteOptions, also accepted as query params
            for param in ("propagationPolicy", "orphanDependents"):
                if param in params:
                    options[param] = (
                        params[param] if param == "propagationPolicy" else params[param] == "true"
                    )
            result = self.delete_object(spec, ns, name, options=options, dry_run=dry_run)
        elif method == "DELETE":
            result = self.delete_collection(spec, ns, params, dry_run=dry_run)
        else:
            raise error(
                405, "MethodNotAllowed", "the server does not allow this method on the requested resource"
            )
        headers = {"Warning": ", ".join(f'299 - "{w}"' for w in warnings)} if warnings else None
        return compact_json_response(result, status=status, headers=headers)

    def _body(self, request: kmock.Request, default: JSON | None = None) -> JSON:
        if not request.body and default is not None:
            return default
        content_type = request.headers.get("Content-Type", "")
        if "protobuf" in content_type:
            return _decode_protobuf_namespace(request.body)
        if not isinstance(request.data, dict):
            raise error(400, "BadRequest", "the request body must be a JSON object")
        return request.data


def compact_json_response(obj: object, status: int, headers: dict[str, str] | None) -> aiohttp.web.Response:
    """Compact, as kube-apiserver writes it (a list of pods is 7 % smaller than with spaces), and by
    orjson: a Python server encoding a 126 MiB list of 50k pods with ``json`` took longer than the
    agent under test took to decode it, and the benchmarks measure the agent (bench/agent_scale.py)."""
    return aiohttp.web.Response(
        body=orjson.dumps(obj), status=status, headers=headers, content_type="application/json"
    )
