"""The fake API server's shared vocabulary: parsed URLs, served resources, changes, filters, errors.

Every layer of the emulator (store, CRUD, garbage collection, CRDs, Services, watch, discovery, HTTP)
imports from here and from nowhere above itself; see README.md next to this file for the layout.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import re
from collections.abc import Mapping
from typing import Any

import kmock

from kvswitch_testbed import apiserver_tables as tables
from kvswitch_testbed.apiserver_schema import StructuralSchema
from kvswitch_testbed.apiserver_selectors import FieldSelector, LabelSelector

JSON = dict[str, Any]
ResourceLike = str | kmock.resource
Key = tuple[str | None, str]  # (namespace, name) within one resource
ApiError = kmock.KubernetesError  # raised by the helpers; .status, .reason, .message, .details

SYSTEM_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
CRD_RESOURCE = kmock.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")
NAMESPACES = kmock.resource("", "v1", "namespaces")
PODS = kmock.resource("", "v1", "pods")
SERVICES = kmock.resource("", "v1", "services")
EVENT_RESOURCES = (kmock.resource("", "v1", "events"), kmock.resource("events.k8s.io", "v1", "events"))

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


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def error(code: int, reason: str, message: str, **details: Any) -> kmock.KubernetesError:
    return kmock.KubernetesError(status=code, reason=reason, message=message, details=details)


def not_found() -> kmock.KubernetesError:
    return error(404, "NotFound", "the server could not find the requested resource")


def version_priority(version: str) -> tuple[int, int, int]:
    """Sort key putting v2 > v1 > v1beta2 > v1beta1 > v1alpha1, as discovery does."""
    m = re.fullmatch(r"v(\d+)(?:(alpha|beta)(\d+))?", version)
    if not m:
        return (-1, 0, 0)
    stability = {"alpha": 0, "beta": 1, None: 2}[m[2]]
    return (stability, int(m[1]), int(m[3] or 0))


def is_watch(params: Mapping[str, str]) -> bool:
    return params.get("watch", "").lower() in ("true", "1")


def meta_of(obj: JSON) -> JSON:
    """An object's metadata, created empty if missing or not a dict."""
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        meta = obj["metadata"] = {}
    return meta


def releasable(obj: Mapping[str, Any]) -> bool:
    """Whether a terminating object may go: no finalizers left (namespaces also wait for their content)."""
    meta = obj.get("metadata") or {}
    spec_finalizers = (obj.get("spec") or {}).get("finalizers") if obj.get("kind") == "Namespace" else None
    return not meta.get("finalizers") and not spec_finalizers


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


@dataclasses.dataclass(frozen=True)
class Change:
    """One committed write, as the watch cache keeps it."""

    rv: int
    ref: kmock.resource
    type: str  # ADDED, MODIFIED, DELETED
    obj: JSON
    old: JSON | None


@dataclasses.dataclass(frozen=True)
class Filter:
    """What a list or watch request selects: namespace, name, label and field selectors."""

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

    def event(self, change: Change) -> tuple[str, JSON] | None:
        """The event a watcher with this filter sees: objects entering or leaving it are ADDED/DELETED."""
        after = self(change.obj)
        if change.type == "ADDED":
            return ("ADDED", change.obj) if after else None
        if change.type == "DELETED":
            return ("DELETED", change.obj) if after or self(change.old) else None
        before = self(change.old)
        if before and after:
            return ("MODIFIED", change.obj)
        if after:
            return ("ADDED", change.obj)
        return ("DELETED", change.obj) if before else None


@dataclasses.dataclass(eq=False)
class Watcher:
    """A subscriber to the changes of one resource; None in its queue means "stop"."""

    ref: kmock.resource
    queue: asyncio.Queue[Change | None]
