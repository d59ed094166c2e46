"""Services in the fake API server, through kubernetes-asyncio and kubectl as a user would meet them.

Defaults, ClusterIP and NodePort allocation (requested, dynamic, exhausted, released), headless and
ExternalName Services, the real server's 422/500 errors and their wording, update rules (immutable
clusterIPs, kept allocations, type changes) and dry runs. EndpointSlices: tests/test_endpointslices.py.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException
from kvswitch_testbed.apiserver import ApiServer, ApiServerThread, login, write_kubeconfig

JSON = dict[str, Any]
SERVICE_CIDR = ipaddress.ip_network("10.96.0.0/12")


def svc(name: str, *ports: int | JSON, **spec: Any) -> JSON:
    """A Service body: ints are ports (named when there are several), dicts are port entries."""
    entries = [
        p if isinstance(p, dict) else ({"name": f"p{p}", "port": p} if len(ports) > 1 else {"port": p})
        for p in ports
    ]
    return {"metadata": {"name": name}, "spec": {**({"ports": entries} if entries else {}), **spec}}


def status_of(exc: ApiException) -> JSON:
    status: JSON = json.loads(exc.body or b"{}")
    return status


@pytest.fixture
async def server() -> AsyncIterator[ApiServer]:
    async with ApiServer(kopf_peering=False).serving() as srv:
        yield srv


async def client_for(server: ApiServer, tmp_path: Path) -> client.ApiClient:
    api: client.ApiClient = await login(server.url, tmp_path / f"kubeconfig-{server.url.rsplit(':', 1)[1]}")
    return api


@pytest.fixture
async def v1(server: ApiServer, tmp_path: Path) -> AsyncIterator[client.CoreV1Api]:
    async with await client_for(server, tmp_path) as api:
        yield client.CoreV1Api(api)


@pytest.fixture
def small(tmp_path: Path) -> Callable[..., Any]:
    """A server with tiny ranges, to exhaust them: ``async with small(cidr, node_ports) as v1``."""
    import contextlib

    @contextlib.asynccontextmanager
    async def make(cidr: str, node_ports: tuple[int, int]) -> AsyncIterator[client.CoreV1Api]:
        srv = ApiServer(kopf_peering=False, service_cidr=cidr, node_port_range=node_ports)
        await srv.start()
        try:
            async with await client_for(srv, tmp_path) as api:
                yield client.CoreV1Api(api)
            assert srv.errors == []
        finally:
            await srv.stop()

    return make


async def create(v1: client.CoreV1Api, body: Any, namespace: str = "default") -> Any:
    return await v1.create_namespaced_service(namespace, body)


async def refused(v1: client.CoreV1Api, body: Any, namespace: str = "default") -> JSON:
    with pytest.raises(ApiException) as err:
        await v1.create_namespaced_service(namespace, body)
    return status_of(err.value)


def invalid(name: str, *causes: str) -> str:
    """The message of a 422 Invalid answer for a Service."""
    text = ", ".join(causes)
    return f'Service "{name}" is invalid: ' + (f"[{text}]" if len(causes) > 1 else text)


async def test_discovery_and_the_kubernetes_service(server: ApiServer, v1: client.CoreV1Api) -> None:
    async with aiohttp.ClientSession(server.url) as http:
        core = {r["name"]: r for r in (await (await http.get("/api/v1")).json())["resources"]}
        assert core["services"]["kind"] == "Service" and core["services"]["shortNames"] == ["svc"]
        assert "services/status" in core
        discovery = await (await http.get("/apis/discovery.k8s.io/v1")).json()
        assert [(r["name"], r["kind"], r["namespaced"]) for r in discovery["resources"]] == [
            ("endpointslices", "EndpointSlice", True)
        ]
    kubernetes = await v1.read_namespaced_service("kubernetes", "default")
    assert kubernetes.spec.cluster_ip == "10.96.0.1" and kubernetes.spec.cluster_ips == ["10.96.0.1"]
    port = kubernetes.spec.ports[0]
    assert (port.name, port.port, port.protocol, port.target_port) == ("https", 443, "TCP", 6443)
    assert kubernetes.metadata.labels == {"component": "apiserver", "provider": "kubernetes"}
    assert kubernetes.spec.selector is None  # its endpoints are the API server's, not pods'


async def test_defaults_of_a_cluster_ip_service(v1: client.CoreV1Api) -> None:
    body = svc("web", {"name": "http", "port": 80}, {"name": "api", "port": 8080, "targetPort": "api"})
    web = await create(v1, {**body, "spec": {**body["spec"], "selector": {"app": "web"}}})
    spec = web.spec
    assert (spec.type, spec.session_affinity, spec.internal_traffic_policy) == (
        "ClusterIP",
        "None",
        "Cluster",
    )
    assert spec.external_traffic_policy is None and spec.health_check_node_port is None
    assert (spec.ip_family_policy, spec.ip_families) == ("SingleStack", ["IPv4"])
    assert [(p.protocol, p.target_port, p.node_port) for p in spec.ports] == [
        ("TCP", 80, None),
        ("TCP", "api", None),
    ]
    ip = ipaddress.ip_address(spec.cluster_ip)
    assert spec.cluster_ips == [spec.cluster_ip] and ip in SERVICE_CIDR
    assert ip not in (SERVICE_CIDR.network_address, SERVICE_CIDR.network_address + 1)  # kubernetes has .1
    assert web.status.load_balancer is not None and web.status.load_balancer.ingress is None

    sticky = await create(v1, svc("sticky", 80, sessionAffinity="ClientIP"))
    assert sticky.spec.session_affinity_config.client_ip.timeout_seconds == 10800
    kept = await create(
        v1,
        svc(
            "kept", 80, sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}}
        ),
    )
    assert kept.spec.session_affinity_config.client_ip.timeout_seconds == 60


async def test_requested_cluster_ips_and_their_errors(v1: client.CoreV1Api) -> None:
    dns = await create(v1, svc("kube-dns", 53, clusterIP="10.96.0.10"), "kube-system")
    assert (dns.spec.cluster_ip, dns.spec.cluster_ips) == ("10.96.0.10", ["10.96.0.10"])
    both = await create(v1, svc("both", 80, clusterIP="10.96.0.11", clusterIPs=["10.96.0.11"]))
    assert both.spec.cluster_ip == "10.96.0.11"

    taken = await refused(v1, svc("again", 80, clusterIP="10.96.0.10"))
    message = 'spec.clusterIPs: Invalid value: []string{"10.96.0.10"}: failed to allocate IP 10.96.0.10: '
    assert (taken["code"], taken["reason"]) == (422, "Invalid")
    assert taken["message"] == invalid("again", message + "provided IP is already allocated")
    assert taken["details"] == {
        "name": "again",
        "group": "",
        "kind": "Service",
        "causes": [
            {
                "reason": "FieldValueInvalid",
                "message": 'Invalid value: []string{"10.96.0.10"}: failed to allocate IP 10.96.0.10: '
                "provided IP is already allocated",
                "field": "spec.clusterIPs",
            }
        ],
    }
    outside = "the provided IP ({0}) is not in the valid range. The range of valid IPs is 10.96.0.0/12"
    for ip in ("10.0.0.5", "10.96.0.0", "10.111.255.255"):  # elsewhere, the network, the broadcast address
        status = await refused(v1, svc("out", 80, clusterIP=ip))
        cause = f'spec.clusterIPs: Invalid value: []string{{"{ip}"}}: failed to allocate IP {ip}: '
        assert status["message"] == invalid("out", cause + outside.format(ip))
    garbage = await refused(v1, svc("garbage", 80, clusterIP="10.96.0.300"))
    assert garbage["message"] == invalid(
        "garbage",
        'spec.clusterIPs[0]: Invalid value: "10.96.0.300": '
        "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)",
    )
    mismatch = await refused(v1, svc("mismatch", 80, clusterIP="10.96.0.12", clusterIPs=["10.96.0.13"]))
    assert mismatch["message"] == invalid(
        "mismatch",
        'spec.clusterIPs: Invalid value: []string{"10.96.0.13"}: first value must match `clusterIP`',
    )
    v6 = await refused(v1, svc("v6", 80, clusterIP="fd00::10"))
    assert v6["message"] == invalid(
        "v6",
        'spec.clusterIPs[0]: Invalid value: []string{"fd00::10"}: IPv6 is not configured on this cluster',
    )
    dual = await refused(v1, svc("dual", 80, ipFamilyPolicy="RequireDualStack"))
    assert dual["message"] == invalid(
        "dual",
        'spec.ipFamilyPolicy: Invalid value: "RequireDualStack": '
        "this cluster is not configured for dual-stack services",
    )
    assert (await create(v1, svc("prefer", 80, ipFamilyPolicy="PreferDualStack"))).spec.ip_families == [
        "IPv4"
    ]

    # Released with the Service (also when its namespace goes), and a dry run reserves nothing.
    await v1.delete_namespaced_service("kube-dns", "kube-system")
    again = await create(v1, svc("kube-dns", 53, clusterIP="10.96.0.10"))
    assert again.spec.cluster_ip == "10.96.0.10"
    await v1.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="team")))
    await create(v1, svc("team", 80, clusterIP="10.96.0.20"), "team")
    await v1.delete_namespace("team")
    dry_body: Any = svc("dry", 80, clusterIP="10.96.0.20")
    dry = await v1.create_namespaced_service("default", dry_body, dry_run="All")
    assert dry.spec.cluster_ip == "10.96.0.20"
    assert (await create(v1, svc("real", 80, clusterIP="10.96.0.20"))).spec.cluster_ip == "10.96.0.20"


async def test_dynamic_ips_are_unique_and_a_full_range_is_500(small: Callable[..., Any]) -> None:
    async with small("10.96.0.0/28", (30000, 30002)) as v1:
        assert (await v1.read_namespaced_service("kubernetes", "default")).spec.cluster_ip == "10.96.0.1"
        got = [(await create(v1, svc(f"s{i}", 80))).spec.cluster_ip for i in range(13)]
        assert sorted(got, key=ipaddress.ip_address) == [f"10.96.0.{i}" for i in range(2, 15)]
        full = await refused(v1, svc("s13", 80))
        assert (full["code"], full["reason"]) == (500, "InternalError")
        assert full["message"] == "Internal error occurred: failed to allocate a serviceIP: range is full"
        await v1.delete_namespaced_service("s5", "default")
        assert (await create(v1, svc("s13", 80))).spec.cluster_ip == got[5]


async def test_dynamic_ips_avoid_the_static_band(v1: client.CoreV1Api) -> None:
    """Upstream hands out dynamic IPs above the first 256 (of a /12) while any are free there."""
    for i in range(20):
        ip = ipaddress.ip_address((await create(v1, svc(f"s{i}", 80))).spec.cluster_ip)
        assert int(ip) - int(SERVICE_CIDR.network_address) >= 256


async def test_headless_and_external_name_services(v1: client.CoreV1Api) -> None:
    headless = await create(v1, svc("db", 5432, clusterIP="None", selector={"app": "db"}))
    assert (headless.spec.cluster_ip, headless.spec.cluster_ips) == ("None", ["None"])
    assert (headless.spec.ip_family_policy, headless.spec.ip_families) == ("SingleStack", ["IPv4"])
    bare = await create(v1, svc("bare", clusterIP="None"))  # no ports, no selector: fine when headless
    assert (bare.spec.ip_family_policy, bare.spec.ip_families) == ("RequireDualStack", ["IPv4", "IPv6"])
    for kind in ("NodePort", "LoadBalancer"):
        status = await refused(v1, svc("np", 80, clusterIP="None", type=kind))
        assert status["message"] == invalid(
            "np", f"spec.clusterIPs[0]: Invalid value: \"None\": may not be set to 'None' for {kind} services"
        )
    external = await create(v1, svc("ext", type="ExternalName", externalName="db.example.com."))
    assert external.spec.cluster_ip is None and external.spec.ip_families is None
    assert external.spec.internal_traffic_policy is None and external.spec.session_affinity == "None"
    nameless = await refused(v1, svc("nameless", type="ExternalName"))
    assert nameless["message"] == invalid("nameless", "spec.externalName: Required value")
    with_ip = await refused(
        v1, svc("withip", type="ExternalName", externalName="x.example", clusterIP="10.96.0.9")
    )
    assert with_ip["message"] == invalid(
        "withip", "spec.clusterIPs: Forbidden: may not be set for ExternalName services"
    )


async def test_node_ports_health_check_ports_and_their_errors(v1: client.CoreV1Api) -> None:
    dns = await create(
        v1,
        svc(
            "dns",
            {"name": "udp", "port": 53, "protocol": "UDP"},
            {"name": "tcp", "port": 53},
            {"name": "metrics", "port": 9153, "nodePort": 30080},
            type="NodePort",
        ),
    )
    udp, tcp, metrics = dns.spec.ports
    assert udp.node_port == tcp.node_port and 30000 <= udp.node_port <= 32767  # one per port number
    assert udp.node_port >= 30000 + 86  # above the static band of the node port range
    assert metrics.node_port == 30080 and dns.spec.external_traffic_policy == "Cluster"
    assert dns.spec.cluster_ip and dns.spec.allocate_load_balancer_node_ports is None

    taken = await refused(v1, svc("other", {"port": 80, "nodePort": 30080}, type="NodePort"))
    assert taken["message"] == invalid(
        "other", "spec.ports[0].nodePort: Invalid value: 30080: provided port is already allocated"
    )
    outside = await refused(v1, svc("other", {"port": 80, "nodePort": 20000}, type="NodePort"))
    assert outside["message"] == invalid(
        "other",
        "spec.ports[0].nodePort: Invalid value: 20000: provided port is not in the valid range. "
        "The range of valid ports is 30000-32767",
    )
    twice = await refused(
        v1,
        svc(
            "twice",
            {"name": "a", "port": 80, "nodePort": 30090},
            {"name": "b", "port": 81, "nodePort": 30090},
            type="NodePort",
        ),
    )
    assert twice["message"] == invalid("twice", "spec.ports[1].nodePort: Duplicate value: 30090")
    forbidden = await refused(v1, svc("cip", {"port": 80, "nodePort": 30091}))
    assert forbidden["message"] == invalid(
        "cip", "spec.ports[0].nodePort: Forbidden: may not be used when `type` is 'ClusterIP'"
    )

    lb = await create(v1, svc("lb", 443, type="LoadBalancer"))
    assert lb.spec.allocate_load_balancer_node_ports is True and lb.spec.ports[0].node_port
    assert lb.spec.external_traffic_policy == "Cluster" and lb.spec.health_check_node_port is None
    local = await create(v1, svc("local", 443, type="LoadBalancer", externalTrafficPolicy="Local"))
    assert local.spec.health_check_node_port not in (None, local.spec.ports[0].node_port)
    assert 30000 <= local.spec.health_check_node_port <= 32767
    asked = await create(
        v1, svc("asked", 443, type="LoadBalancer", externalTrafficPolicy="Local", healthCheckNodePort=30300)
    )
    assert asked.spec.health_check_node_port == 30300
    clash = await refused(
        v1, svc("clash", 443, type="LoadBalancer", externalTrafficPolicy="Local", healthCheckNodePort=30300)
    )
    assert (clash["code"], clash["message"]) == (
        500,
        "Internal error occurred: failed to allocate requested HealthCheck NodePort 30300: "
        "provided port is already allocated",
    )
    manual = await create(
        v1,
        svc(
            "manual",
            443,
            {"name": "alt", "port": 8443, "nodePort": 30301},
            type="LoadBalancer",
            allocateLoadBalancerNodePorts=False,
        ),
    )
    assert [p.node_port for p in manual.spec.ports] == [None, 30301]
    policy = await refused(v1, svc("policy", 80, externalTrafficPolicy="Local"))
    assert policy["message"] == invalid(
        "policy",
        'spec.externalTrafficPolicy: Invalid value: "Local": '
        "may only be set for externally-accessible services",
    )
    health = await refused(v1, svc("health", 80, type="NodePort", healthCheckNodePort=30302))
    assert health["message"] == invalid(
        "health",
        "spec.healthCheckNodePort: Invalid value: 30302: may only be set when `type` is 'LoadBalancer' "
        "and `externalTrafficPolicy` is 'Local'",
    )


async def test_a_full_node_port_range_is_500(small: Callable[..., Any]) -> None:
    async with small("10.96.0.0/24", (30000, 30002)) as v1:
        ports = [
            (await create(v1, svc(f"np{i}", 80, type="NodePort"))).spec.ports[0].node_port for i in range(3)
        ]
        assert sorted(ports) == [30000, 30001, 30002]
        full = await refused(v1, svc("np3", 80, type="NodePort"))
        assert (full["code"], full["message"]) == (
            500,
            "Internal error occurred: failed to allocate a nodePort: range is full",
        )
        await v1.delete_namespaced_service("np1", "default")
        assert (await create(v1, svc("np3", 80, type="NodePort"))).spec.ports[0].node_port == ports[1]


async def test_validation_errors(v1: client.CoreV1Api) -> None:
    cases: list[tuple[JSON, list[str]]] = [
        (svc("noports"), ["spec.ports: Required value"]),
        (
            svc("kind", 80, type="Magic"),
            [
                'spec.type: Unsupported value: "Magic": '
                'supported values: "ClusterIP", "ExternalName", "LoadBalancer", "NodePort"'
            ],
        ),
        (
            svc(
                "ports",
                {"port": 80},
                {"name": "b", "port": 70000, "protocol": "ICMP", "targetPort": "way-too-long-port-name"},
            ),
            [
                "spec.ports[0].name: Required value",
                "spec.ports[1].port: Invalid value: 70000: must be between 1 and 65535, inclusive",
                'spec.ports[1].protocol: Unsupported value: "ICMP": supported values: "SCTP", "TCP", "UDP"',
                'spec.ports[1].targetPort: Invalid value: "way-too-long-port-name": '
                "must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)",
            ],
        ),
        (
            svc("dups", {"name": "a", "port": 80}, {"name": "a", "port": 80}),
            [
                'spec.ports[1].name: Duplicate value: "a"',
                'spec.ports[1]: Duplicate value: core.ServicePort{Name:"", Protocol:"TCP", '
                "AppProtocol:(*string)(nil), Port:80, TargetPort:intstr.IntOrString{Type:0, IntVal:0, "
                'StrVal:""}, NodePort:0}',
            ],
        ),
        (
            svc("affinity", 80, sessionAffinity="Sticky"),
            ['spec.sessionAffinity: Unsupported value: "Sticky": supported values: "ClientIP", "None"'],
        ),
        (
            svc("itp", 80, internalTrafficPolicy="Near"),
            ['spec.internalTrafficPolicy: Unsupported value: "Near": supported values: "Cluster", "Local"'],
        ),
    ]
    for body, causes in cases:
        status = await refused(v1, body)
        name = body["metadata"]["name"]
        assert (status["code"], status["message"]) == (422, invalid(name, *causes)), name
        assert [f"{c['field']}: {c['message']}" for c in status["details"]["causes"]] == causes
    assert [s.metadata.name for s in (await v1.list_namespaced_service("default")).items] == ["kubernetes"]


async def test_updates_keep_allocations_and_clusterips_never_change(v1: client.CoreV1Api) -> None:
    web = await create(v1, svc("web", 80, selector={"app": "web"}))
    ip = web.spec.cluster_ip
    with pytest.raises(ApiException) as err:
        await v1.patch_namespaced_service("web", "default", {"spec": {"clusterIP": "10.96.0.99"}})
    assert status_of(err.value)["message"] == invalid(
        "web", 'spec.clusterIPs[0]: Invalid value: []string{"10.96.0.99"}: may not change once set'
    )
    with pytest.raises(ApiException) as err:
        await v1.patch_namespaced_service(
            "web", "default", {"spec": {"clusterIP": "None", "clusterIPs": ["None"]}}
        )
    assert "may not change once set" in status_of(err.value)["message"]

    # A PUT that leaves allocated values out keeps them (kubectl replace of an edited manifest).
    body: Any = svc("web", {"name": "http", "port": 8080}, selector={"app": "web2"})
    body["metadata"]["resourceVersion"] = web.metadata.resource_version
    replaced = await v1.replace_namespaced_service("web", "default", body)
    assert replaced.spec.cluster_ip == ip and replaced.spec.cluster_ips == [ip]
    assert replaced.spec.selector == {"app": "web2"} and replaced.spec.ports[0].target_port == 8080

    # To NodePort and back: ports allocated, kept across an update that omits them, released after.
    node = await v1.patch_namespaced_service("web", "default", {"spec": {"type": "NodePort"}})
    port = node.spec.ports[0].node_port
    assert port and node.spec.external_traffic_policy == "Cluster" and node.spec.cluster_ip == ip
    body = svc("web", {"name": "http", "port": 8080}, type="NodePort", selector={"app": "web"})
    kept = await v1.replace_namespaced_service("web", "default", body)
    assert kept.spec.ports[0].node_port == port and kept.spec.cluster_ip == ip
    back = await v1.patch_namespaced_service("web", "default", {"spec": {"type": "ClusterIP"}})
    assert back.spec.ports[0].node_port is None and back.spec.external_traffic_policy is None
    claim = await create(v1, svc("claim", {"port": 80, "nodePort": port}, type="NodePort"))
    assert claim.spec.ports[0].node_port == port

    # To ExternalName: the ClusterIP and families go (and the IP is free again).
    external = {"spec": {"type": "ExternalName", "externalName": "web.example.com"}}
    named = await v1.patch_namespaced_service("web", "default", external)
    assert named.spec.cluster_ip is None and named.spec.cluster_ips is None and named.spec.ip_families is None
    assert (await create(v1, svc("reuse", 80, clusterIP=ip))).spec.cluster_ip == ip
    # And back: a new ClusterIP is allocated.
    again = await v1.patch_namespaced_service(
        "web", "default", {"spec": {"type": "ClusterIP", "externalName": None}}
    )
    assert again.spec.cluster_ip not in (None, ip) and again.spec.ip_families == ["IPv4"]

    # The status subresource is not the spec: no admission, no allocation.
    ingress = {"status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.10"}]}}}
    status = await v1.patch_namespaced_service_status("web", "default", ingress)
    assert (
        status.status.load_balancer.ingress[0].ip == "192.0.2.10"
        and status.spec.cluster_ip == again.spec.cluster_ip
    )


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_apply_and_get_services(tmp_path: Path) -> None:
    with ApiServerThread(kopf_peering=False) as api:
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", api.url)

        def kubectl(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
            cmd = ["kubectl", f"--kubeconfig={kubeconfig}", f"--cache-dir={tmp_path / 'cache'}", *args]
            return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=30, check=False)

        manifest = {
            "apiVersion": "v1",
            "kind": "Service",
            **svc("web", 80, type="NodePort", selector={"app": "web"}),
        }
        assert kubectl("apply", "-f", "-", stdin=yaml.safe_dump(manifest)).returncode == 0
        # Client-side apply's three-way merge leaves the allocated ClusterIP and nodePort alone.
        assert (
            kubectl("apply", "-f", "-", stdin=yaml.safe_dump(manifest)).stdout.strip().endswith("unchanged")
        )
        stored = api.get("services", "web", "default")
        assert stored is not None
        ip, port = stored["spec"]["clusterIP"], stored["spec"]["ports"][0]["nodePort"]
        rows = [line.split() for line in kubectl("get", "services", "-o", "wide").stdout.splitlines()]
        assert rows[0] == ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE", "SELECTOR"]
        assert rows[1][:5] == ["kubernetes", "ClusterIP", "10.96.0.1", "<none>", "443/TCP"]
        assert rows[2][:5] == ["web", "NodePort", ip, "<none>", f"80:{port}/TCP"] and rows[2][6] == "app=web"
        clash = {**manifest, "metadata": {"name": "clash"}, "spec": {**manifest["spec"], "clusterIP": ip}}
        refused = kubectl("create", "-f", "-", stdin=yaml.safe_dump(clash))
        assert refused.returncode == 1
        assert (
            f'The Service "clash" is invalid: spec.clusterIPs: Invalid value: []string{{"{ip}"}}'
            in refused.stderr
        )
        endpoints = [{"addresses": [f"10.244.1.{i}"]} for i in range(1, 6)]
        ports = [{"name": "http", "port": 8080, "protocol": "TCP"}]
        body = {
            "metadata": {"name": "web-abcde"},
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": ports,
        }
        api.create("endpointslices", body, "default")
        api.create("endpointslices", {"metadata": {"name": "web-empty"}, "addressType": "IPv4"}, "default")
        rows = [line.split() for line in kubectl("get", "endpointslices").stdout.splitlines()]
        assert [row[:-1] for row in rows] == [
            ["NAME", "ADDRESSTYPE", "PORTS", "ENDPOINTS"],
            ["web-abcde", "IPv4", "8080", "10.244.1.1,10.244.1.2,10.244.1.3", "+", "2", "more..."],
            ["web-empty", "IPv4", "<unset>", "<unset>"],
        ]
        assert kubectl("delete", "service", "web").returncode == 0
        assert api.get("services", "web", "default") is None
        assert api.server.errors == []
