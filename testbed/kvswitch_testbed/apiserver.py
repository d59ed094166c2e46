"""A stateful fake Kubernetes API server for the sandbox and end-to-end tests, built on KMock.

No kube-apiserver can run on our machines, so real kopf operators and kubernetes-asyncio clients talk
to this one instead. It subclasses KMock's ``KubernetesEmulator`` (discovery scaffold, bundled built-in
resources, object history for assertions, the request DSL for injecting faults) and replaces the
parts that real clients trip over (docs/test-bed.md §6): object metadata and resource versions,
namespaces from URLs, status subresources, PUT and the three PATCH flavours, selectors in list and
watch, resumable watches with bookmarks, finalizers, garbage collection, namespace draining, CRDs
with schema validation, Status errors with the codes clients branch on, and enough OpenAPI and
server-side Tables for kubectl (``create -f`` with server-side validation, ``get -o wide``, ``-w``).

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

Deliberately absent: authentication and RBAC, admission (incl. namespace existence), server-side apply
field ownership (apply patches are merge patches that may create), CEL validation rules, conversion
between CRD versions (each version has its own store), a scheduler, a kubelet (pods are deleted at
once unless they have finalizers), foreground deletion (treated as background), schemas of built-in
kinds (their unknown fields are kept), and protobuf bodies (but for ``kubectl create namespace``).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import copy
import dataclasses
import datetime
import gzip
import importlib.resources
import json
import logging
import os
import random
import re
import socket
import threading
import uuid
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn, Self, TypeVar

import aiohttp.web
import attrs
import kmock
import yaml
from kmock._internal.rendering import StreamingError

from kvswitch_testbed import apiserver_tables as tables
from kvswitch_testbed.apiserver_patches import PatchError, json_patch, merge_patch, strategic_merge_patch
from kvswitch_testbed.apiserver_schema import Cause, StructuralSchema
from kvswitch_testbed.apiserver_selectors import FieldSelector, LabelSelector, SelectorError

__all__ = [
    "ApiError",
    "ApiServer",
    "ApiServerThread",
    "Emulator",
    "ResourceSpec",
    "write_kubeconfig",
]

JSON = dict[str, Any]
ResourceLike = str | kmock.resource
T = TypeVar("T")
ApiError = kmock.KubernetesError  # raised by the helpers; .status, .reason, .message, .details

logger = logging.getLogger(__name__)

SYSTEM_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
CRD_RESOURCE = kmock.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")
EVENT_RESOURCES = (kmock.resource("", "v1", "events"), kmock.resource("events.k8s.io", "v1", "events"))

# System metadata that clients cannot set: kept from the stored object on every update.
_SYSTEM_META = ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "generation")
_STATUS_ON_CREATE: Mapping[tuple[str, str], JSON] = {
    ("", "pods"): {"phase": "Pending"},
    ("", "namespaces"): {"phase": "Active"},
}
_KEEP_STATUS_ON_CREATE = frozenset({("", "nodes")})  # kubelets register nodes with their status
_DNS_LABEL_NAMES = frozenset({("", "namespaces"), ("", "services")})
_DNS_SUBDOMAIN_NAMES = frozenset(
    {
        ("", "pods"),
        ("", "nodes"),
        ("", "configmaps"),
        ("", "secrets"),
        ("networking.k8s.io", "networkpolicies"),
    }
)
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_GENERATE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"

# kopf's peering resources, so that a controller without --standalone finds them (kopf asks discovery).
KOPF_PEERING_CRDS: tuple[JSON, ...] = tuple(
    {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.kopf.dev"},
        "spec": {
            "group": "kopf.dev",
            "scope": scope,
            "names": {"kind": kind, "plural": plural, "singular": plural[:-1]},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                            },
                        }
                    },
                }
            ],
        },
    }
    for plural, kind, scope in (
        ("clusterkopfpeerings", "ClusterKopfPeering", "Cluster"),
        ("kopfpeerings", "KopfPeering", "Namespaced"),
    )
)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _error(code: int, reason: str, message: str, **details: Any) -> kmock.KubernetesError:
    return kmock.KubernetesError(status=code, reason=reason, message=message, details=details)


def _version_priority(version: str) -> tuple[int, int, int]:
    """Sort key putting v2 > v1 > v1beta2 > v1beta1 > v1alpha1, as discovery does."""
    m = re.fullmatch(r"v(\d+)(?:(alpha|beta)(\d+))?", version)
    if not m:
        return (-1, 0, 0)
    stability = {"alpha": 0, "beta": 1, None: 2}[m[2]]
    return (stability, int(m[1]), int(m[3] or 0))


@dataclasses.dataclass(frozen=True)
class ApiPath:
    """A parsed API URL. KMock's parser mistakes ``/api/v1/namespaces[/NAME[/status]]`` for other things."""

    group: str | None = None
    version: str | None = None
    plural: str | None = None
    namespace: str | None = None
    name: str | None = None
    subresource: str | None = None

    @classmethod
    def parse(cls, path: str) -> ApiPath:
        parts = [p for p in path.split("/") if p]
        version: str | None
        if len(parts) >= 2 and parts[0] == "api":
            group, version, rest = "", parts[1], parts[2:]
        elif len(parts) >= 2 and parts[0] == "apis":
            group, version, rest = parts[1], (parts[2] if len(parts) > 2 else None), parts[3:]
        else:
            return cls()
        namespace: str | None = None
        # /api/v1/namespaces[/NAME[/status|/finalize]] is the namespace object; deeper is namespaced.
        if (
            rest[:1] == ["namespaces"]
            and len(rest) >= 3
            and not (len(rest) == 3 and rest[2] in ("status", "finalize"))
        ):
            namespace, rest = rest[1], rest[2:]
        plural = rest[0] if rest else None
        name = rest[1] if len(rest) > 1 else None
        subresource = "/".join(rest[2:]) or None
        return cls(group, version, plural, namespace, name, subresource)


