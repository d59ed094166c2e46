"""CustomResourceDefinitions: served as soon as they are created, like kube-apiserver's apiextensions.

A CRD's versions become resources (discovery, OpenAPI, the verbs) with their structural schema
(pruning, defaulting, validation), status subresource and printer columns; updating a CRD re-serves
it, deleting it deletes its objects and closes its watches. CRDs may also be registered from YAML
files or declared by hand (:meth:`Crds.declare_resource`).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs
import kmock
import yaml

from kvswitch_testbed.apiserver_gc import Collector
from kvswitch_testbed.apiserver_schema import StructuralSchema
from kvswitch_testbed.apiserver_types import (
    ALL_VERBS,
    CRD_RESOURCE,
    JSON,
    ResourceSpec,
    error,
    now,
)


@attrs.define(kw_only=True)
class Crds(Collector):
    """The apiextensions layer: CRD objects install, update and remove served resources."""

    def _prepare_create(self, spec: ResourceSpec, obj: JSON) -> None:
        super()._prepare_create(spec, obj)
        if spec.ref == CRD_RESOURCE:
            self._check_crd(obj)
            obj["status"] = self._crd_status(obj)

    def _prepare_update(self, spec: ResourceSpec, old: JSON, new: JSON) -> None:
        super()._prepare_update(spec, old, new)
        if spec.ref == CRD_RESOURCE:
            self._check_crd(new)
            new["status"] = self._crd_status(new)

    def _after_create(self, spec: ResourceSpec, obj: JSON) -> None:
        if spec.ref == CRD_RESOURCE:
            self._install_crd(obj)
        super()._after_create(spec, obj)

    def _after_update(self, spec: ResourceSpec, obj: JSON) -> None:
        super()._after_update(spec, obj)
        if spec.ref == CRD_RESOURCE:
            self._install_crd(obj)

    def _after_delete(self, spec: ResourceSpec, obj: JSON) -> None:
        if spec.ref == CRD_RESOURCE:
            for ref in [r for r, s in self._specs.items() if s.crd_name == obj["metadata"]["name"]]:
                self._uninstall(ref)
        super()._after_delete(spec, obj)

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
            raise error(
                422,
                "Invalid",
                message,
                name=name,
                group="apiextensions.k8s.io",
                kind="CustomResourceDefinition",
            )

    def _crd_status(self, crd: JSON) -> JSON:
        spec = crd["spec"]
        stamp = now()
        conditions = [
            {"type": t, "status": "True", "reason": r, "message": m, "lastTransitionTime": stamp}
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
