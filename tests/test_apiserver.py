"""The fake Kubernetes API server against real clients: kubernetes-asyncio, kopf (thread and CLI), kubectl.

Each test starts its own server on port 0. Every gap of plain KMock listed in
testbed/kvswitch_testbed/README.md is exercised here through a real client, not through the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import kopf
import pytest
import yaml
from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.exceptions import ApiException
from kvswitch_testbed.apiserver import ApiError, ApiServer, ApiServerThread, login, write_kubeconfig
from kvswitch_testbed.netns import netns_socket
from kvswitch_testbed.netns import run as netns_run

REPO = Path(__file__).resolve().parent.parent
VSC = ("kvswitch.io", "v1alpha1", "vswitchconfigs")
IPV4 = r"((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
CIDR = {"type": "string", "pattern": rf"^{IPV4}/(3[0-2]|[12][0-9]|[0-9])$"}
# A cut-down VSwitchConfig schema, so that these tests do not depend on crds/ (tested separately below).
VSC_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "spec": {
            "type": "object",
            "required": ["podCIDR", "overlayIP"],
            "properties": {
                "podCIDR": CIDR,
                "overlayIP": {"type": "string", "pattern": rf"^{IPV4}$"},
                "overlayType": {"type": "string", "enum": ["vxlan", "gre", "geneve"]},
                "mtu": {"type": "integer", "minimum": 576, "maximum": 9216},
            },
        },
        "status": {
            "type": "object",
            "properties": {
                "observedGeneration": {"type": "integer"},
                "conditions": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["type", "status"],
                        "properties": {
                            "type": {"type": "string"},
                            "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
                        },
                    },
                },
            },
        },
    },
}
SPEC = {"podCIDR": "10.244.1.0/24", "overlayIP": "192.168.10.11", "overlayType": "vxlan"}
CONTAINERS = [{"name": "main", "image": "pause"}]


def vsc(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kvswitch.io/v1alpha1",
        "kind": "VSwitchConfig",
        "metadata": {"name": name},
        "spec": {**SPEC, **spec},
    }


def pod(name: str, node: str | None = None, **labels: str) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": CONTAINERS, **({"nodeName": node} if node else {})}
    return {"metadata": {"name": name, "labels": labels}, "spec": spec}


def v1pod(name: str, node: str | None = None, **labels: str) -> client.V1Pod:
    containers = [client.V1Container(name="main", image="pause")]
    meta = client.V1ObjectMeta(name=name, labels=labels or None)
    return client.V1Pod(metadata=meta, spec=client.V1PodSpec(containers=containers, node_name=node))


def named(model: Any, name: str) -> Any:
    """A kubernetes-asyncio model (V1Node, V1Namespace) with just a name."""
    return model(metadata=client.V1ObjectMeta(name=name))


def status_of(exc: ApiException) -> dict[str, Any]:
    status: dict[str, Any] = json.loads(exc.body or b"{}")
    return status


def eventually(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Poll a condition from synchronous code; return its first truthy value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.02)
    raise AssertionError(f"condition not met within {timeout}s: {check}")


async def aeventually(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        await asyncio.sleep(0.02)
    raise AssertionError(f"condition not met within {timeout}s: {check}")


def declare_vsc(server: ApiServer | ApiServerThread) -> None:
    columns = [{"name": "Pod CIDR", "type": "string", "jsonPath": ".spec.podCIDR"}]
    columns += [
        {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'}
    ]
    server.declare_resource(
        *VSC, kind="VSwitchConfig", schema=VSC_SCHEMA, short_names=["vsc"], printer_columns=columns
    )


@pytest.fixture
async def server() -> AsyncIterator[ApiServer]:
    srv = ApiServer(bookmark_interval=0.2)
    declare_vsc(srv)
    async with srv.serving():
        yield srv


@pytest.fixture
async def api(server: ApiServer, tmp_path: Path) -> AsyncIterator[client.ApiClient]:
    """A kubernetes-asyncio client logged in through a kubeconfig written by write_kubeconfig()."""
    async with await login(server.url, tmp_path / "kubeconfig") as api_client:
        yield api_client


@pytest.fixture
async def http(server: ApiServer) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(server.url) as session:
        yield session


async def test_metadata_namespaces_status_and_conflicts(api: client.ApiClient) -> None:
    v1 = client.CoreV1Api(api)
    node = await v1.create_node(named(client.V1Node, "node-a"))
    assert node.metadata.uid and node.metadata.creation_timestamp and node.metadata.generation == 1
    assert node.metadata.namespace is None  # cluster-scoped

    created = await v1.create_namespaced_pod("default", v1pod("p1", app="web"))  # no namespace in the body
    assert created.metadata.namespace == "default"
    assert int(created.metadata.resource_version) > int(node.metadata.resource_version)  # cluster-wide
    assert created.status.phase == "Pending"

    labelled = await v1.patch_namespaced_pod("p1", "default", {"metadata": {"labels": {"tier": "fe"}}})
    assert labelled.metadata.generation == 1  # metadata only
    assert labelled.metadata.labels == {"app": "web", "tier": "fe"}
    assert int(labelled.metadata.resource_version) > int(created.metadata.resource_version)

    # kubernetes-asyncio sends strategic merge patches for dicts: containers merge by name.
    sidecar = {"spec": {"containers": [{"name": "sidecar", "image": "envoy"}]}}
    respec = await v1.patch_namespaced_pod("p1", "default", sidecar)
    assert [c.name for c in respec.spec.containers] == ["main", "sidecar"]
    assert respec.metadata.generation == 2

    status = {"status": {"podIP": "10.244.1.5"}, "spec": {"nodeName": "node-a"}, "metadata": {"labels": None}}
    patched = await v1.patch_namespaced_pod_status("p1", "default", status)
    assert patched.status.pod_ip == "10.244.1.5"
    assert patched.spec.node_name is None and patched.metadata.labels == {"app": "web", "tier": "fe"}
    assert patched.metadata.generation == 2

    ignored = await v1.patch_namespaced_pod("p1", "default", {"status": {"podIP": "1.2.3.4"}})
    assert ignored.status.pod_ip == "10.244.1.5"  # the main resource ignores .status
    assert ignored.metadata.resource_version == patched.metadata.resource_version  # a no-op: no new version

    whole = api.sanitize_for_serialization(patched)
    whole["status"]["phase"], whole["spec"]["containers"][0]["image"] = "Running", "ignored"
    running = await v1.replace_namespaced_pod_status("p1", "default", whole)  # PUT /status
    assert running.status.phase == "Running" and running.spec.containers[0].image == "pause"
    patched = running

    body = api.sanitize_for_serialization(patched)
    body["spec"]["containers"][1]["image"] = "envoy:2"
    replaced = await v1.replace_namespaced_pod("p1", "default", body)
    assert replaced.spec.containers[1].image == "envoy:2" and replaced.metadata.generation == 3
    with pytest.raises(ApiException) as conflict:
        await v1.replace_namespaced_pod("p1", "default", body)  # the same, now stale, resourceVersion
    assert conflict.value.status == 409 and status_of(conflict.value)["reason"] == "Conflict"

    with pytest.raises(ApiException) as exists:
        await v1.create_namespaced_pod("default", v1pod("p1"))
    assert exists.value.status == 409 and status_of(exists.value)["reason"] == "AlreadyExists"
    with pytest.raises(ApiException) as missing:
        await v1.read_namespaced_pod("nope", "default")
    assert missing.value.status == 404 and status_of(missing.value)["message"] == 'pods "nope" not found'

    generated = v1pod("")
    generated.metadata = client.V1ObjectMeta(generate_name="gen-")
    await v1.create_namespaced_pod("default", generated)
    listed = await v1.list_namespaced_pod("default")
    assert listed.kind == "PodList" and int(listed.metadata.resource_version) >= int(
        replaced.metadata.resource_version
    )
    assert sorted(p.metadata.name[:4] for p in listed.items) == ["gen-", "p1"]
    deleted = await v1.delete_namespaced_pod("p1", "default")
    assert deleted.metadata.name == "p1"
    assert [p.metadata.name[:4] for p in (await v1.list_namespaced_pod("default")).items] == ["gen-"]


async def test_label_and_field_selectors_in_list_and_watch(api: client.ApiClient) -> None:
    v1 = client.CoreV1Api(api)
    for name, node, labels in [
        ("a1", "node-a", {"app": "web", "tier": "fe"}),
        ("a2", "node-a", {"app": "db"}),
        ("b1", "node-b", {"app": "web"}),
        ("u1", None, {"app": "web"}),
    ]:
        await v1.create_namespaced_pod("default", v1pod(name, node, **labels))

    async def names(label_selector: str = "", field_selector: str = "") -> list[str]:
        listed = await v1.list_pod_for_all_namespaces(
            label_selector=label_selector, field_selector=field_selector
        )
        return sorted(p.metadata.name for p in listed.items)

    assert await names(label_selector="app=web") == ["a1", "b1", "u1"]
    assert await names(label_selector="app==web,tier") == ["a1"]
    assert await names(label_selector="app!=web") == ["a2"]
    assert await names(label_selector="app in (web, db),!tier") == ["a2", "b1", "u1"]
    assert await names(label_selector="app notin (web)") == ["a2"]
    assert await names(field_selector="spec.nodeName=node-a") == ["a1", "a2"]
    assert await names(field_selector="spec.nodeName!=node-a,metadata.namespace=default") == ["b1", "u1"]
    assert await names(field_selector="spec.nodeName=") == ["u1"]
    assert await names(field_selector="metadata.name==b1", label_selector="app") == ["b1"]
    with pytest.raises(ApiException) as bad:
        await v1.list_pod_for_all_namespaces(label_selector="app in web")
    assert bad.value.status == 400

    # Watch what an agent of node-a watches, resuming from the list's resourceVersion: the changes
    # made before the stream connects are not lost, and objects entering or leaving the selector
    # are ADDED or DELETED for this watcher (kubernetes-asyncio sends watch=True).
    since = (
        await v1.list_namespaced_pod("default", field_selector="spec.nodeName=node-a")
    ).metadata.resource_version

    async def collect(count: int) -> list[tuple[str, str]]:
        seen: list[tuple[str, str]] = []
        selector = "spec.nodeName=node-a"
        async with watch.Watch() as stream:
            kwargs = {"field_selector": selector, "resource_version": since, "timeout_seconds": 5}
            async for event in stream.stream(v1.list_namespaced_pod, "default", **kwargs):
                seen.append((event["type"], event["object"].metadata.name))
                if len(seen) == count:
                    break
        return seen

    watcher = asyncio.create_task(collect(3))
    await v1.patch_namespaced_pod("a1", "default", {"metadata": {"labels": {"seen": "yes"}}})
    await v1.patch_namespaced_pod("b1", "default", {"metadata": {"labels": {"seen": "yes"}}})  # other node
    target = client.V1ObjectReference(kind="Node", name="node-a")
    binding = client.V1Binding(metadata=client.V1ObjectMeta(name="u1"), target=target)
    # The answer is a Status that the generated client cannot parse as a Binding: a known client bug.
    await v1.create_namespaced_binding("default", binding, _preload_content=False)
    await v1.delete_namespaced_pod("a2", "default")
    assert await asyncio.wait_for(watcher, 10) == [("MODIFIED", "a1"), ("ADDED", "u1"), ("DELETED", "a2")]


async def test_watch_versions_timeouts_bookmarks_and_expiry(
    server: ApiServer, http: aiohttp.ClientSession
) -> None:
    server.create("v1/nodes", {"metadata": {"name": "old"}})
    listed = await (await http.get("/api/v1/nodes")).json()
    assert listed["kind"] == "NodeList" and listed["apiVersion"] == "v1"
    since = listed["metadata"]["resourceVersion"]
    server.create("v1/nodes", {"metadata": {"name": "new", "labels": {"role": "worker"}}})

    async def stream(
        query: str, count: int | None = None, path: str = "/api/v1/nodes"
    ) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        async with http.get(f"{path}?{query}", timeout=aiohttp.ClientTimeout(total=10)) as response:
            assert response.status == 200 and response.content_type == "application/json"
            async for line in response.content:
                events.append(json.loads(line))
                if len(events) == count:
                    break
        return events

    # watch=1 from a resourceVersion: only what came later; timeoutSeconds ends the stream (EOF).
    started = time.monotonic()
    events = await stream(f"watch=1&resourceVersion={since}&timeoutSeconds=1")
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "new")]
    assert 0.9 < time.monotonic() - started < 5
    # Without a resourceVersion: the current state first; labelSelector applies to watches too.
    events = await stream("watch=true&labelSelector=role%3Dworker", count=1)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "new")]
    # Bookmarks on idle streams carry the latest resourceVersion.
    events = await stream("watch=true&allowWatchBookmarks=true&fieldSelector=metadata.name%3Dnone", count=1)
    assert events[0]["type"] == "BOOKMARK" and events[0]["object"]["kind"] == "Node"
    assert int(events[0]["object"]["metadata"]["resourceVersion"]) >= int(since) + 1
    # Streaming list (sendInitialEvents): the state, then a bookmark that says the state is complete.
    events = await stream("watch=true&sendInitialEvents=true&allowWatchBookmarks=true", count=3)
    assert [e["type"] for e in events] == ["ADDED", "ADDED", "BOOKMARK"]
    assert events[2]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}
    # A single object by its URL (the legacy form).
    events = await stream("watch=True", count=1, path="/api/v1/nodes/new")
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "new")]

    # resourceVersions that fell out of the watch cache are 410 Gone, like a compacted etcd.
    small = ApiServer(watch_cache_size=3, kopf_peering=False)
    url = await small.start()
    try:
        for i in range(5):
            small.create("v1/nodes", {"metadata": {"name": f"n{i}"}})
        async with (
            aiohttp.ClientSession(url) as session,
            session.get("/api/v1/nodes?watch=1&resourceVersion=1") as rsp,
        ):
            events = [json.loads(line) async for line in rsp.content]
        assert [(e["type"], e["object"]["code"], e["object"]["reason"]) for e in events] == [
            ("ERROR", 410, "Expired")
        ]
        assert small.errors == []
    finally:
        await small.stop()


async def test_paginated_lists_come_from_one_snapshot_like_kube_apiserver(
    server: ApiServer, http: aiohttp.ClientSession
) -> None:
    """limit/continue: pages in namespace-then-name order, each page from the first page's snapshot
    (its resourceVersion throughout; objects created, changed or deleted meanwhile as they were
    then), remainingItemCount unless a selector filters; a token older than the watch cache is
    410 Expired, as after an etcd compaction."""
    for ns in ("a", "b"):
        server.create("v1/namespaces", {"metadata": {"name": ns}})
        for i in range(3):
            server.create("v1/pods", pod(f"p{i}", app="x" if i != 1 else "y"), ns)

    async def page(query: str) -> dict[str, Any]:
        response = await http.get(f"/api/v1/pods?{query}")
        body: dict[str, Any] = await response.json()
        assert response.status == 200, body
        return body

    def names(listed: dict[str, Any]) -> list[str]:
        return [f"{o['metadata']['namespace']}/{o['metadata']['name']}" for o in listed["items"]]

    first = await page("limit=2")
    snapshot = first["metadata"]["resourceVersion"]
    assert names(first) == ["a/p0", "a/p1"] and first["metadata"]["remainingItemCount"] == 4
    # changes after the first page do not show in the later ones
    server.delete("v1/pods", "p2", "a")
    server.patch("v1/pods", "p0", {"metadata": {"labels": {"app": "z"}}}, "b")
    server.create("v1/pods", pod("p00"), "a")
    server.create("v1/pods", pod("p9"), "b")
    second = await page(f"limit=2&continue={first['metadata']['continue']}")
    assert names(second) == ["a/p2", "b/p0"] and second["metadata"]["resourceVersion"] == snapshot
    assert second["items"][1]["metadata"]["labels"] == {"app": "x"}
    assert second["metadata"]["remainingItemCount"] == 2
    last = await page(f"limit=2&continue={second['metadata']['continue']}")
    assert names(last) == ["b/p1", "b/p2"] and "continue" not in last["metadata"]
    # a fresh list sees the changes; a selector filters each page (no remainingItemCount then)
    assert names(await page("")) == ["a/p0", "a/p00", "a/p1", "b/p0", "b/p1", "b/p2", "b/p9"]
    selective = await page("limit=2&labelSelector=app%3Dx")
    assert names(selective) == ["a/p0", "b/p2"] and "remainingItemCount" not in selective["metadata"]
    assert "continue" not in selective["metadata"]  # nothing else matches
    selective = await page("limit=1&labelSelector=app%3Dx")
    rest = await page(f"limit=1&labelSelector=app%3Dx&continue={selective['metadata']['continue']}")
    assert names(selective) + names(rest) == ["a/p0", "b/p2"] and "continue" not in rest["metadata"]
    assert (await http.get("/api/v1/pods?limit=2&continue=bogus")).status == 400

    # a token from before the watch cache's oldest change: 410 Expired, start again
    small = ApiServer(watch_cache_size=3, kopf_peering=False)
    url = await small.start()
    try:
        for i in range(3):
            small.create("v1/nodes", {"metadata": {"name": f"n{i}"}})
        async with aiohttp.ClientSession(url) as session:
            token = (await (await session.get("/api/v1/nodes?limit=1")).json())["metadata"]["continue"]
            for i in range(3, 7):
                small.create("v1/nodes", {"metadata": {"name": f"n{i}"}})
            response = await session.get(f"/api/v1/nodes?limit=1&continue={token}")
            status = await response.json()
            assert (response.status, status["reason"]) == (410, "Expired")
        assert small.errors == []
    finally:
        await small.stop()


async def test_finalizers_and_json_patch_test_op(api: client.ApiClient, http: aiohttp.ClientSession) -> None:
    crs = client.CustomObjectsApi(api)
    body = vsc("node-a")
    body["metadata"]["finalizers"] = ["kvswitch.io/agent"]
    created = await crs.create_cluster_custom_object(*VSC, body)
    events: list[tuple[str, bool]] = []

    async def follow() -> None:
        query = f"watch=1&resourceVersion={created['metadata']['resourceVersion']}"
        async with http.get(f"/apis/kvswitch.io/v1alpha1/vswitchconfigs?{query}") as response:
            async for line in response.content:
                event = json.loads(line)
                events.append((event["type"], "deletionTimestamp" in event["object"]["metadata"]))
                if event["type"] == "DELETED":
                    return

    follower = asyncio.create_task(follow())
    marked = await crs.delete_cluster_custom_object(*VSC, "node-a")
    assert marked["metadata"]["deletionTimestamp"] and marked["metadata"]["finalizers"] == [
        "kvswitch.io/agent"
    ]
    still = await crs.get_cluster_custom_object(*VSC, "node-a")
    assert still["metadata"]["generation"] == 2  # graceful deletion bumps it, as the real API does

    url = "/apis/kvswitch.io/v1alpha1/vswitchconfigs/node-a"
    headers = {"Content-Type": "application/json-patch+json"}
    add = [{"op": "add", "path": "/metadata/finalizers/-", "value": "late"}]
    response = await http.patch(url, json=add, headers=headers)
    assert response.status == 422  # no new finalizers on a terminating object
    # kopf's way of releasing: a `test` on resourceVersion first, then the JSON-patch ops.
    stale = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": created["metadata"]["resourceVersion"]}
    ]
    release = [{"op": "remove", "path": "/metadata/finalizers/0"}]
    response = await http.patch(url, json=stale + release, headers=headers)
    assert response.status == 422 and (await response.json())["reason"] == "Invalid"
    fresh = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": still["metadata"]["resourceVersion"]}
    ]
    response = await http.patch(url, json=fresh + release, headers=headers)
    assert response.status == 200 and (await response.json())["metadata"]["finalizers"] == []
    with pytest.raises(ApiException) as gone:
        await crs.get_cluster_custom_object(*VSC, "node-a")
    assert gone.value.status == 404
    await asyncio.wait_for(follower, 5)
    assert events == [("MODIFIED", True), ("DELETED", True)]


async def test_garbage_collection_and_namespace_deletion(server: ApiServer, api: client.ApiClient) -> None:
    v1, crs = client.CoreV1Api(api), client.CustomObjectsApi(api)

    def owned_by(node: Any) -> dict[str, Any]:
        ref = {"apiVersion": "v1", "kind": "Node", "name": node.metadata.name, "uid": node.metadata.uid}
        body = vsc(node.metadata.name)
        body["metadata"]["ownerReferences"] = [ref]
        return body

    node_a = await v1.create_node(named(client.V1Node, "node-a"))
    node_b = await v1.create_node(named(client.V1Node, "node-b"))
    await crs.create_cluster_custom_object(*VSC, owned_by(node_a))
    await crs.create_cluster_custom_object(*VSC, owned_by(node_b))
    await v1.delete_node("node-a")
    assert server.get(VSC[2], "node-a") is None  # cascaded with the Node
    await v1.delete_node("node-b", propagation_policy="Orphan")
    orphan = await crs.get_cluster_custom_object(*VSC, "node-b")
    assert "ownerReferences" not in orphan["metadata"]

    dangling = vsc("node-c")
    dangling["metadata"]["ownerReferences"] = [
        {"apiVersion": "v1", "kind": "Node", "name": "node-c", "uid": str(uuid.uuid4())}
    ]
    await crs.create_cluster_custom_object(*VSC, dangling)
    await aeventually(
        lambda: server.get(VSC[2], "node-c") is None
    )  # the GC removes it, as kube-controller-manager would

    await v1.create_namespace(named(client.V1Namespace, "team"))
    await v1.create_namespaced_pod("team", v1pod("plain"))
    held = v1pod("held")
    held.metadata.finalizers = ["kvswitch.io/cni"]
    await v1.create_namespaced_pod("team", held)
    await v1.delete_namespace("team")
    assert server.get("pods", "plain", "team") is None
    assert server.get("pods", "held", "team")["metadata"]["deletionTimestamp"]  # type: ignore[index]
    assert (await v1.read_namespace("team")).status.phase == "Terminating"
    await v1.patch_namespaced_pod("held", "team", {"metadata": {"finalizers": None}})
    assert server.get("pods", "held", "team") is None
    assert server.get("namespaces", "team") is None


async def test_custom_resource_schema_validation(
    server: ApiServer, api: client.ApiClient, http: aiohttp.ClientSession
) -> None:
    crs = client.CustomObjectsApi(api)
    for bad, field in [
        (vsc("bad-cidr", podCIDR="10.244.1.0/33"), "spec.podCIDR"),
        (vsc("bad-ip", overlayIP="192.168.10.11\n"), "spec.overlayIP"),  # Go's `$` is the end of the text
        (vsc("bad-type", overlayType="VXLAN"), "spec.overlayType"),
        (vsc("bad-mtu", mtu="1450"), "spec.mtu"),
        ({**vsc("no-spec"), "spec": None}, "spec"),
    ]:
        with pytest.raises(ApiException) as invalid:
            await crs.create_cluster_custom_object(*VSC, bad)
        status = status_of(invalid.value)
        assert invalid.value.status == 422 and status["reason"] == "Invalid", bad
        assert [c["field"] for c in status["details"]["causes"]] == [field]
        assert status["message"].startswith(
            f'VSwitchConfig.kvswitch.io "{bad["metadata"]["name"]}" is invalid: {field}'
        )

    body = vsc("node-a", mtu=1450)
    body["status"] = {"observedGeneration": 7}
    created = await crs.create_cluster_custom_object(*VSC, body)
    assert "status" not in created  # create cannot set a status subresource

    url = "/apis/kvswitch.io/v1alpha1/vswitchconfigs/node-a/status"
    merge = {"Content-Type": "application/merge-patch+json"}
    bad_status = {"status": {"conditions": [{"type": "Ready", "status": "Yes"}]}}
    response = await http.patch(url, json=bad_status, headers=merge)
    assert response.status == 422
    assert (await response.json())["details"]["causes"][0]["field"] == "status.conditions[0].status"
    # For custom objects, the generated client sends JSON patches (for dicts too, which then fail).
    add = [{"op": "add", "path": "/status", "value": {"observedGeneration": 1}}]
    ok = await crs.patch_cluster_custom_object_status(*VSC, "node-a", add)
    assert ok["status"] == {"observedGeneration": 1} and ok["metadata"]["generation"] == 1

    # Unknown fields: pruned with a warning by default, refused with kubectl's fieldValidation=Strict.
    response = await http.patch(
        url[: -len("/status")], json={"spec": {"mtu": 1400, "colour": "red"}}, headers=merge
    )
    assert response.status == 200 and 'unknown field \\"spec.colour\\"' in response.headers["Warning"]
    pruned = await response.json()
    assert "colour" not in pruned["spec"] and pruned["metadata"]["generation"] == 2
    strict = await http.post(
        "/apis/kvswitch.io/v1alpha1/vswitchconfigs?fieldValidation=Strict", json=vsc("x", colour="red")
    )
    assert strict.status == 400 and 'unknown field "spec.colour"' in (await strict.json())["message"]

    # Strategic merge patches do not exist for custom resources.
    smp = await http.patch(
        url[: -len("/status")],
        json={"spec": {"mtu": 1500}},
        headers={"Content-Type": "application/strategic-merge-patch+json"},
    )
    assert smp.status == 415
    with pytest.raises(ApiError) as direct:
        server.patch(VSC[2], "node-a", {"spec": {"mtu": 1}})  # the store helpers validate too
    assert direct.value.status == 422


@pytest.mark.skipif(
    not (REPO / "crds/samples").is_dir(), reason="crds/ and its samples are not in this checkout"
)
async def test_project_crd_file_and_samples() -> None:
    """The project's CRD file: valid samples are accepted, invalid ones refused at the field they name."""
    server = ApiServer(crds=[REPO / "crds/kvswitch.io_vswitchconfigs.yaml"], kopf_peering=False)
    url = await server.start()
    try:
        async with aiohttp.ClientSession(url) as session:
            collection = "/apis/kvswitch.io/v1alpha1/vswitchconfigs?fieldValidation=Strict"
            for sample in sorted((REPO / "crds/samples").glob("*/*.yaml")):
                body = yaml.safe_load(sample.read_text())
                lines = sample.read_text().splitlines()
                where = next((line.split(":", 1)[1].strip() for line in lines if "rejects:" in line), "")
                response = await session.post(collection, json=body)
                answer = await response.json()
                if sample.parent.name == "valid":
                    assert response.status == 201, (sample.name, answer)
                    continue
                if where.startswith("status"):  # create drops the status: it is written through /status
                    assert response.status == 201, (sample.name, answer)
                    url = f"/apis/kvswitch.io/v1alpha1/vswitchconfigs/{body['metadata']['name']}/status"
                    merge = {"Content-Type": "application/merge-patch+json"}
                    response = await session.patch(url, json={"status": body["status"]}, headers=merge)
                    answer = await response.json()
                assert response.status in (400, 422), sample.name
                fields = [c["field"] for c in answer.get("details", {}).get("causes", [])] or [
                    answer["message"]
                ]
                dotted = [f.replace("[", ".").replace("]", "") for f in fields]
                assert where == "(root)" or any(where in f for f in dotted), (sample.name, where, fields)
        assert server.errors == []
    finally:
        await server.stop()


