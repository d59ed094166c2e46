"""Server-side printing (``Accept: ...;as=Table``), so that ``kubectl get`` shows real columns.

Without it kubectl falls back to NAME and AGE only; with it ``kubectl get pods -o wide`` shows pod IPs
and nodes, and ``kubectl get vsc`` shows the CRD's additionalPrinterColumns, as on a real cluster.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

JSON = dict[str, Any]
Column = tuple[JSON, Callable[[Mapping[str, Any]], Any]]


def wants_table(accept: str) -> bool:
    return "as=Table" in accept


def human_age(timestamp: str | None, now: datetime.datetime | None = None) -> str:
    """kubectl's AGE: ``42s``, ``5m3s``, ``3h``, ``2d4h``... (apimachinery's HumanDuration)."""
    if not timestamp:
        return "<unknown>"
    try:
        then = datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return "<invalid>"
    seconds = int(((now or datetime.datetime.now(datetime.UTC)) - then).total_seconds())
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if seconds < 0:
        return "0s"
    if seconds < 120:
        return f"{seconds}s"
    if minutes < 10:
        return f"{minutes}m{seconds % 60}s" if seconds % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 192:
        return f"{days}d{hours % 24}h" if hours % 24 else f"{days}d"
    if days < 730:
        return f"{days}d"
    return f"{days // 365}y{days % 365}d" if days < 2920 and days % 365 else f"{days // 365}y"


_SEGMENT = re.compile(r"\.([^.\[]+)|\[(\d+|\*)\]|\[\?\(@\.([\w.]+)\s*==\s*[\"']([^\"']*)[\"']\)\]")


def jsonpath(obj: Any, path: str) -> list[Any]:
    """The JSONPath subset printer columns use: ``.a.b``, ``[0]``, ``[*]``, ``[?(@.type=="Ready")]``."""
    path = path.strip().removeprefix("{").removesuffix("}").removeprefix("$")
    values = [obj]
    pos = 0
    while pos < len(path):
        m = _SEGMENT.match(path, pos)
        if not m:
            return []
        pos = m.end()
        field, index, key, expected = m.groups()
        out: list[Any] = []
        for value in values:
            if field is not None and isinstance(value, Mapping) and field in value:
                out.append(value[field])
            elif index is not None and isinstance(value, list):
                out.extend(value if index == "*" else value[int(index) : int(index) + 1])
            elif key is not None and isinstance(value, list):
                out.extend(v for v in value if isinstance(v, Mapping) and str(_dig(v, key)) == expected)
        values = out
    return values


def _dig(obj: Mapping[str, Any], dotted: str) -> Any:
    value: Any = obj
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def _column(name: str, kind: str = "string", fmt: str = "", priority: int = 0, description: str = "") -> JSON:
    return {
        "name": name,
        "type": kind,
        "format": fmt,
        "description": description or name,
        "priority": priority,
    }


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


NAME: Column = (_column("Name", fmt="name"), lambda o: _meta(o).get("name"))
AGE: Column = (_column("Age"), lambda o: human_age(_meta(o).get("creationTimestamp")))


def _pod_ready(pod: Mapping[str, Any]) -> str:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    total = len((pod.get("spec") or {}).get("containers") or [])
    return f"{sum(1 for s in statuses if s.get('ready'))}/{total}"


def _pod_status(pod: Mapping[str, Any]) -> str:
    if _meta(pod).get("deletionTimestamp"):
        return "Terminating"
    return str((pod.get("status") or {}).get("phase") or "Unknown")


def _node_status(node: Mapping[str, Any]) -> str:
    conditions = (node.get("status") or {}).get("conditions") or []
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
    status = "Ready" if ready else "NotReady"
    return status + (",SchedulingDisabled" if (node.get("spec") or {}).get("unschedulable") else "")


def _node_roles(node: Mapping[str, Any]) -> str:
    prefix = "node-role.kubernetes.io/"
    roles = sorted(k.removeprefix(prefix) for k in (_meta(node).get("labels") or {}) if k.startswith(prefix))
    return ",".join(roles) or "<none>"


def _service_external_ip(svc: Mapping[str, Any]) -> str:
    spec = svc.get("spec") or {}
    if spec.get("type") == "ExternalName":
        return str(spec.get("externalName") or "<none>")
    ingress = ((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
    found = [str(i.get("ip") or i.get("hostname")) for i in ingress] + list(spec.get("externalIPs") or [])
    if found:
        return ",".join(found)
    return "<pending>" if spec.get("type") == "LoadBalancer" else "<none>"


def _service_ports(svc: Mapping[str, Any]) -> str:
    ports = (svc.get("spec") or {}).get("ports") or []
    shown = [
        f"{p.get('port')}"
        + (f":{p['nodePort']}" if p.get("nodePort") else "")
        + f"/{p.get('protocol', 'TCP')}"
        for p in ports
    ]
    return ",".join(shown) or "<none>"


def _selector(svc: Mapping[str, Any]) -> str:
    selector = (svc.get("spec") or {}).get("selector") or {}
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items())) or "<none>"


def _slice_ports(eps: Mapping[str, Any]) -> str:
    return ",".join(str(p.get("port")) for p in eps.get("ports") or []) or "<unset>"


def _slice_endpoints(eps: Mapping[str, Any]) -> str:
    addresses = [a for e in eps.get("endpoints") or [] for a in e.get("addresses") or []]
    if not addresses:
        return "<unset>"
    more = f" + {len(addresses) - 3} more..." if len(addresses) > 3 else ""
    return ",".join(addresses[:3]) + more


BUILTIN_COLUMNS: Mapping[tuple[str, str], Sequence[Column]] = {
    ("", "pods"): [
        NAME,
        (_column("Ready"), _pod_ready),
        (_column("Status"), _pod_status),
        (
            _column("Restarts", "integer"),
            lambda p: sum(
                s.get("restartCount", 0) for s in (p.get("status") or {}).get("containerStatuses") or []
            ),
        ),
        AGE,
        (_column("IP", priority=1), lambda p: (p.get("status") or {}).get("podIP") or "<none>"),
        (_column("Node", priority=1), lambda p: (p.get("spec") or {}).get("nodeName") or "<none>"),
    ],
    ("", "nodes"): [
        NAME,
        (_column("Status"), _node_status),
        (_column("Roles"), _node_roles),
        AGE,
        (
            _column("Version"),
            lambda n: ((n.get("status") or {}).get("nodeInfo") or {}).get("kubeletVersion", ""),
        ),
        (
            _column("Internal-IP", priority=1),
            lambda n: next(
                (
                    a.get("address")
                    for a in (n.get("status") or {}).get("addresses") or []
                    if a.get("type") == "InternalIP"
                ),
                None,
            ),
        ),
    ],
    ("", "namespaces"): [NAME, (_column("Status"), lambda n: (n.get("status") or {}).get("phase")), AGE],
    ("", "services"): [
        NAME,
        (_column("Type"), lambda s: (s.get("spec") or {}).get("type")),
        (_column("Cluster-IP"), lambda s: (s.get("spec") or {}).get("clusterIP") or "<none>"),
        (_column("External-IP"), _service_external_ip),
        (_column("Port(s)"), _service_ports),
        AGE,
        (_column("Selector", priority=1), _selector),
    ],
    ("discovery.k8s.io", "endpointslices"): [
        NAME,
        (_column("AddressType"), lambda e: e.get("addressType")),
        (_column("Ports"), _slice_ports),
        (_column("Endpoints"), _slice_endpoints),
        AGE,
    ],
}


def printer_columns(definitions: Sequence[Mapping[str, Any]]) -> list[Column]:
    """A CRD version's additionalPrinterColumns (Name first; none given means Name and Age)."""
    if not definitions:
        return [NAME, AGE]
    columns = [NAME]
    for d in definitions:
        kind, path = str(d.get("type", "string")), str(d.get("jsonPath", ""))

        def cell(obj: Mapping[str, Any], kind: str = kind, path: str = path) -> Any:
            found = jsonpath(obj, path)
            if not found:
                return None
            return human_age(str(found[0])) if kind == "date" else found[0]

        definition = _column(str(d["name"]), kind, str(d.get("format", "")), int(d.get("priority", 0)))
        definition["description"] = str(d.get("description", d["name"]))
        columns.append((definition, cell))
    return columns


def _row_object(obj: Mapping[str, Any], include: str) -> JSON | None:
    if include == "None":
        return None
    if include == "Object":
        return dict(obj)
    return {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": dict(_meta(obj))}


def table(
    columns: Sequence[Column], objects: Sequence[Mapping[str, Any]], metadata: JSON, include: str = "Metadata"
) -> JSON:
    def rows() -> Iterator[JSON]:
        for obj in objects:
            yield {"cells": [fn(obj) for _, fn in columns], "object": _row_object(obj, include)}

    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": metadata,
        "columnDefinitions": [definition for definition, _ in columns],
        "rows": list(rows()),
    }
