"""The test bed's EndpointSlice controller against the fake API server, driven through its HTTP API.

Pods and Services are written with kubernetes-asyncio (or the server's helpers where hundreds of pods
are needed); the slices are read back raw, to see exactly what the real controller would write.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from kubernetes_asyncio import client
from kvswitch_testbed.apiserver import ApiServer, login
from kvswitch_testbed.cluster import Cluster
from kvswitch_testbed.endpointslices import EndpointSliceController

from tests.conftest import register_run

JSON = dict[str, Any]
SLICES = "/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices"
MANAGED = {
    "kubernetes.io/service-name": "web",
    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
}


async def eventually(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last: {result!r})")
        await asyncio.sleep(0.02)


class Bed:
    """A server, its controller, a kubernetes-asyncio client and a raw HTTP session."""

    def __init__(self, server: ApiServer, controller: EndpointSliceController, api: client.ApiClient) -> None:
        self.server, self.controller = server, controller
        self.v1 = client.CoreV1Api(api)
        self.discovery = client.DiscoveryV1Api(api)
        self.http = aiohttp.ClientSession(server.url)

    async def slices(self, service: str = "web", ns: str = "default") -> list[JSON]:
        url = SLICES.format(ns=ns) + f"?labelSelector=kubernetes.io/service-name%3D{service}"
        async with self.http.get(url) as response:
            items: list[JSON] = (await response.json())["items"]
        return sorted(items, key=lambda s: str(s["metadata"]["name"]))

    async def settle(self) -> None:
        """Let the controller catch up with every change made so far (it runs in this loop)."""
        for _ in range(5):
            await asyncio.sleep(0.01)

    async def pod(
        self,
        name: str,
        ip: str | None,
        *,
        ns: str = "default",
        node: str = "node-a",
        ready: bool = True,
        labels: dict[str, str] | None = None,
        ports: list[JSON] | None = None,
        **spec: Any,
    ) -> Any:
        container = {
            "name": "main",
            "image": "web",
            "ports": ports or [{"name": "http", "containerPort": 8080}],
        }
        body: Any = {
            "metadata": {"name": name, "labels": {"app": "web"} if labels is None else labels},
            "spec": {"nodeName": node, "containers": [container], **spec},
        }
        created = await self.v1.create_namespaced_pod(ns, body)
        if ip is not None:
            await self.set_status(name, ns, ip, ready)
        return created

    async def set_status(self, name: str, ns: str, ip: str, ready: bool) -> None:
        condition = {"type": "Ready", "status": "True" if ready else "False"}
        status = {
            "status": {"podIP": ip, "podIPs": [{"ip": ip}], "phase": "Running", "conditions": [condition]}
        }
        await self.v1.patch_namespaced_pod_status(name, ns, status)

    async def service(self, name: str = "web", ns: str = "default", **spec: Any) -> Any:
        ports = [{"name": "http", "port": 80, "targetPort": "http"}, {"name": "metrics", "port": 9100}]
        body: Any = {"metadata": {"name": name}, "spec": {"selector": {"app": "web"}, "ports": ports, **spec}}
        return await self.v1.create_namespaced_service(ns, body)


@pytest.fixture
async def bed(tmp_path: Path) -> AsyncIterator[Bed]:
    server = ApiServer(kopf_peering=False)
    await server.start()
    controller = EndpointSliceController(server)
    await controller.start()
    try:
        async with await login(server.url, tmp_path / "kubeconfig") as api:
            bed = Bed(server, controller, api)
            async with bed.http:
                for node, zone in (("node-a", "zone-1"), ("node-b", None)):
                    labels = {"topology.kubernetes.io/zone": zone} if zone else {}
                    await bed.v1.create_node(
                        client.V1Node(metadata=client.V1ObjectMeta(name=node, labels=labels))
                    )
                yield bed
        assert controller.errors == [] and server.errors == []
    finally:
        await controller.stop()
        await server.stop()


def endpoints(slices: list[JSON]) -> dict[str, JSON]:
    """Every endpoint of some slices, by pod name."""
    return {e["targetRef"]["name"]: e for s in slices for e in s["endpoints"] or []}


async def test_a_service_without_pods_has_one_placeholder_slice(bed: Bed) -> None:
    web = await bed.service()
    await bed.v1.patch_namespaced_service("web", "default", {"metadata": {"labels": {"team": "a"}}})
    (placeholder,) = await eventually(bed.slices)
    meta = placeholder["metadata"]
    assert meta["name"].startswith("web-") and meta["generateName"] == "web-"
    assert meta["labels"] == {**MANAGED, "team": "a"}  # the Service's own labels too
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "name": "web",
            "uid": web.metadata.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert "endpoints.kubernetes.io/last-change-trigger-time" in meta["annotations"]
    assert (placeholder["addressType"], placeholder["endpoints"], placeholder["ports"]) == (
        "IPv4",
        None,
        None,
    )
    # kubernetes-asyncio reads it (null endpoints and ports included).
    listed = await bed.discovery.list_namespaced_endpoint_slice(
        "default", label_selector="kubernetes.io/service-name=web"
    )
    assert [s.metadata.name for s in listed.items] == [meta["name"]] and listed.items[0].endpoints is None

    await bed.pod("pending", ip=None)  # no IP yet: still the placeholder, unchanged
    await bed.settle()
    assert await bed.slices() == [placeholder]


async def test_endpoints_follow_pod_readiness_labels_and_deletion(bed: Bed) -> None:
    await bed.service()
    a = await bed.pod("a", "10.244.1.10")
    await bed.pod("b", "10.244.2.10", node="node-b", ready=False)
    await bed.pod("elsewhere", "10.244.1.11", ns="kube-system")  # same labels, other namespace
    await bed.pod("ghost", "10.244.3.10", node="node-gone")  # on a node that does not exist
    await bed.pod("other", "10.244.1.12", labels={"app": "db"})

    (web,) = await eventually(lambda: _with(bed, 2))
    assert web["ports"] == [
        {"name": "http", "port": 8080, "protocol": "TCP"},
        {"name": "metrics", "port": 9100, "protocol": "TCP"},
    ]
    found = endpoints([web])
    assert found["a"] == {
        "addresses": ["10.244.1.10"],
        "conditions": {"ready": True, "serving": True, "terminating": False},
        "targetRef": {"kind": "Pod", "namespace": "default", "name": "a", "uid": a.metadata.uid},
        "nodeName": "node-a",
        "zone": "zone-1",
    }
    assert found["b"]["conditions"] == {"ready": False, "serving": False, "terminating": False}
    assert "zone" not in found["b"] and found["b"]["nodeName"] == "node-b"

    await bed.set_status("b", "default", "10.244.2.10", ready=True)  # b turns Ready
    await eventually(lambda: _condition(bed, "b", {"ready": True, "serving": True, "terminating": False}))
    await bed.v1.patch_namespaced_pod("other", "default", {"metadata": {"labels": {"app": "web"}}})
    await eventually(lambda: _with(bed, 3))
    await bed.v1.patch_namespaced_pod("other", "default", {"metadata": {"labels": {"app": "db"}}})
    await eventually(lambda: _with(bed, 2))

    # Terminating (a finalizer holds the pod): still listed, not ready, serving while it is Ready.
    await bed.v1.patch_namespaced_pod("a", "default", {"metadata": {"finalizers": ["test/hold"]}})
    await bed.v1.delete_namespaced_pod("a", "default")
    await eventually(lambda: _condition(bed, "a", {"ready": False, "serving": True, "terminating": True}))
    await bed.v1.patch_namespaced_pod("a", "default", {"metadata": {"finalizers": None}})  # gone
    await eventually(lambda: _with(bed, 1))
    await bed.v1.patch_namespaced_pod_status("b", "default", {"status": {"phase": "Succeeded"}})
    (placeholder,) = await eventually(lambda: _with(bed, 0))
    assert placeholder["endpoints"] is None and placeholder["ports"] is None


async def _with(bed: Bed, count: int) -> list[JSON] | None:
    slices = await bed.slices()
    return slices if sum(len(s["endpoints"] or []) for s in slices) == count else None


async def _condition(bed: Bed, pod: str, conditions: JSON) -> bool:
    endpoint = endpoints(await bed.slices()).get(pod)
    return endpoint is not None and endpoint["conditions"] == conditions


async def test_named_ports_resolve_per_pod_into_separate_slices(bed: Bed) -> None:
    await bed.service()
    await bed.pod("a", "10.244.1.10")
    await bed.pod("b", "10.244.1.11", ports=[{"name": "http", "containerPort": 8081}])
    await bed.pod("c", "10.244.1.12", ports=[{"name": "http", "containerPort": 8081, "protocol": "UDP"}])
    slices = await eventually(lambda: _with(bed, 3))
    by_ports = {tuple((p["name"], p["port"]) for p in s["ports"]): sorted(endpoints([s])) for s in slices}
    assert by_ports == {
        (("http", 8080), ("metrics", 9100)): ["a"],
        (("http", 8081), ("metrics", 9100)): ["b"],
        (("metrics", 9100),): ["c"],  # no TCP port named http: that service port is left out for it
    }
    # The Service's targetPort changes to a number: all pods share one port set, one slice again.
    ports = [{"name": "http", "port": 80, "targetPort": 8080}, {"name": "metrics", "port": 9100}]
    await bed.v1.patch_namespaced_service("web", "default", {"spec": {"ports": ports}})
    (single,) = await eventually(lambda: _slices_if(bed, lambda s: len(s) == 1))
    assert sorted(endpoints([single])) == ["a", "b", "c"]


async def _none(bed: Bed) -> bool:
    return await bed.slices() == []


async def _slices_if(bed: Bed, check: Callable[[list[JSON]], bool]) -> list[JSON] | None:
    slices = await bed.slices()
    return slices if check(slices) else None


async def test_at_most_100_endpoints_a_slice_and_endpoints_stay_put(bed: Bed) -> None:
    server = bed.server
    await bed.service()
    for i in range(205):
        server.create("pods", _pod(f"p{i:03}"), "default")
        ip = f"10.244.{i // 200}.{i % 200 + 1}"
        server.patch(
            "pods",
            f"p{i:03}",
            {"status": {"podIP": ip, "conditions": _ready()}},
            "default",
            subresource="status",
        )
    slices = await eventually(lambda: _with(bed, 205))
    assert sorted(len(s["endpoints"]) for s in slices) == [5, 100, 100]
    where = {e["targetRef"]["name"]: s["metadata"]["name"] for s in slices for e in s["endpoints"]}
    assert len(where) == 205
    for i in range(0, 205, 3):  # a third goes
        server.delete("pods", f"p{i:03}", "default")
    slices = await eventually(lambda: _with(bed, 205 - 69))
    assert all(where[e["targetRef"]["name"]] == s["metadata"]["name"] for s in slices for e in s["endpoints"])
    for i in range(205, 215):  # new ones fill the existing slices, no new slice
        server.create("pods", _pod(f"p{i:03}"), "default")
        server.patch(
            "pods",
            f"p{i:03}",
            {"status": {"podIP": f"10.244.9.{i - 200}", "conditions": _ready()}},
            "default",
            subresource="status",
        )
    refilled = await eventually(lambda: _with(bed, 205 - 69 + 10))
    assert {s["metadata"]["name"] for s in refilled} == {s["metadata"]["name"] for s in slices}


def _pod(name: str) -> JSON:
    container = {"name": "main", "image": "web", "ports": [{"name": "http", "containerPort": 8080}]}
    return {
        "metadata": {"name": name, "labels": {"app": "web"}},
        "spec": {"nodeName": "node-a", "containers": [container]},
    }


def _ready() -> list[JSON]:
    return [{"type": "Ready", "status": "True"}]


async def test_kinds_of_services(bed: Bed) -> None:
    await bed.pod("a", "10.244.1.10", hostname="a", subdomain="db")
    # Headless: labelled so; the pod's hostname is published as its subdomain is the Service.
    await bed.service("db", clusterIP="None", ports=None)
    (db,) = await eventually(lambda: _slices_if_named(bed, "db", 1))
    assert db["metadata"]["labels"]["service.kubernetes.io/headless"] == ""
    assert db["ports"] is None and db["endpoints"][0]["hostname"] == "a"
    # publishNotReadyAddresses: ready whatever the pod says; pods on unknown nodes are published.
    await bed.pod("b", "10.244.1.11", ready=False, node="node-gone")
    await bed.service("all", publishNotReadyAddresses=True)
    (everyone,) = await eventually(lambda: _slices_if_named(bed, "all", 2))
    assert [e["conditions"]["ready"] for e in everyone["endpoints"]] == [True, True]
    assert "hostname" not in everyone["endpoints"][0]  # subdomain "db" is not this Service
    # Selectorless and ExternalName Services get no slices; the kubernetes Service neither.
    selectorless: Any = {"metadata": {"name": "manual"}, "spec": {"ports": [{"port": 80}]}}
    await bed.v1.create_namespaced_service("default", selectorless)
    external: Any = {
        "metadata": {"name": "ext"},
        "spec": {"type": "ExternalName", "externalName": "x.example"},
    }
    await bed.v1.create_namespaced_service("default", external)
    await bed.settle()
    for name in ("manual", "ext", "kubernetes"):
        assert await bed.slices(name) == []
    # Slices of another manager are left alone; edits to managed ones are undone.
    mirrored: Any = {
        "metadata": {"name": "manual-1", "labels": {"kubernetes.io/service-name": "manual"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["192.0.2.1"]}],
    }
    await bed.discovery.create_namespaced_endpoint_slice("default", mirrored)
    name = everyone["metadata"]["name"]
    await bed.discovery.patch_namespaced_endpoint_slice(name, "default", {"endpoints": []})
    await eventually(lambda: _slices_if_named(bed, "all", 2))
    assert [s["metadata"]["name"] for s in await bed.slices("manual")] == ["manual-1"]
    assert bed.controller.errors == []


async def _slices_if_named(bed: Bed, service: str, count: int) -> list[JSON] | None:
    slices = await bed.slices(service)
    return slices if sum(len(s["endpoints"] or []) for s in slices) == count else None


async def test_slices_go_with_their_service_and_selector_changes(bed: Bed) -> None:
    await bed.pod("a", "10.244.1.10")
    await bed.pod("d", "10.244.1.11", labels={"app": "db"})
    await bed.service()
    await eventually(lambda: _with(bed, 1))
    await bed.v1.patch_namespaced_service("web", "default", {"spec": {"selector": {"app": "db"}}})
    slices = await eventually(lambda: _slices_if(bed, lambda s: sorted(endpoints(s)) == ["d"]))
    assert len(slices) == 1
    await bed.v1.delete_namespaced_service("web", "default")
    await eventually(lambda: _none(bed))
    # Recreated under the same name: new slices, owned by the new Service.
    web = await bed.service()
    (fresh,) = await eventually(lambda: _with(bed, 1))
    assert fresh["metadata"]["ownerReferences"][0]["uid"] == web.metadata.uid
    # Its namespace goes: everything goes, and the controller creates nothing in the meantime.
    await bed.v1.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="team")))
    await bed.service(ns="team")
    await eventually(lambda: bed.slices(ns="team"))
    await bed.v1.delete_namespace("team")
    await bed.settle()
    assert (await bed.v1.list_namespace(field_selector="metadata.name=team")).items == []


@pytest.mark.root
def test_the_sandbox_cluster_serves_services_and_pod_readiness() -> None:
    """Cluster: Services with ClusterIPs from its service CIDR, pods wired through CNI carry their IP
    and readiness, and EndpointSlices follow readiness, termination and deletion."""
    cluster = Cluster(nodes=1, service_cidr="10.97.0.0/16")
    register_run(cluster.bed.run_id)
    with cluster:
        (node,) = cluster.bed.nodes.values()
        ports: list[Any] = [80, {"name": "alt", "port": 81, "targetPort": "alt"}]
        web = cluster.add_service("web", {"app": "web"}, ports)
        assert web["spec"]["type"] == "ClusterIP" and web["spec"]["clusterIP"].startswith("10.97.")
        assert [(p["name"], p["targetPort"]) for p in web["spec"]["ports"]] == [
            ("tcp-80", 80),
            ("alt", "alt"),
        ]
        container = {"name": "main", "image": "sandbox", "ports": [{"name": "alt", "containerPort": 8081}]}
        pod = cluster.add_pod(node, "w1", labels={"app": "web"}, containers=[container])
        obj = cluster.client.get("/api/v1/namespaces/default/pods/w1")
        assert obj is not None
        status = obj["status"]
        assert (status["podIP"], status["podIPs"], status["hostIP"]) == (
            pod.ip,
            [{"ip": pod.ip}],
            node.underlay_ip,
        )
        assert {c["type"]: c["status"] for c in status["conditions"]}["Ready"] == "True"

        def endpoint(conditions: JSON) -> Callable[[], JSON | None]:
            def check() -> JSON | None:
                found = [e for s in cluster.endpoint_slices("web") for e in s["endpoints"] or []]
                return found[0] if len(found) == 1 and found[0]["conditions"] == conditions else None

            return check

        ready = cluster.client.wait_for(
            "w1 ready", endpoint({"ready": True, "serving": True, "terminating": False})
        )
        assert ready["addresses"] == [pod.ip] and ready["nodeName"] == node.name
        (slice_,) = cluster.endpoint_slices("web")
        assert [(p["name"], p["port"]) for p in slice_["ports"]] == [("tcp-80", 80), ("alt", 8081)]
        cluster.set_pod_ready(pod, False)
        cluster.client.wait_for(
            "w1 not ready", endpoint({"ready": False, "serving": False, "terminating": False})
        )
        cluster.set_pod_ready(pod, True)
        cluster.client.wait_for(
            "w1 ready again", endpoint({"ready": True, "serving": True, "terminating": False})
        )
        terminating = cluster.terminate_pod(pod)
        assert terminating["metadata"]["deletionTimestamp"]
        cluster.client.wait_for(
            "w1 terminating", endpoint({"ready": False, "serving": True, "terminating": True})
        )
        cluster.delete_pod(pod)
        assert cluster.client.get("/api/v1/namespaces/default/pods/w1") is None
        cluster.client.wait_for(
            "only the placeholder", lambda: [s["endpoints"] for s in cluster.endpoint_slices("web")] == [None]
        )

        node_port = cluster.add_service("np", {"app": "web"}, [80], type="NodePort")
        assert 30000 <= node_port["spec"]["ports"][0]["nodePort"] <= 32767
        cluster.delete_service("web")
        cluster.client.wait_for("web's slices gone", lambda: cluster.endpoint_slices("web") == [] or None)
        again = cluster.add_service("again", {"app": "web"}, [80], clusterIP=web["spec"]["clusterIP"])
        assert again["spec"]["clusterIP"] == web["spec"]["clusterIP"]  # released with the Service
        assert cluster.endpointslices is not None and cluster.endpointslices.errors == []