async def test_discovery_and_events(http: aiohttp.ClientSession) -> None:
    core = await (await http.get("/api/v1")).json()
    assert core["groupVersion"] == "v1"
    assert {"pods", "pods/status", "nodes", "namespaces", "events"} <= {r["name"] for r in core["resources"]}
    groups = {g["name"]: g for g in (await (await http.get("/apis")).json())["groups"]}
    assert {"kvswitch.io", "kopf.dev", "networking.k8s.io", "coordination.k8s.io", "events.k8s.io"} <= set(
        groups
    )
    assert groups["kvswitch.io"]["preferredVersion"]["groupVersion"] == "kvswitch.io/v1alpha1"
    crd = await (await http.get("/apis/kvswitch.io/v1alpha1")).json()
    assert [(r["name"], r["namespaced"]) for r in crd["resources"]] == [
        ("vswitchconfigs", False),
        ("vswitchconfigs/status", False),
    ]

    # kopf posts core events for objects (cluster-scoped ones in "default"), others post events.k8s.io.
    event = {
        "metadata": {"generateName": "kopf-event-"},
        "type": "Normal",
        "reason": "Logging",
        "message": "hi",
    }
    core_event = await http.post("/api/v1/namespaces/default/events", json=event)
    assert core_event.status == 201 and (await core_event.json())["metadata"]["name"].startswith(
        "kopf-event-"
    )
    new_event = await http.post(
        "/apis/events.k8s.io/v1/namespaces/default/events", json={**event, "note": "hi"}
    )
    assert new_event.status == 201
    lease = {"metadata": {"name": "k-vswitch-controller"}, "spec": {"holderIdentity": "me"}}
    assert (
        await http.post("/apis/coordination.k8s.io/v1/namespaces/kube-system/leases", json=lease)
    ).status == 201
    policies = "/apis/networking.k8s.io/v1/namespaces/default/networkpolicies"
    for name, labels in [("deny", {"team": "a"}), ("allow-dns", {"team": "a"}), ("other", {"team": "b"})]:
        policy = {"metadata": {"name": name, "labels": labels}, "spec": {"podSelector": {}}}
        assert (await http.post(policies, json=policy)).status == 201
    dry = await http.post(f"{policies}?dryRun=All", json={"metadata": {"name": "dry"}, "spec": {}})
    assert dry.status == 201 and (await http.get(f"{policies}/dry")).status == 404
    removed = await (await http.delete(f"{policies}?labelSelector=team%3Da")).json()
    assert sorted(p["metadata"]["name"] for p in removed["items"]) == ["allow-dns", "deny"]
    left = await (await http.get(policies)).json()
    assert [p["metadata"]["name"] for p in left["items"]] == ["other"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl(tmp_path: Path) -> None:
    with ApiServerThread(kopf_peering=False) as api:
        declare_vsc(api)
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", api.url)

        def kubectl(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
            cmd = ["kubectl", f"--kubeconfig={kubeconfig}", f"--cache-dir={tmp_path / 'cache'}", *args]
            return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=30, check=False)

        assert kubectl("get", "namespaces").stdout.split()[:5] == [
            "NAME",
            "STATUS",
            "AGE",
            "default",
            "Active",
        ]
        assert kubectl("apply", "-f", "-", stdin=yaml.safe_dump(vsc("node-a"))).returncode == 0
        assert (
            kubectl("apply", "-f", "-", stdin=yaml.safe_dump(vsc("node-a")))
            .stdout.strip()
            .endswith("unchanged")
        )
        refused = kubectl("create", "-f", "-", stdin=yaml.safe_dump(vsc("node-b", podCIDR="10.0.0.0")))
        assert refused.returncode == 1 and "spec.podCIDR" in refused.stderr
        assert kubectl("run", "web", "--image=nginx", "--labels=app=web").returncode == 0
        shown = kubectl("get", "pods", "-l", "app in (web)", "-o", "jsonpath={.items[*].metadata.name}")
        assert shown.stdout == "web"
        assert kubectl("get", "vsc", "node-a", "-o", "jsonpath={.metadata.uid}").stdout
        ready = [{"type": "Ready", "status": "True"}]
        api.patch(VSC[2], "node-a", {"status": {"conditions": ready}}, subresource="status")
        # Server-side tables: the CRD's printer columns, and pods' IP and node with -o wide.
        assert kubectl("get", "vsc").stdout.split() == [
            "NAME",
            "POD",
            "CIDR",
            "READY",
            "node-a",
            "10.244.1.0/24",
            "True",
        ]
        api.patch("pods", "web", {"status": {"podIP": "10.244.1.7"}}, "default", subresource="status")
        wide = kubectl("get", "pods", "-o", "wide").stdout.splitlines()
        assert wide[0].split()[-2:] == ["IP", "NODE"] and wide[1].split()[-2:] == ["10.244.1.7", "<none>"]
        assert kubectl("delete", "pod", "web").returncode == 0
        assert api.get("pods", "web", "default") is None
        # Client-side apply of a built-in: a three-way strategic merge patch with $setElementOrder and
        # `$patch: delete` list directives, merging containers and env by name.
        web: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "api", "labels": {"app": "api"}},
        }
        env = [{"name": "OLD", "value": "1"}, {"name": "KEEP", "value": "2"}]
        web["spec"] = {"containers": [{"name": "main", "image": "api:1", "env": env}]}
        assert kubectl("apply", "-f", "-", stdin=yaml.safe_dump(web)).returncode == 0
        web["spec"]["containers"][0].update(image="api:2", env=[{"name": "KEEP", "value": "3"}])
        del web["metadata"]["labels"]
        assert kubectl("apply", "-f", "-", stdin=yaml.safe_dump(web)).returncode == 0
        applied = api.get("pods", "api", "default")
        assert applied is not None and "labels" not in applied["metadata"]
        expected = [{"name": "main", "image": "api:2", "env": [{"name": "KEEP", "value": "3"}]}]
        assert applied["spec"]["containers"] == expected
        assert kubectl("create", "namespace", "team").returncode == 0  # a protobuf body
        assert kubectl("run", "db", "-n", "team", "--image=postgres").returncode == 0
        assert kubectl("delete", "namespace", "team", "--timeout=10s").returncode == 0  # waits on a watch
        assert api.get("namespaces", "team") is None and api.get("pods", "db", "team") is None
        assert api.server.errors == []


