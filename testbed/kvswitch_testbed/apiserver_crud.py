"""Create, read, replace, patch and delete: the API's write semantics on top of the store.

Names, types, system metadata, status subresources, resourceVersion preconditions, the three PATCH
flavours and apply, generation, finalizers, DeleteOptions (preconditions, orphaning) and pod binding.
Kind-specific behaviour comes from the layers above through five hooks, each extended with super():
:meth:`Crud._prepare_create`, :meth:`Crud._prepare_update` (defaulting and validation before the
write), :meth:`Crud._after_create`, :meth:`Crud._after_update` and :meth:`Crud._begin_termination`.
"""

from __future__ import annotations

import copy
import json
import random
import re
import uuid
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

import attrs
import kmock
import yaml

from kvswitch_testbed.apiserver_patches import PatchError, json_patch, merge_patch, strategic_merge_patch
from kvswitch_testbed.apiserver_schema import Cause
from kvswitch_testbed.apiserver_store import Store
from kvswitch_testbed.apiserver_types import (
    JSON,
    NAMESPACES,
    Key,
    ResourceSpec,
    error,
    meta_of,
    now,
    releasable,
)

# System metadata that clients cannot set: kept from the stored object on every update.
_SYSTEM_META = ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "generation")
_STATUS_ON_CREATE: Mapping[tuple[str, str], JSON] = {
    ("", "pods"): {"phase": "Pending"},
    ("", "namespaces"): {"phase": "Active"},
    ("", "services"): {"loadBalancer": {}},
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
        ("discovery.k8s.io", "endpointslices"),
    }
)
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_GENERATE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


@attrs.define(kw_only=True)
class Crud(Store):
    """The API's verbs on the store; synchronous, to be called in the server's loop."""

    # ---------------------------------------------------------------- hooks for the layers above

    def _prepare_create(self, spec: ResourceSpec, obj: JSON) -> None:
        """Default and validate a new object in place (metadata and status are already set)."""

    def _prepare_update(self, spec: ResourceSpec, old: JSON, new: JSON) -> None:
        """Default and validate an update of the main resource (not of a subresource) in place."""

    def _after_create(self, spec: ResourceSpec, obj: JSON) -> None:
        """Called once a new object is stored."""

    def _after_update(self, spec: ResourceSpec, obj: JSON) -> None:
        """Called once a modified object is stored."""

    def _begin_termination(self, spec: ResourceSpec, key: Key, obj: JSON) -> JSON:
        """Store an object marked for deletion that cannot go yet (finalizers); returns its state."""
        return self._commit(spec, key, "MODIFIED", obj)

    # ---------------------------------------------------------------- admission

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
                raise error(
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
            raise error(
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
            raise error(400, "BadRequest", "the object must be a JSON object")
        obj = copy.deepcopy(dict(body))
        meta = meta_of(obj)
        self._check_type(spec, obj)
        ns: str | None = None
        if spec.namespaced:
            ns = namespace or meta.get("namespace")
            if not ns:
                raise error(400, "BadRequest", "the namespace of the object must be set")
            if meta.get("namespace") not in (None, "", ns):
                raise error(
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
            raise error(
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
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=now(), generation=1)
        if spec.status_subresource and (spec.group, spec.plural) not in _KEEP_STATUS_ON_CREATE:
            obj.pop("status", None)
            if status := _STATUS_ON_CREATE.get((spec.group, spec.plural)):
                obj["status"] = copy.deepcopy(status)
        self._prepare_create(spec, obj)
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
            raise error(400, "BadRequest", "the object must be a JSON object")
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
                raise error(400, "BadRequest", f"error decoding YAML: {e}") from None
            if not isinstance(document, dict):
                raise error(400, "BadRequest", "an apply patch must be an object")
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
                raise error(400, "BadRequest", f"error decoding the patch: {e}") from None
            if content_type == "application/json-patch+json":
                if not isinstance(ops, list):
                    raise error(400, "BadRequest", "a JSON patch must be a list of operations")
                apply = json_patch
            elif content_type == "application/merge-patch+json":
                apply = merge_patch
            elif content_type == "application/strategic-merge-patch+json" and spec.crd_name is None:
                apply = strategic_merge_patch
            else:
                raise error(
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
            raise error(
                422, "Invalid", f"the server rejected our request due to an error in our request: {e}"
            ) from None
        if not isinstance(candidate, dict):
            raise error(422, "Invalid", "the patched object is not a JSON object")
        # A resourceVersion in a merge patch is a precondition; the one copied from the stored object is not.
        patch_meta = ops.get("metadata") if isinstance(ops, dict) else None
        if not (isinstance(patch_meta, dict) and patch_meta.get("resourceVersion")):
            meta_of(candidate).pop("resourceVersion", None)
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
        meta = meta_of(candidate)
        if meta.get("name") not in (None, "", name):
            raise error(
                400,
                "BadRequest",
                f"the name of the object ({meta['name']}) does not match the name on the URL ({name})",
            )
        if spec.namespaced and meta.get("namespace") not in (None, "", ns):
            raise error(
                400,
                "BadRequest",
                "the namespace of the provided object does not match the namespace sent on the request",
            )
        if meta.get("resourceVersion") not in (None, "", old_meta["resourceVersion"]):
            raise error(
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
        elif subresource == "finalize" and spec.ref == NAMESPACES:
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
            self._prepare_update(spec, old, new)
        new_meta = meta_of(new)
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
        if new_meta.get("deletionTimestamp") and releasable(new):
            return self._commit(spec, key, "DELETED", new)
        result = self._commit(spec, key, "MODIFIED", new)
        self._after_update(spec, result)
        return result

    def _bind(self, spec: ResourceSpec, ns: str | None, name: str, body: JSON) -> JSON:
        """POST pods/NAME/binding: what a scheduler does (there is none here)."""
        pod = self._get(spec, ns, name)
        node = ((body.get("target") or {}).get("name")) or ""
        if current := (pod.get("spec") or {}).get("nodeName"):
            raise error(409, "Conflict", f'pod {name} is already assigned to node "{current}"')
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
                raise error(
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
        if releasable(old) and spec.ref != NAMESPACES:  # namespaces always go through termination
            return self._commit(spec, key, "DELETED", old)
        new = copy.deepcopy(old)
        new_meta = new["metadata"]
        new_meta.update(deletionTimestamp=now(), deletionGracePeriodSeconds=0)
        new_meta["generation"] = int(new_meta.get("generation") or 0) + 1
        return self._begin_termination(spec, key, new)

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

    def _orphan_dependents(self, uid: str) -> None:
        """propagationPolicy Orphan: the owner's dependents lose their reference to it and stay."""
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
