"""Discovery and OpenAPI, as kubectl, kopf and kubernetes-asyncio read them.

KMock's discovery scaffold, corrected: the core group says ``v1`` (not ``/v1``), only served
resources are listed (not those of deleted CRDs), groups list their versions by priority, and
subresources appear. OpenAPI v3 is just enough for kubectl to see server-side field validation.
"""

from __future__ import annotations

import collections

import attrs
import kmock

from kvswitch_testbed.apiserver_types import ALL_VERBS, JSON, ApiPath, not_found, version_priority
from kvswitch_testbed.apiserver_watch import Watches


@attrs.define(kw_only=True)
class Discovery(Watches):
    """``/api``, ``/apis``, their groups and versions, and ``/openapi/v3``."""

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
        return {g: sorted(vs, key=version_priority, reverse=True) for g, vs in sorted(groups.items())}

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
            raise not_found()
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
            raise not_found()
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
            raise not_found()
        return {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.26.4"}, "paths": paths}