def test_kopf_operator_in_a_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """kopf in its own loop: field-selected pods, cluster-scoped CRs, finalizers, status, delete handlers."""
    seen: list[tuple[str, str]] = []
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_with_kubeconfig(**kwargs)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.watching.field_selectors["v1", "pods"] = (
            "spec.nodeName=node-a"  # server-side, like our agents
        )
        settings.persistence.finalizer = "kvswitch.io/test"
        settings.posting.level = logging.INFO

    @kopf.on.create("v1", "pods", registry=registry)
    def pod_created(name: str, **_: Any) -> None:
        seen.append(("pod-create", name))

    @kopf.on.delete("v1", "pods", registry=registry)
    def pod_deleted(name: str, **_: Any) -> None:
        seen.append(("pod-delete", name))

    @kopf.on.create(*VSC, registry=registry)
    def vsc_created(name: str, body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        seen.append(("vsc-create", name))
        patch.status["observedGeneration"] = body.metadata["generation"]
        kopf.info(body, reason="Programmed", message="flows installed")

    @kopf.on.update(*VSC, field="spec", registry=registry)
    def vsc_updated(name: str, body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        seen.append(("vsc-update", name))
        patch.status["observedGeneration"] = body.metadata["generation"]

    @kopf.on.delete(*VSC, registry=registry)
    def vsc_deleted(name: str, **_: Any) -> None:
        seen.append(("vsc-delete", name))

    with ApiServerThread() as api:
        declare_vsc(api)
        monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path / "kubeconfig", api.url)))
        stop, ready = threading.Event(), threading.Event()
        operator = threading.Thread(
            target=lambda: asyncio.run(
                kopf.operator(
                    registry=registry, clusterwide=True, standalone=True, stop_flag=stop, ready_flag=ready
                )
            )
        )
        operator.start()
        try:
            assert ready.wait(10)
            api.create("pods", pod("mine", "node-a"), "default")
            api.create("pods", pod("theirs", "node-b"), "default")
            api.create(VSC[2], vsc("node-a"))

            def handled() -> dict[str, Any] | None:
                obj = api.get(VSC[2], "node-a")
                return obj if obj and obj.get("status", {}).get("observedGeneration") == 1 else None

            obj = eventually(handled)
            assert obj["metadata"]["finalizers"] == ["kvswitch.io/test"]
            assert eventually(lambda: ("pod-create", "mine") in seen)
            mine = eventually(
                lambda: (p := api.get("pods", "mine", "default")) and p["metadata"].get("finalizers") and p
            )
            assert mine["metadata"]["finalizers"] == ["kvswitch.io/test"]

            api.patch(VSC[2], "node-a", {"spec": {"mtu": 1400}})
            eventually(lambda: api.get(VSC[2], "node-a")["status"]["observedGeneration"] == 2)  # type: ignore[index]
            events = eventually(
                lambda: [e for e in api.list_objects("events", "default") if e["reason"] == "Programmed"]
            )
            assert events[0]["involvedObject"]["name"] == "node-a"

            api.delete(VSC[2], "node-a")
            api.delete("pods", "mine", "default")
            eventually(
                lambda: api.get(VSC[2], "node-a") is None and api.get("pods", "mine", "default") is None
            )
        finally:
            stop.set()
            operator.join(10)
        assert not operator.is_alive()
        assert ("pod-create", "theirs") not in seen
        assert [s for s in seen if s[0].startswith("vsc")] == [
            ("vsc-create", "node-a"),
            ("vsc-update", "node-a"),
            ("vsc-delete", "node-a"),
        ]
        assert ("pod-delete", "mine") in seen
        assert api.server.errors == []