@dataclasses.dataclass
class ResourceSpec:
    """What the server knows about one served resource (group, version, plural)."""

    ref: kmock.resource
    kind: str
    namespaced: bool
    status_subresource: bool
    schema: StructuralSchema | None = None
    crd_name: str | None = None
    printer_columns: list[JSON] = dataclasses.field(default_factory=list)  # a CRD's additionalPrinterColumns

    @property
    def group(self) -> str:
        return self.ref.group or ""

    @property
    def plural(self) -> str:
        return self.ref.plural or ""

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.ref.version}" if self.group else str(self.ref.version)

    def columns(self) -> list[tables.Column]:
        if self.crd_name is not None:
            return tables.printer_columns(self.printer_columns)
        return list(tables.BUILTIN_COLUMNS.get((self.group, self.plural), [tables.NAME, tables.AGE]))

    def as_table(self, objects: list[JSON], metadata: JSON, params: Mapping[str, str]) -> JSON:
        return tables.table(self.columns(), objects, metadata, params.get("includeObject", "Metadata"))

    @property
    def qualified(self) -> str:
        """``pods`` or ``vswitchconfigs.kvswitch.io``, as the API names resources in messages."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


Key = tuple[str | None, str]  # (namespace, name) within one resource


@dataclasses.dataclass(frozen=True)
class _Change:
    rv: int
    ref: kmock.resource
    type: str  # ADDED, MODIFIED, DELETED
    obj: JSON
    old: JSON | None


@dataclasses.dataclass(frozen=True)
class _Filter:
    namespace: str | None = None
    name: str | None = None
    labels: LabelSelector = dataclasses.field(default_factory=LabelSelector)
    fields: FieldSelector = dataclasses.field(default_factory=FieldSelector)

    def __call__(self, obj: Mapping[str, Any] | None) -> bool:
        if obj is None:
            return False
        meta = obj.get("metadata") or {}
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        if self.name is not None and meta.get("name") != self.name:
            return False
        return self.labels.matches(meta.get("labels")) and self.fields.matches(obj)

    def event(self, change: _Change) -> tuple[str, JSON] | None:
        """The event a watcher with this filter sees: objects entering or leaving it are ADDED/DELETED."""
        now = self(change.obj)
        if change.type == "ADDED":
            return ("ADDED", change.obj) if now else None
        if change.type == "DELETED":
            return ("DELETED", change.obj) if now or self(change.old) else None
        before = self(change.old)
        if before and now:
            return ("MODIFIED", change.obj)
        if now:
            return ("ADDED", change.obj)
        return ("DELETED", change.obj) if before else None


@dataclasses.dataclass(eq=False)
class _Watcher:
    ref: kmock.resource
    queue: asyncio.Queue[_Change | None]


class _Emulate(Exception):
    """Raised by our fallback reaction: no user reaction took the request, so the emulator serves it."""


def _is_watch(params: Mapping[str, str]) -> bool:
    return params.get("watch", "").lower() in ("true", "1")


def _meta(obj: JSON) -> JSON:
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        meta = obj["metadata"] = {}
    return meta


def _releasable(obj: Mapping[str, Any]) -> bool:
    """Whether a terminating object may go: no finalizers left (namespaces also wait for their content)."""
    meta = obj.get("metadata") or {}
    spec_finalizers = (obj.get("spec") or {}).get("finalizers") if obj.get("kind") == "Namespace" else None
    return not meta.get("finalizers") and not spec_finalizers


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
    unsupported = _error(415, "UnsupportedMediaType", hint)
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
class Emulator(kmock.KubernetesEmulator):
    """KMock's Kubernetes emulator with the semantics real clients rely on.

    Requests go through KMock's DSL first: ``emulator['patch', kmock.resource('v1/pods')] << 500``
    still injects faults, and ``emulator.objects[...]`` keeps every object's history. Whatever no
    user reaction takes is served by :meth:`_emulate`, which owns the store. All store operations are
    synchronous and must run in the server's event loop; this makes each of them atomic for watchers.
    """

    kopf_peering: bool = True
    watch_cache_size: int = 10_000  # events kept for resuming watches; older resourceVersions get 410
    bookmark_interval: float = 10.0  # seconds between BOOKMARK events on idle watches that allow them
    max_events: int = 2_000  # Event objects kept per resource, oldest deleted first (real ones expire)
    max_history: int = 50  # versions kept per object in ``objects`` (KMock keeps all)
    max_recorded_requests: int = 20_000  # requests kept for KMock's assertions (KMock keeps all)

    failures: list[Exception] = attrs.field(factory=list, init=False)  # unexpected ones, answered with 500
    _rv: int = attrs.field(default=0, init=False)
    _live: dict[kmock.resource, dict[Key, JSON]] = attrs.field(
        factory=lambda: collections.defaultdict(dict), init=False
    )
    _uids: dict[str, tuple[kmock.resource, Key]] = attrs.field(factory=dict, init=False)
    _dependents: dict[str, set[str]] = attrs.field(factory=lambda: collections.defaultdict(set), init=False)
    _specs: dict[kmock.resource, ResourceSpec] = attrs.field(factory=dict, init=False)
    _log: collections.deque[_Change] = attrs.field(init=False)
    _watchers: set[_Watcher] = attrs.field(factory=set, init=False)
    _terminating: set[str] = attrs.field(factory=set, init=False)

    def __attrs_post_init__(self) -> None:
        # KubernetesEmulator's own fallbacks store objects as sent and are skipped; the scaffold's
        # discovery endpoints are kept (and corrected below).
        kmock.KubernetesScaffold.__attrs_post_init__(self)
        self._log = collections.deque(maxlen=self.watch_cache_size)
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
        if self.kopf_peering:
            for crd in KOPF_PEERING_CRDS:
                self.register_crd(crd)

    # ---------------------------------------------------------------- HTTP plumbing

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        """KMock's entry point with our URL parser and Status errors that do not pile up in memory."""
        raw_response: aiohttp.web.StreamResponse | None = None
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
                _error(500, "InternalError", f"{type(e).__name__}: {e}"), raw_response
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
                if _is_watch(params)
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

    def _is_api_request(self, request: kmock.Request) -> bool:
        return request.resource is not None and request.resource.plural is not None

    def _emulate_marker(self) -> NoReturn:
        raise _Emulate()

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        # Skip KubernetesEmulator._handle: it mutates the store as sent before any reaction runs.
        try:
            return await kmock.RawHandler._handle(self, request)
        except _Emulate:
            return await self._emulate(request)

    async def _emulate(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        assert request.resource is not None and request.resource.plural is not None
        spec = self._spec_for(request.resource)
        ns, name, sub = request.namespace, request.name, request.subresource
        if ns is not None and not spec.namespaced:
            raise _error(404, "NotFound", "the server could not find the requested resource")
        if name is not None and spec.namespaced and ns is None:
            raise _error(404, "NotFound", "the server could not find the requested resource")
        allowed = {None, "status" if spec.status_subresource else None}
        allowed |= (
            {"finalize"} if spec.ref == "v1/namespaces" else {"binding"} if spec.ref == "v1/pods" else set()
        )
        if sub not in allowed:
            raise _error(404, "NotFound", "the server could not find the requested resource")
        if sub == "binding" and request.method.value.upper() != "POST":
            raise _error(405, "MethodNotAllowed", "only POST is allowed on pods/binding")
        params = request.params
        dry_run = bool(params.get("dryRun"))
        warnings: list[str] = []
        method = request.method.value.upper()
        status = 200
        result: JSON
        if method == "GET" and _is_watch(params):
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
        elif method == "POST" and name is not None and sub == "binding" and spec.ref == "v1/pods":
            result, status = self._bind(spec, ns, name, self._body(request)), 201
        elif method == "POST" and name is None and spec.ref == "v1/bindings":  # what schedulers post
            body = self._body(request)
            pod = str((body.get("metadata") or {}).get("name", ""))
            result, status = self._bind(self._spec_for(kmock.resource("v1/pods")), ns, pod, body), 201
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
            raise _error(
                405, "MethodNotAllowed", "the server does not allow this method on the requested resource"
            )
        headers = {"Warning": ", ".join(f'299 - "{w}"' for w in warnings)} if warnings else None
        return aiohttp.web.json_response(result, status=status, headers=headers)

    def _body(self, request: kmock.Request, default: JSON | None = None) -> JSON:
        if not request.body and default is not None:
            return default
        content_type = request.headers.get("Content-Type", "")
        if "protobuf" in content_type:
            return _decode_protobuf_namespace(request.body)
        if not isinstance(request.data, dict):
            raise _error(400, "BadRequest", "the request body must be a JSON object")
        return request.data

    # ---------------------------------------------------------------- discovery (KMock's, corrected)

    def _get_resources(self) -> list[kmock.resource]:
        # Only declared resources: KMock also lists those of stored objects, incl. deleted CRDs'.
        return kmock.KubernetesScaffold._get_resources(self)

    async def _serve_api(self, request: kmock.Request) -> kmock.Payload:
        host = request.url.host or "127.0.0.1"
        address = f"{host}:{request.url.port}" if request.url.port else host
        return {
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": address}],
        }

    def _groups(self) -> dict[str, list[str]]:
        groups: dict[str, set[str]] = collections.defaultdict(set)
        for res in self._get_resources():
            if res.group and res.version:
                groups[res.group].add(res.version)
        return {g: sorted(vs, key=_version_priority, reverse=True) for g, vs in sorted(groups.items())}

    def _group_doc(self, group: str, versions: list[str]) -> JSON:
        return {
            "name": group,
            "versions": [{"groupVersion": f"{group}/{v}", "version": v} for v in versions],
            "preferredVersion": {"groupVersion": f"{group}/{versions[0]}", "version": versions[0]},
        }

    async def _serve_apis(self, request: kmock.Request) -> kmock.Payload:
        groups = [self._group_doc(g, vs) for g, vs in self._groups().items()]
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}

    async def _serve_group(self, request: kmock.Request) -> kmock.Payload:
        assert request.resource is not None
        versions = self._groups().get(request.resource.group or "")
        if not versions:
            raise _error(404, "NotFound", "the server could not find the requested resource")
        return {
            "kind": "APIGroup",
            "apiVersion": "v1",
            **self._group_doc(request.resource.group or "", versions),
        }

    async def _serve_version(self, request: kmock.Request) -> kmock.Payload:
        assert request.resource is not None
        group, version = request.resource.group or "", request.resource.version
        entries: list[JSON] = []
        for res in self._get_resources():
            if res.group != group or res.version != version or not res.plural:
                continue
            info = self.resources[res]
            kind = info.kind or res.plural.capitalize()
            entries.append(
                {
                    "name": res.plural,
                    "singularName": info.singular or kind.lower(),
                    "namespaced": bool(info.namespaced),
                    "kind": kind,
                    "verbs": sorted(info.verbs or ALL_VERBS),
                    **({"shortNames": sorted(info.shortnames)} if info.shortnames else {}),
                    **({"categories": sorted(info.categories)} if info.categories else {}),
                }
            )
            for sub in sorted(info.subresources):
                entries.append(
                    {
                        "name": f"{res.plural}/{sub}",
                        "singularName": "",
                        "namespaced": bool(info.namespaced),
                        "kind": kind,
                        "verbs": ["get", "patch", "update"],
                    }
                )
        if not entries:
            raise _error(404, "NotFound", "the server could not find the requested resource")
        group_version = f"{group}/{version}" if group else str(version)
        entries.sort(key=lambda e: str(e["name"]))
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": group_version,
            "resources": entries,
        }

    def _gv_path(self, group: str, version: str) -> str:
        return f"apis/{group}/{version}" if group else f"api/{version}"

    async def _serve_openapi_root(self) -> kmock.Payload:
        """Just enough OpenAPI v3 for kubectl to see server-side field validation and skip its own."""
        gvs = sorted(
            {(r.group or "", r.version or "") for r in self._get_resources() if r.plural and r.version}
        )
        digest = str(self._rv)  # kubectl caches these documents by hash
        return {
            "paths": {
                self._gv_path(g, v): {"serverRelativeURL": f"/openapi/v3/{self._gv_path(g, v)}?hash={digest}"}
                for g, v in gvs
            }
        }

    async def _serve_openapi_group_version(self, request: kmock.Request) -> kmock.Payload:
        path = ApiPath.parse(request.url.path.removeprefix("/openapi/v3"))
        paths: JSON = {}
        for res in self._get_resources():
            if res.group != path.group or res.version != path.version or not res.plural:
                continue
            spec = self._spec_for(res)
            scope = "/namespaces/{namespace}" if spec.namespaced else ""
            patch = {
                "x-kubernetes-group-version-kind": {
                    "group": spec.group,
                    "version": res.version,
                    "kind": spec.kind,
                },
                "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}],
                "responses": {"200": {"description": "OK"}},
            }
            paths[f"/{self._gv_path(spec.group, res.version or '')}{scope}/{spec.plural}/{{name}}"] = {
                "patch": patch
            }
        if not paths:
            raise _error(404, "NotFound", "the server could not find the requested resource")
        return {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.26.4"}, "paths": paths}

    # ---------------------------------------------------------------- resources

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
                    candidates, key=lambda c: _version_priority(c.version or ""), reverse=True
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
            raise _error(404, "NotFound", "the server could not find the requested resource")
        info = self.resources[ref]
        spec = ResourceSpec(
            ref=ref,
            kind=info.kind or (ref.plural or "").capitalize(),
            namespaced=bool(info.namespaced),
            status_subresource="status" in info.subresources,
        )
        self._specs[ref] = spec
        return spec

    def register_crd(self, crd: Mapping[str, Any] | str | os.PathLike[str]) -> list[ResourceSpec]:
        """Create (or update) CRDs from a dict or a YAML file, like ``kubectl apply -f``; served at once."""
        docs = [crd] if isinstance(crd, Mapping) else list(yaml.safe_load_all(Path(crd).read_text()))
        specs: list[ResourceSpec] = []
        crd_spec = self._spec_for(CRD_RESOURCE)
        for doc in docs:
            if not isinstance(doc, Mapping) or doc.get("kind") != "CustomResourceDefinition":
                continue
            body = copy.deepcopy(dict(doc))
            name = (body.get("metadata") or {}).get("name", "")
            if (None, name) in self._live[CRD_RESOURCE]:
                body.setdefault("metadata", {}).pop("resourceVersion", None)
                stored = self.replace_object(crd_spec, None, name, body)
            else:
                stored = self.create_object(crd_spec, body)
            specs.extend(s for s in self._specs.values() if s.crd_name == stored["metadata"]["name"])
        return specs

    def declare_resource(
        self,
        group: str,
        version: str,
        plural: str,
        *,
        kind: str,
        namespaced: bool = False,
        status_subresource: bool = True,
        schema: Mapping[str, Any] | None = None,
        short_names: Iterable[str] = (),
        printer_columns: Iterable[Mapping[str, Any]] = (),
    ) -> ResourceSpec:
        """Declare a custom resource by hand (a CRD is created for it); no schema keeps any field."""
        crd = {
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.{group}"},
            "spec": {
                "group": group,
                "scope": "Namespaced" if namespaced else "Cluster",
                "names": {
                    "kind": kind,
                    "plural": plural,
                    "singular": kind.lower(),
                    "shortNames": list(short_names),
                },
                "versions": [
                    {
                        "name": version,
                        "served": True,
                        "storage": True,
                        "subresources": {"status": {}} if status_subresource else {},
                        "additionalPrinterColumns": [dict(c) for c in printer_columns],
                        "schema": {
                            "openAPIV3Schema": dict(schema)
                            if schema is not None
                            else {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                        },
                    }
                ],
            },
        }
        return self.register_crd(crd)[0]

    def _check_crd(self, crd: JSON) -> None:
        spec = crd.get("spec") or {}
        names = spec.get("names") or {}
        problems = []
        if not spec.get("group"):
            problems.append("spec.group: Required value")
        if not names.get("plural") or not names.get("kind"):
            problems.append("spec.names: plural and kind are required")
        if spec.get("scope") not in ("Namespaced", "Cluster"):
            problems.append('spec.scope: Unsupported value: supported values: "Cluster", "Namespaced"')
        if not spec.get("versions"):
            problems.append("spec.versions: Required value")
        if not problems and crd["metadata"].get("name") != f"{names['plural']}.{spec['group']}":
            problems.append('metadata.name: Invalid value: must be spec.names.plural+"."+spec.group')
        if problems:
            name = crd["metadata"].get("name", "")
            message = (
                f'CustomResourceDefinition.apiextensions.k8s.io "{name}" is invalid: [{", ".join(problems)}]'
            )
            raise _error(
                422,
                "Invalid",
                message,
                name=name,
                group="apiextensions.k8s.io",
                kind="CustomResourceDefinition",
            )

    def _crd_status(self, crd: JSON) -> JSON:
        spec = crd["spec"]
        now = _now()
        conditions = [
            {"type": t, "status": "True", "reason": r, "message": m, "lastTransitionTime": now}
            for t, r, m in (
                ("NamesAccepted", "NoConflicts", "no conflicts found"),
                ("Established", "InitialNamesAccepted", "the initial names have been accepted"),
            )
        ]
        stored = [v["name"] for v in spec["versions"] if v.get("storage")]
        return {"conditions": conditions, "acceptedNames": spec["names"], "storedVersions": stored}

    def _install_crd(self, crd: JSON) -> None:
        spec = crd["spec"]
        names = spec["names"]
        name = crd["metadata"]["name"]
        wanted: set[kmock.resource] = set()
        for version in spec["versions"]:
            if version.get("served") is False:
                continue
            ref = kmock.resource(spec["group"], version["name"], names["plural"])
            wanted.add(ref)
            subresources = version.get("subresources") or {}
            self.resources[ref] = kmock.ResourceInfo(
                namespaced=spec["scope"] == "Namespaced",
                kind=names["kind"],
                singular=names.get("singular") or names["kind"].lower(),
                verbs=set(ALL_VERBS),
                shortnames=set(names.get("shortNames") or ()),
                categories=set(names.get("categories") or ()),
                subresources={s for s in ("status", "scale") if s in subresources},
            )
            schema = (version.get("schema") or {}).get("openAPIV3Schema")
            self._specs[ref] = ResourceSpec(
                ref=ref,
                kind=names["kind"],
                namespaced=spec["scope"] == "Namespaced",
                status_subresource="status" in subresources,
                schema=StructuralSchema(schema) if schema else None,
                crd_name=name,
                printer_columns=list(version.get("additionalPrinterColumns") or []),
            )
        for ref in [r for r, s in self._specs.items() if s.crd_name == name and r not in wanted]:
            self._uninstall(ref)

    def _uninstall(self, ref: kmock.resource) -> None:
        spec = self._specs.pop(ref)
        for key in list(self._live.get(ref, {})):
            self._commit(spec, key, "DELETED", None)
        self._live.pop(ref, None)
        if ref in self.resources:
            del self.resources[ref]
        for watcher in [w for w in self._watchers if w.ref == ref]:
            watcher.queue.put_nowait(None)

    # ---------------------------------------------------------------- store operations (synchronous)

    def _next_rv(self) -> int:
        self._rv += 1
        return self._rv

    def _get(self, spec: ResourceSpec, ns: str | None, name: str) -> JSON:
        obj = self._live[spec.ref].get((ns if spec.namespaced else None, name))
        if obj is None:
            raise _error(
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
    ) -> _Filter:
        try:
            return _Filter(
                namespace=ns if spec.namespaced else None,
                name=name,
                labels=LabelSelector.parse(params.get("labelSelector", "")),
                fields=FieldSelector.parse(params.get("fieldSelector", "")),
            )
        except SelectorError as e:
            raise _error(400, "BadRequest", str(e)) from None

    def _matching(self, spec: ResourceSpec, flt: _Filter) -> list[tuple[Key, JSON]]:
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
                raise _error(400, "BadRequest", "invalid continue token") from None
            items = [(k, o) for k, o in items if ((k[0] or ""), k[1]) > after]
        try:
            limit = int(params.get("limit") or 0)
        except ValueError:
            raise _error(400, "BadRequest", "limit must be an integer") from None
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

    def _check_name(self, spec: ResourceSpec, name: str) -> None:
        key = (spec.group, spec.plural)
        if key in _DNS_LABEL_NAMES and not (len(name) <= 63 and _DNS_LABEL.fullmatch(name)):
            problem = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-'"
        elif (key in _DNS_SUBDOMAIN_NAMES or spec.crd_name) and not (
            len(name) <= 253 and _DNS_SUBDOMAIN.fullmatch(name)
        ):
            problem = "a lowercase RFC 1123 subdomain must consist of lower case alphanumerics, '-' or '.'"
        elif name in (".", "..") or "/" in name or "%" in name:
            problem = "may not be '.' or '..' and may not contain '/' or '%'"
        else:
            return
        self._invalid(
            spec, name, [Cause("metadata.name", "FieldValueInvalid", f'Invalid value: "{name}": {problem}')]
        )

    def _invalid(self, spec: ResourceSpec, name: str, causes: list[Cause]) -> NoReturn:
        """422 Invalid, worded like the API server: ``Kind.group "name" is invalid: field: message``."""
        text = ", ".join(f"{c.field}: {c.message}" if c.field else c.message for c in causes)
        text = f"[{text}]" if len(causes) > 1 else text
        qualified = f"{spec.kind}.{spec.group}" if spec.group else spec.kind
        details = {
            "name": name,
            "group": spec.group,
            "kind": spec.kind,
            "causes": [{"reason": c.reason, "message": c.message, "field": c.field} for c in causes],
        }
        message = f'{qualified} "{name}" is invalid: {text}'
        raise kmock.KubernetesError(status=422, reason="Invalid", message=message, details=details)

    def _check_type(self, spec: ResourceSpec, obj: JSON) -> None:
        for field, expected in (("apiVersion", spec.api_version), ("kind", spec.kind)):
            if obj.get(field) not in (None, "", expected):
                raise _error(
                    400,
                    "BadRequest",
                    f"the {field} in the data ({obj[field]}) does not match the expected one ({expected})",
                )
            obj[field] = expected

    def _admit(
        self,
        spec: ResourceSpec,
        obj: JSON,
        name: str,
        field_validation: str | None,
        warnings: list[str] | None,
    ) -> None:
        """Prune, default and validate a custom resource like a structural schema does."""
        if spec.schema is None:
            return
        unknown = spec.schema.prune(obj)
        mode = (field_validation or "Warn").lower()
        if unknown and mode == "strict":
            fields = ", ".join(f'unknown field "{f}"' for f in unknown)
            raise _error(
                400,
                "BadRequest",
                f'{spec.kind} in version "{spec.ref.version}" cannot be handled as a {spec.kind}: '
                f"strict decoding error: {fields}",
            )
        if unknown and mode == "warn" and warnings is not None:
            warnings.extend(f'unknown field \\"{f}\\"' for f in unknown)
        if causes := spec.schema.validate(obj):
            self._invalid(spec, name, causes)

    def create_object(
        self,
        spec: ResourceSpec,
        body: Mapping[str, Any],
        namespace: str | None = None,
        *,
        dry_run: bool = False,
        field_validation: str | None = None,
        warnings: list[str] | None = None,
    ) -> JSON:
        if not isinstance(body, Mapping):
            raise _error(400, "BadRequest", "the object must be a JSON object")
        obj = copy.deepcopy(dict(body))
        meta = _meta(obj)
        self._check_type(spec, obj)
        ns: str | None = None
        if spec.namespaced:
            ns = namespace or meta.get("namespace")
            if not ns:
                raise _error(400, "BadRequest", "the namespace of the object must be set")
            if meta.get("namespace") not in (None, "", ns):
                raise _error(
                    400,
                    "BadRequest",
                    "the namespace of the provided object does not match the namespace sent on the request",
                )
            meta["namespace"] = ns
        else:
            meta.pop("namespace", None)
        name = meta.get("name")
        if not name and meta.get("generateName"):
            for _ in range(100):
                name = meta["generateName"] + "".join(random.choices(_GENERATE_ALPHABET, k=5))
                if (ns, name) not in self._live[spec.ref]:
                    break
            meta["name"] = name
        if not name or not isinstance(name, str):
            required = "Required value: name or generateName is required"
            self._invalid(spec, "", [Cause("metadata.name", "FieldValueRequired", required)])
        self._check_name(spec, name)
        if (ns, name) in self._live[spec.ref]:
            raise _error(
                409,
                "AlreadyExists",
                f'{spec.qualified} "{name}" already exists',
                name=name,
                group=spec.group,
                kind=spec.plural,
            )
        for field in (
            "resourceVersion",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "selfLink",
            "managedFields",
        ):
            meta.pop(field, None)
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
        if spec.status_subresource and (spec.group, spec.plural) not in _KEEP_STATUS_ON_CREATE:
            obj.pop("status", None)
            if status := _STATUS_ON_CREATE.get((spec.group, spec.plural)):
                obj["status"] = copy.deepcopy(status)
        if spec.ref == "v1/namespaces":
            obj.setdefault("spec", {})["finalizers"] = ["kubernetes"]
            meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = name
        if spec.ref == CRD_RESOURCE:
            self._check_crd(obj)
            obj["status"] = self._crd_status(obj)
        self._admit(spec, obj, name, field_validation, warnings)
        if dry_run:
            return obj
        result = self._commit(spec, (ns, name), "ADDED", obj)
        self._after_create(spec, result)
        return result

    def replace_object(
        self,
        spec: ResourceSpec,
        namespace: str | None,
        name: str,
        body: Mapping[str, Any],
        *,
        subresource: str | None = None,
        dry_run: bool = False,
        field_validation: str | None = None,
        warnings: list[str] | None = None,
    ) -> JSON:
        """PUT: replace the object (or its status); a stale resourceVersion is a 409 Conflict."""
        old = self._get(spec, namespace, name)
        if not isinstance(body, Mapping):
            raise _error(400, "BadRequest", "the object must be a JSON object")
        return self._update(
            spec, old, copy.deepcopy(dict(body)), subresource, dry_run, field_validation, warnings
        )

    def patch_object(
        self,
        spec: ResourceSpec,
        namespace: str | None,
        name: str,
        patch: bytes | Any,
        content_type: str = "application/merge-patch+json",
        *,
        subresource: str | None = None,
        dry_run: bool = False,
        field_validation: str | None = None,
        warnings: list[str] | None = None,
    ) -> JSON:
        """PATCH with a JSON patch, a merge patch, a strategic merge patch (built-ins) or an apply patch."""
        if content_type == "application/apply-patch+yaml":
            try:
                document = yaml.safe_load(patch) if isinstance(patch, bytes | str) else patch
            except yaml.YAMLError as e:
                raise _error(400, "BadRequest", f"error decoding YAML: {e}") from None
            if not isinstance(document, dict):
                raise _error(400, "BadRequest", "an apply patch must be an object")
            key = (namespace if spec.namespaced else None, name)
            if key not in self._live[spec.ref]:  # server-side apply creates
                document.setdefault("metadata", {})["name"] = name
                return self.create_object(
                    spec,
                    document,
                    namespace,
                    dry_run=dry_run,
                    field_validation=field_validation,
                    warnings=warnings,
                )
            ops: Any = document
            apply: Callable[[Any, Any], Any] = merge_patch
        else:
            try:
                ops = json.loads(patch) if isinstance(patch, bytes | str) else patch
            except ValueError as e:
                raise _error(400, "BadRequest", f"error decoding the patch: {e}") from None
            if content_type == "application/json-patch+json":
                if not isinstance(ops, list):
                    raise _error(400, "BadRequest", "a JSON patch must be a list of operations")
                apply = json_patch
            elif content_type == "application/merge-patch+json":
                apply = merge_patch
            elif content_type == "application/strategic-merge-patch+json" and spec.crd_name is None:
                apply = strategic_merge_patch
            else:
                raise _error(
                    415,
                    "UnsupportedMediaType",
                    "the body of the request was in an unknown format - accepted media types include: "
                    "application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml"
                    + ("" if spec.crd_name else ", application/strategic-merge-patch+json"),
                )
        old = self._get(spec, namespace, name)
        try:
            candidate = apply(copy.deepcopy(old), ops)
        except PatchError as e:
            raise _error(
                422, "Invalid", f"the server rejected our request due to an error in our request: {e}"
            ) from None
        if not isinstance(candidate, dict):
            raise _error(422, "Invalid", "the patched object is not a JSON object")
        # A resourceVersion in a merge patch is a precondition; the one copied from the stored object is not.
        patch_meta = ops.get("metadata") if isinstance(ops, dict) else None
        if not (isinstance(patch_meta, dict) and patch_meta.get("resourceVersion")):
            _meta(candidate).pop("resourceVersion", None)
        return self._update(spec, old, candidate, subresource, dry_run, field_validation, warnings)

    def _update(
        self,
        spec: ResourceSpec,
        old: JSON,
        candidate: JSON,
        subresource: str | None,
        dry_run: bool,
        field_validation: str | None,
        warnings: list[str] | None,
    ) -> JSON:
        old_meta = old["metadata"]
        name, ns = old_meta["name"], old_meta.get("namespace")
        meta = _meta(candidate)
        if meta.get("name") not in (None, "", name):
            raise _error(
                400,
                "BadRequest",
                f"the name of the object ({meta['name']}) does not match the name on the URL ({name})",
            )
        if spec.namespaced and meta.get("namespace") not in (None, "", ns):
            raise _error(
                400,
                "BadRequest",
                "the namespace of the provided object does not match the namespace sent on the request",
            )
        if meta.get("resourceVersion") not in (None, "", old_meta["resourceVersion"]):
            raise _error(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {spec.qualified} "{name}": the object has been modified; '
                f"please apply your changes to the latest version and try again",
                name=name, group=spec.group, kind=spec.plural,
            )  # fmt: skip
        self._check_type(spec, candidate)
        new: JSON
        if subresource == "status":
            new = copy.deepcopy(old)
            if "status" in candidate:
                new["status"] = candidate["status"]
            else:
                new.pop("status", None)
        elif subresource == "finalize" and spec.ref == "v1/namespaces":
            new = copy.deepcopy(old)
            new.setdefault("spec", {})["finalizers"] = list(
                (candidate.get("spec") or {}).get("finalizers") or []
            )
        else:
            new = candidate
            if spec.status_subresource:
                if "status" in old:
                    new["status"] = copy.deepcopy(old["status"])
                else:
                    new.pop("status", None)
            for field in ("name", "namespace", "generateName", *_SYSTEM_META):
                if field in old_meta:
                    meta[field] = old_meta[field]
                else:
                    meta.pop(field, None)
            meta.pop("managedFields", None)
            if old_meta.get("deletionTimestamp"):
                added = set(meta.get("finalizers") or []) - set(old_meta.get("finalizers") or [])
                if added:
                    problem = (
                        "Forbidden: no new finalizers can be added if the object is being deleted, "
                        f"found new finalizers {sorted(added)}"
                    )
                    self._invalid(spec, name, [Cause("metadata.finalizers", "FieldValueForbidden", problem)])
            if spec.ref == CRD_RESOURCE:
                self._check_crd(new)
                new["status"] = self._crd_status(new)
        new_meta = _meta(new)
        new_meta["resourceVersion"] = old_meta["resourceVersion"]
        self._admit(spec, new, name, field_validation, warnings)
        ignored = ("metadata", "status") if spec.status_subresource else ("metadata",)
        if {k: v for k, v in new.items() if k not in ignored} != {
            k: v for k, v in old.items() if k not in ignored
        }:
            new_meta["generation"] = int(old_meta.get("generation") or 0) + 1
        if new == old or dry_run:
            return new
        key = (ns if spec.namespaced else None, name)
        if new_meta.get("deletionTimestamp") and _releasable(new):
            return self._commit(spec, key, "DELETED", new)
        result = self._commit(spec, key, "MODIFIED", new)
        if spec.ref == CRD_RESOURCE:
            self._install_crd(result)
        return result

    def _bind(self, spec: ResourceSpec, ns: str | None, name: str, body: JSON) -> JSON:
        """POST pods/NAME/binding: what a scheduler does (there is none here)."""
        pod = self._get(spec, ns, name)
        node = ((body.get("target") or {}).get("name")) or ""
        if current := (pod.get("spec") or {}).get("nodeName"):
            raise _error(409, "Conflict", f'pod {name} is already assigned to node "{current}"')
        self._update(
            spec, pod, merge_patch(copy.deepcopy(pod), {"spec": {"nodeName": node}}), None, False, None, None
        )
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}

    def delete_object(
        self,
        spec: ResourceSpec,
        namespace: str | None,
        name: str,
        *,
        options: Mapping[str, Any] | None = None,
        dry_run: bool = False,
    ) -> JSON:
        """DELETE: objects with finalizers get a deletionTimestamp, others go at once (then GC follows)."""
        old = self._get(spec, namespace, name)
        options = options or {}
        meta = old["metadata"]
        pre = options.get("preconditions") or {}
        for field, label in (("uid", "UID"), ("resourceVersion", "ResourceVersion")):
            if pre.get(field) and pre[field] != meta.get(field):
                raise _error(
                    409,
                    "Conflict",
                    f"Precondition failed: {label} in precondition: {pre[field]}, "
                    f"{label} in object meta: {meta.get(field)}",
                )
        if dry_run or meta.get("deletionTimestamp"):
            return old
        policy = options.get("propagationPolicy") or (
            "Orphan" if options.get("orphanDependents") else "Background"
        )
        if policy == "Orphan":
            self._orphan_dependents(meta["uid"])
        key = (meta.get("namespace"), meta["name"])
        if _releasable(old) and spec.ref != "v1/namespaces":
            return self._commit(spec, key, "DELETED", old)
        new = copy.deepcopy(old)
        new_meta = new["metadata"]
        new_meta.update(deletionTimestamp=_now(), deletionGracePeriodSeconds=0)
        new_meta["generation"] = int(new_meta.get("generation") or 0) + 1
        if spec.ref == "v1/namespaces":
            new["status"] = {**(new.get("status") or {}), "phase": "Terminating"}
        result = self._commit(spec, key, "MODIFIED", new)
        if spec.ref == "v1/namespaces":
            self._terminating.add(name)
            self._drain_namespace(name)
            self._finalize_namespace(name)
            return self._live[spec.ref].get(key, result)
        return result

    def delete_collection(
        self,
        spec: ResourceSpec,
        namespace: str | None,
        params: Mapping[str, str] | None = None,
        *,
        dry_run: bool = False,
    ) -> JSON:
        listed = self.list_objects(spec, namespace, {k: v for k, v in (params or {}).items() if k != "limit"})
        for obj in listed["items"]:
            meta = obj["metadata"]
            if (meta.get("namespace"), meta["name"]) in self._live[spec.ref]:
                self.delete_object(spec, meta.get("namespace"), meta["name"], dry_run=dry_run)
        return listed

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
        change = _Change(rv, spec.ref, kind, stored, old)
        self._log.append(change)
        for watcher in self._watchers:
            if watcher.ref == spec.ref:
                watcher.queue.put_nowait(change)
        if kind == "DELETED":
            self._after_delete(spec, stored)
        return stored

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

    def _after_create(self, spec: ResourceSpec, obj: JSON) -> None:
        if spec.ref == CRD_RESOURCE:
            self._install_crd(obj)
        if spec.ref in EVENT_RESOURCES:
            live = self._live[spec.ref]
            while len(live) > self.max_events:
                ns, name = next(iter(live))
                self._commit(spec, (ns, name), "DELETED", None)
        if obj["metadata"].get("ownerReferences"):
            uid = obj["metadata"]["uid"]
            try:  # the real garbage collector also removes dependents whose owners never existed
                asyncio.get_running_loop().call_soon(self._collect_if_orphaned, uid)
            except RuntimeError:
                self._collect_if_orphaned(uid)

    def _after_delete(self, spec: ResourceSpec, obj: JSON) -> None:
        meta = obj["metadata"]
        if spec.ref == CRD_RESOURCE:
            for ref in [r for r, s in self._specs.items() if s.crd_name == meta["name"]]:
                self._uninstall(ref)
        if spec.ref == "v1/namespaces":
            self._terminating.discard(meta["name"])
        self._collect_dependents(meta.get("uid", ""))
        if spec.namespaced and meta.get("namespace") in self._terminating:
            self._finalize_namespace(meta["namespace"])

    def _all_live(self) -> Iterator[tuple[ResourceSpec, Key, JSON]]:
        for ref, objs in list(self._live.items()):
            if ref in self._specs or ref in self.resources:
                spec = self._spec_for(ref)
                for key, obj in list(objs.items()):
                    yield spec, key, obj

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

    def _collect_dependents(self, uid: str) -> None:
        """Background cascading deletion: dependents go when none of their owners is left."""
        for dependent in sorted(self._dependents.pop(uid, set())):
            self._collect_if_orphaned(dependent)

    def _collect_if_orphaned(self, uid: str) -> None:
        where = self._uids.get(uid)
        if where is None:
            return
        spec = self._spec_for(where[0])
        obj = self._live[spec.ref][where[1]]
        owners = obj["metadata"].get("ownerReferences") or []
        if owners and not any(o.get("uid") in self._uids for o in owners):
            self.delete_object(spec, where[1][0], where[1][1])

    def _orphan_dependents(self, uid: str) -> None:
        for dependent in sorted(self._dependents.get(uid, set())):
            if (where := self._uids.get(dependent)) is None:
                continue
            spec = self._spec_for(where[0])
            obj = self._live[spec.ref][where[1]]
            candidate = copy.deepcopy(obj)
            kept = [o for o in candidate["metadata"].get("ownerReferences") or [] if o.get("uid") != uid]
            candidate["metadata"]["ownerReferences"] = kept
            if not kept:
                del candidate["metadata"]["ownerReferences"]
            self._update(spec, obj, candidate, None, False, None, None)

    def _drain_namespace(self, namespace: str) -> None:
        for spec, key, obj in self._all_live():
            gone = key not in self._live[spec.ref]  # already cascaded away during this loop
            if (
                spec.namespaced
                and key[0] == namespace
                and not gone
                and not obj["metadata"].get("deletionTimestamp")
            ):
                self.delete_object(spec, key[0], key[1])

    def _finalize_namespace(self, namespace: str) -> None:
        """The namespace controller's last step: an emptied terminating namespace goes away."""
        spec = self._spec_for(kmock.resource("", "v1", "namespaces"))
        ns_obj = self._live[spec.ref].get((None, namespace))
        if ns_obj is None or not ns_obj["metadata"].get("deletionTimestamp"):
            return
        if any(key[0] == namespace for objs in self._live.values() for key in objs):
            return
        final = copy.deepcopy(ns_obj)
        final["spec"]["finalizers"] = []
        if _releasable(final):
            self._commit(spec, (None, namespace), "DELETED", final)
        else:
            self._commit(spec, (None, namespace), "MODIFIED", final)

    # ---------------------------------------------------------------- watch

    def _bookmark(self, spec: ResourceSpec) -> JSON:
        return {
            "kind": spec.kind,
            "apiVersion": spec.api_version,
            "metadata": {"resourceVersion": str(self._rv)},
        }

    def _backlog(
        self, spec: ResourceSpec, flt: _Filter, params: Mapping[str, str]
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
            raise _error(400, "BadRequest", f"invalid resource version: {since!r}") from None
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
        self, request: kmock.Request, spec: ResourceSpec, flt: _Filter
    ) -> aiohttp.web.StreamResponse:
        params = request.params
        timeout = float(params.get("timeoutSeconds") or 0) or None
        bookmarks = params.get("allowWatchBookmarks", "").lower() == "true"
        # Synchronous: take the backlog and subscribe at the same instant, so no change is lost or doubled.
        backlog, gone = self._backlog(spec, flt, params)
        watcher = _Watcher(spec.ref, asyncio.Queue())
        self._watchers.add(watcher)
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout else None

        table = tables.wants_table(request.headers.get("Accept", ""))

        def line(kind: str, obj: JSON) -> bytes:
            if table and kind in ("ADDED", "MODIFIED", "DELETED"):  # kubectl get -w: one-row tables
                obj = spec.as_table([obj], {"resourceVersion": obj["metadata"]["resourceVersion"]}, params)
            return json.dumps({"type": kind, "object": obj}, separators=(",", ":")).encode() + b"\n"

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
                    await response.write(line(*event))
            await response.write_eof()
        except ConnectionError:
            pass  # the client went away
        finally:
            self._watchers.discard(watcher)
        return response

    def close_watches(self) -> None:
        """End every watch stream cleanly (clients see EOF and reconnect): used at shutdown."""
        for watcher in self._watchers:
            watcher.queue.put_nowait(None)


# -------------------------------------------------------------------- servers


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
        return copy.deepcopy(
            self.emulator._live[spec.ref].get((namespace if spec.namespaced else None, name))
        )

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
