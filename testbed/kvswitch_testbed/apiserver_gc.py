"""What kube-controller-manager's garbage collector and namespace controller do, done synchronously.

Background cascading deletion through ownerReferences (dependents whose owners are all gone are
deleted, also those whose owners never existed), namespace termination (a deleted namespace turns
Terminating, its content is deleted, and it goes once empty and finalized), and Event expiry (the
oldest Events are deleted past ``max_events`` per resource, as their TTL would).
"""

from __future__ import annotations

import asyncio
import copy

import attrs

from kvswitch_testbed.apiserver_crud import Crud
from kvswitch_testbed.apiserver_types import (
    EVENT_RESOURCES,
    JSON,
    NAMESPACES,
    Key,
    ResourceSpec,
    releasable,
)


@attrs.define(kw_only=True)
class Collector(Crud):
    """Garbage collection, namespace lifecycle and Event expiry on top of the verbs."""

    max_events: int = 2_000  # Event objects kept per resource, oldest deleted first (real ones expire)

    _terminating: set[str] = attrs.field(factory=set, init=False)

    def _prepare_create(self, spec: ResourceSpec, obj: JSON) -> None:
        super()._prepare_create(spec, obj)
        if spec.ref == NAMESPACES:
            obj.setdefault("spec", {})["finalizers"] = ["kubernetes"]
            obj["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = obj["metadata"]["name"]

    def _after_create(self, spec: ResourceSpec, obj: JSON) -> None:
        super()._after_create(spec, obj)
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

    def _begin_termination(self, spec: ResourceSpec, key: Key, obj: JSON) -> JSON:
        if spec.ref != NAMESPACES:
            return super()._begin_termination(spec, key, obj)
        name = key[1]
        obj["status"] = {**(obj.get("status") or {}), "phase": "Terminating"}
        result = super()._begin_termination(spec, key, obj)
        self._terminating.add(name)
        self._drain_namespace(name)
        self._finalize_namespace(name)
        return self._live[spec.ref].get(key, result)

    def _after_delete(self, spec: ResourceSpec, obj: JSON) -> None:
        super()._after_delete(spec, obj)
        meta = obj["metadata"]
        if spec.ref == NAMESPACES:
            self._terminating.discard(meta["name"])
        self._collect_dependents(meta.get("uid", ""))
        if spec.namespaced and meta.get("namespace") in self._terminating:
            self._finalize_namespace(meta["namespace"])

    # ---------------------------------------------------------------- garbage collection

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

    # ---------------------------------------------------------------- namespaces

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
        spec = self._spec_for(NAMESPACES)
        ns_obj = self._live[spec.ref].get((None, namespace))
        if ns_obj is None or not ns_obj["metadata"].get("deletionTimestamp"):
            return
        if any(key[0] == namespace for objs in self._live.values() for key in objs):
            return
        final = copy.deepcopy(ns_obj)
        final["spec"]["finalizers"] = []
        if releasable(final):
            self._commit(spec, (None, namespace), "DELETED", final)
        else:
            self._commit(spec, (None, namespace), "MODIFIED", final)