HANDLERS = """
import kopf

@kopf.on.create("kvswitch.io", "v1alpha1", "vswitchconfigs")
def created(body, patch, **_):
    patch.status["observedGeneration"] = body.metadata["generation"]

@kopf.on.delete("kvswitch.io", "v1alpha1", "vswitchconfigs")
def deleted(name, **_):
    default = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}}
    kopf.info(default, reason="Gone", message=name)
"""


def test_kopf_run_subprocess_with_kubeconfig(tmp_path: Path) -> None:
    """`kopf run --standalone` logs in through the kubeconfig alone, like the node agents do."""
    handlers = tmp_path / "handlers.py"
    handlers.write_text(textwrap.dedent(HANDLERS))
    with ApiServerThread() as api:
        declare_vsc(api)
        env = {**os.environ, "KUBECONFIG": str(write_kubeconfig(tmp_path / "kubeconfig", api.url))}
        cmd = [sys.executable, "-m", "kopf", "run", "--standalone", "--all-namespaces", str(handlers)]
        log = (tmp_path / "kopf.log").open("w")
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            api.create(VSC[2], vsc("node-a"))
            eventually(
                lambda: (api.get(VSC[2], "node-a") or {}).get("status") == {"observedGeneration": 1}, 20
            )
            api.delete(VSC[2], "node-a")
            eventually(lambda: api.get(VSC[2], "node-a") is None)
            eventually(lambda: [e for e in api.list_objects("events", "default") if e["reason"] == "Gone"])
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
        assert api.server.errors == [], (tmp_path / "kopf.log").read_text()


