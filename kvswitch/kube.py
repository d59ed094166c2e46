"""The few Kubernetes API calls the operators make themselves (kopf handles watching and events)."""

from __future__ import annotations

import os
from typing import Any

from kubernetes_asyncio import client, config

from kvswitch.config import GROUP, PLURAL, VERSION


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
    """CRUD of the cluster-scoped VSwitchConfig resource."""

    def __init__(self, api: client.ApiClient) -> None:
        self.api = client.CustomObjectsApi(api)

    async def list(self) -> list[dict[str, Any]]:
        result = await self.api.list_cluster_custom_object(GROUP, VERSION, PLURAL)
        items: list[dict[str, Any]] = result.get("items", [])
        return items

    async def get(self, name: str) -> dict[str, Any] | None:
        try:
            obj: dict[str, Any] = await self.api.get_cluster_custom_object(GROUP, VERSION, PLURAL, name)
        except client.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return obj

    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        obj: dict[str, Any] = await self.api.create_cluster_custom_object(GROUP, VERSION, PLURAL, body)
        return obj

    async def patch(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        obj: dict[str, Any] = await self.api.patch_cluster_custom_object(
            GROUP, VERSION, PLURAL, name, patch, **MERGE_PATCH
        )
        return obj

    async def patch_status(self, name: str, status: dict[str, Any]) -> None:
        await self.api.patch_cluster_custom_object_status(
            GROUP, VERSION, PLURAL, name, {"status": status}, **MERGE_PATCH
        )

    async def delete(self, name: str) -> None:
        try:
            await self.api.delete_cluster_custom_object(GROUP, VERSION, PLURAL, name)
        except client.ApiException as exc:
            if exc.status != 404:
                raise