@contextlib.contextmanager
def scratch_netns() -> Iterator[str]:
    name = f"kvs-api-{os.getpid()}"
    netns_run(["ip", "netns", "add", name])
    try:
        netns_run(["ip", "link", "set", "lo", "up"], name)
        yield name
    finally:
        netns_run(["ip", "netns", "delete", name], check=False)


def test_listening_inside_a_network_namespace() -> None:
    """One store served on the host and inside a netns, as agents reach it over the simulated underlay."""
    with scratch_netns() as netns, ApiServerThread(kopf_peering=False) as api:
        inside = api.listen(host="127.0.0.1", port=6443, sock=netns_socket(netns))
        assert inside == "http://127.0.0.1:6443"
        api.create("v1/nodes", {"metadata": {"name": "node-a"}})
        with netns_socket(netns) as conn:  # a client in the same namespace
            conn.settimeout(5)
            conn.connect(("127.0.0.1", 6443))
            conn.sendall(b"GET /api/v1/nodes/node-a HTTP/1.0\r\nHost: api\r\n\r\n")
            reply = b"".join(iter(lambda: conn.recv(65536), b""))
        head, _, payload = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200")
        assert json.loads(payload)["metadata"]["name"] == "node-a"
        assert api.server.errors == []


def test_patch_and_selector_helpers() -> None:
    """The corners the client tests above do not reach: RFC 6902 move/copy, SMP directives, gt/lt."""
    from kvswitch_testbed.apiserver_patches import PatchError, json_patch, strategic_merge_patch
    from kvswitch_testbed.apiserver_selectors import FieldSelector, LabelSelector, SelectorError

    doc = {"a": {"b": [1, 2]}, "c": "x"}
    ops = [
        {"op": "copy", "from": "/a/b", "path": "/d"},
        {"op": "move", "from": "/c", "path": "/a/c"},
        {"op": "add", "path": "/d/1", "value": 9},
        {"op": "test", "path": "/d", "value": [1, 9, 2]},
        {"op": "replace", "path": "/a/b/0", "value": True},
    ]
    assert json_patch(doc, ops) == {"a": {"b": [True, 2], "c": "x"}, "d": [1, 9, 2]}
    assert doc == {"a": {"b": [1, 2]}, "c": "x"}  # untouched
    with pytest.raises(PatchError):
        json_patch(doc, [{"op": "test", "path": "/a/b/0", "value": True}])  # 1 is not true in JSON
    with pytest.raises(PatchError):
        json_patch(doc, [{"op": "remove", "path": "/nope"}])

    pod = {"spec": {"containers": [{"name": "a", "image": "1"}, {"name": "b", "image": "1"}]}, "metadata": {}}
    patch = {
        "metadata": {"finalizers": ["x"], "$deleteFromPrimitiveList/finalizers": ["y"]},
        "spec": {
            "$setElementOrder/containers": [{"name": "b"}, {"name": "a"}],
            "containers": [{"name": "a", "$patch": "delete"}, {"name": "b", "image": "2"}, {"name": "c"}],
        },
    }
    merged = strategic_merge_patch(pod, patch)
    assert merged["spec"]["containers"] == [{"name": "b", "image": "2"}, {"name": "c"}]
    assert merged["metadata"]["finalizers"] == ["x"]
    replaced = strategic_merge_patch(pod, {"spec": {"containers": [{"$patch": "replace"}, {"name": "z"}]}})
    assert replaced["spec"]["containers"] == [{"name": "z"}]

    labels = {"size": "10", "app": "web"}
    assert LabelSelector.parse("size>5,size<11,app").matches(labels)
    assert not LabelSelector.parse("size>10").matches(labels)
    assert not LabelSelector.parse("app notin (web,db)").matches(labels)
    with pytest.raises(SelectorError):
        LabelSelector.parse("size>big")
    assert FieldSelector.parse(r"metadata.name=a\,b").matches({"metadata": {"name": "a,b"}})
    assert FieldSelector.parse("spec.unschedulable=true").matches({"spec": {"unschedulable": True}})
