"""Services end to end, in both service-proxy modes: API server + controller + agents (real
processes) + real OVS + real packets. In ``openflow`` mode the agents balance in OVS; in
``kube-proxy`` mode kube-proxy's nftables rules on every node (kvswitch_testbed.kubeproxy) balance
and k-vswitch forwards. Every test runs in both modes against the same Services.

Every pod runs a :class:`~kvswitch_testbed.probes.WhoAmI` (TCP and UDP) that answers with its name
and the source address it saw, so a probe knows which backend answered and whether the client was
NATed. Each pod has a Service of its own (one backend: on the client's node, on another node, or
the client itself), so every cell of the clients x Services matrix has one exact expected answer.

What the backend sees as the client (asserted below; both modes alike except hairpin):
  * a pod, whatever node: the pod's own IP;
  * a pod reaching itself (hairpin): openflow ``HAIRPIN_SNAT_IP``; kube-proxy the gateway IP of
    the pod's node (kube-proxy masquerades hairpin traffic, which leaves the host by ``kvs-gw0``);
  * a node (host network): the node's gateway IP (the source the host picks for the service
    CIDR route via ``kvs-gw0``), not NATed further;
  * the external host through a NodePort (``externalTrafficPolicy: Cluster``): masqueraded to the
    gateway IP of the node it entered.

One cluster per mode (module scope); tests put back what they change. Convergence is waited for by
polling with a deadline, never by sleeping.
"""

from __future__ import annotations

import ipaddress
import itertools
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from kvswitch_testbed.cluster import EXTERNAL_IP, Cluster, ClusterPod
from kvswitch_testbed.netns import run
from kvswitch_testbed.probes import (
    Answer,
    Endpoint,
    LoopThread,
    Outcome,
    Target,
    WhoAmI,
    ask,
    service_matrix,
)

from kvswitch.ovs.pipeline import HAIRPIN_SNAT_IP
from tests.conftest import register_run

NS = "svc"
PORT = 80  # every Service's port, TCP and UDP
TARGET_PORT = 8080  # where every WhoAmI listens
PORTS = [
    {"name": "tcp", "port": PORT, "targetPort": TARGET_PORT, "protocol": "TCP"},
    {"name": "udp", "port": PORT, "targetPort": TARGET_PORT, "protocol": "UDP"},
]
PROTOS = ("tcp", "udp")
SLOW_CALLBACK_MS = 100
CONVERGE = 30.0  # seconds for agents and kube-proxy to follow an API change
QUICK_REFUSAL = 1.0  # seconds: refused by the first SYN/datagram, not after retries (probes give up at 2 s)
POLICIES = f"/apis/networking.k8s.io/v1/namespaces/{NS}/networkpolicies"

T = TypeVar("T")
Results = dict[tuple[str, str, str], Outcome]  # (proto, client, target) -> outcome


@dataclass
class Env:
    """One mode's cluster, its pods with their WhoAmI servers, and the Services over them."""

    cluster: Cluster
    loop: LoopThread
    pods: dict[str, ClusterPod] = field(default_factory=dict)
    servers: dict[str, WhoAmI] = field(default_factory=dict)
    services: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def mode(self) -> str:
        return self.cluster.service_proxy

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run(coro)

    def add_backend(self, node: str, name: str, labels: dict[str, str], serve: bool = True) -> ClusterPod:
        cp = self.cluster.add_pod(self.cluster.bed.nodes[node], name, NS, labels=labels)
        self.pods[name] = cp
        if serve:
            self.servers[name] = self.run(WhoAmI(cp.netns, cp.ip, TARGET_PORT, name).start())
        return cp

    def remove_backend(self, name: str) -> None:
        server = self.servers.pop(name, None)
        if server is not None:
            self.run(server.stop())
        self.cluster.delete_pod(self.pods.pop(name))

    def cluster_ip(self, service: str) -> str:
        return str(self.services[service]["spec"]["clusterIP"])

    def gateway(self, node: str) -> str:
        net = ipaddress.IPv4Network(self.cluster.pod_cidr(self.cluster.bed.nodes[node]))
        return str(net.network_address + 1)

    def pod_clients(self, names: list[str] | None = None) -> list[Endpoint]:
        return [(n, self.pods[n].netns, self.pods[n].ip) for n in names or list(self.pods)]

    def node_clients(self) -> list[Endpoint]:
        return [(n.name, n.netns, self.gateway(n.name)) for n in self.cluster.bed.nodes.values()]

    def matrix(
        self, clients: list[Endpoint], targets: list[Target], protos: tuple[str, ...] = PROTOS
    ) -> Results:
        return self.run(service_matrix(clients, targets, protos))

    def per_pod_targets(self) -> list[Target]:
        return [(name, self.cluster_ip(name), PORT) for name in self.pods if name in self.services]

    def wait_converged(self) -> None:
        """Every pod and node answered through every Service (all agents / kube-proxies have them)."""
        clients = self.pod_clients() + self.node_clients()
        targets = [*self.per_pod_targets(), ("all", self.cluster_ip("all"), PORT)]

        def attempt() -> tuple[bool, Results]:
            results = self.matrix(clients, targets)
            return all_answered(results), results

        try:
            poll("every client answered by every Service", attempt)
        except AssertionError as exc:
            raise AssertionError(f"{self.mode}: {exc}\n{self.cluster.tail_logs()}") from None


def poll(what: str, attempt: Callable[[], tuple[bool, T]], timeout: float = CONVERGE) -> T:
    """Call ``attempt`` until it reports done; returns its last observation, which also explains
    a timeout."""
    deadline = time.monotonic() + timeout
    while True:
        done, seen = attempt()
        if done:
            return seen
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f}s; last seen: {seen}")
        time.sleep(0.2)


def all_answered(results: Results) -> bool:
    return all(isinstance(v, Answer) for v in results.values())


@pytest.fixture(scope="module", params=["openflow", "kube-proxy"])
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    c = Cluster(nodes=3, overlay="vxlan", service_proxy=request.param, asyncio_slow_ms=SLOW_CALLBACK_MS)
    register_run(c.bed.run_id)
    e = Env(c, LoopThread().start())
    try:
        with c:
            for node, role in itertools.product(list(c.bed.nodes), ("a", "b")):
                name = f"{node}-{role}"
                e.add_backend(node, name, {"pod": name, "role": role, "tier": "web"})
            for name in e.pods:
                e.services[name] = c.add_service(f"s-{name}", {"pod": name}, PORTS, namespace=NS)
            e.services["all"] = c.add_service("all", {"tier": "web"}, PORTS, namespace=NS)
            e.wait_converged()
            yield e
            for server in e.servers.values():
                e.run(server.stop())
    finally:
        e.loop.stop()


@pytest.fixture(autouse=True)
def _agents_never_block_their_event_loop(env: Env) -> Iterator[None]:
    """As in test_e2e: a slow-callback report from an agent fails the test it came in."""
    yield
    slow = env.cluster.slow_callbacks()
    assert not slow, f"an agent's event loop was blocked for {SLOW_CALLBACK_MS} ms or more:\n" + "\n".join(
        slow
    )


def icmp_counter(netns: str, name: str) -> int:
    """A counter of the ``Icmp:`` lines of a namespace's /proc/net/snmp (``OutRedirects``...)."""
    lines = [line.split() for line in run(["cat", "/proc/net/snmp"], netns).stdout.splitlines()]
    header, values = (line for line in lines if line and line[0] == "Icmp:")
    return int(values[header.index(name)])


def expected_peer(e: Env, client: str, backend: str) -> str:
    """The source address the backend sees (see the module docstring)."""
    if client in e.cluster.bed.nodes:  # a node's host network
        return e.gateway(client)
    if client == backend:  # hairpin
        return HAIRPIN_SNAT_IP if e.mode == "openflow" else e.gateway(e.pods[client].node.name)
    return e.pods[client].ip


class TestServiceMatrix:
    def test_every_pod_and_node_reaches_every_service_over_tcp_and_udp(self, env: Env) -> None:
        """Backends on the same node, on another node and the client itself, from pods and nodes:
        the Service's only pod answers and sees the expected client address."""
        clients = env.pod_clients() + env.node_clients()
        targets = env.per_pod_targets()
        # The fixture waited for convergence; judged on fresh connections only (one that began
        # before a node had the Service may keep the path it started on).
        results = env.matrix(clients, targets)
        assert len(results) == len(clients) * len(targets) * len(PROTOS)
        wrong = {
            key: got
            for key, got in results.items()
            if got != Answer(key[2], expected_peer(env, key[1], key[2]))
        }
        assert not wrong, f"{env.mode}: (proto, client, service) -> answer: {wrong}"

    def test_a_service_spanning_all_nodes_balances_over_them(self, env: Env) -> None:
        ip = env.cluster_ip("all")
        node_of = {name: cp.node.name for name, cp in env.pods.items()}
        clients = [("node1-a", env.pods["node1-a"].netns), ("node3", env.cluster.bed.nodes["node3"].netns)]

        async def spread() -> dict[str, set[str]]:
            seen: dict[str, set[str]] = {}
            for proto, (label, netns) in itertools.product(PROTOS, clients):
                for _ in range(30):
                    got = await ask(proto, netns, ip, PORT)
                    assert isinstance(got, Answer), (proto, label, got)
                    assert got.peer == expected_peer(env, label, got.backend), (proto, label, got)
                    seen.setdefault(f"{proto} from {label}", set()).add(node_of[got.backend])
            return seen

        for what, nodes in env.run(spread()).items():
            assert nodes == set(env.cluster.bed.nodes), (what, nodes)


class TestNodeHost:
    def test_the_nodes_send_their_pods_no_icmp_redirects(
        self, env: Env, request: pytest.FixtureRequest
    ) -> None:
        """A redirect is useless here (OVS routes by IP) and harmful: the kernel's per-host ICMP rate
        limit counts it, so the ICMP errors that matter (kube-proxy's reject, fragmentation needed)
        stop reaching the pod. Counted in the nodes' /proc/net/snmp around pod -> Service traffic."""
        nodes = env.cluster.bed.nodes.values()
        targets = env.per_pod_targets()
        before = {node.name: icmp_counter(node.netns, "OutRedirects") for node in nodes}
        results = env.matrix(env.pod_clients(), targets, ("tcp",))
        assert all_answered(results), results
        sent = {node.name: icmp_counter(node.netns, "OutRedirects") - before[node.name] for node in nodes}
        assert sent == dict.fromkeys(env.cluster.bed.nodes, 0)


class TestNodePort:
    def test_the_external_host_reaches_a_node_port_on_every_node(
        self, env: Env, request: pytest.FixtureRequest
    ) -> None:
        svc = env.cluster.add_service("np", {"tier": "web"}, PORTS, type="NodePort", namespace=NS)
        try:
            node_port = {p["protocol"].lower(): p["nodePort"] for p in svc["spec"]["ports"]}
            external = [("ext", env.cluster.external_ns, EXTERNAL_IP)]
            nodes = list(env.cluster.bed.nodes.values())

            def attempt() -> tuple[bool, Results]:
                results: Results = {}
                for proto in PROTOS:
                    targets = [(n.name, n.underlay_ip, node_port[proto]) for n in nodes]
                    results |= env.matrix(external, targets, (proto,))
                return all_answered(results), results

            results = poll("the external host answered through every node's NodePort", attempt)
            # externalTrafficPolicy Cluster: masqueraded to the node it entered (its gateway IP)
            wrong = {
                key: got
                for key, got in results.items()
                if not (
                    isinstance(got, Answer) and got.backend in env.pods and got.peer == env.gateway(key[2])
                )
            }
            assert not wrong, f"{env.mode}: {wrong}"
        finally:
            env.cluster.delete_service("np", NS)

    def test_a_node_port_answers_only_on_the_nodes_addresses(self, env: Env) -> None:
        """A pod's connection to another host's port that happens to be a NodePort passes through
        the node untouched (kube-proxy guards its NodePort map with ``fib daddr type local``): the
        external host, where nothing listens, refuses it."""
        svc = env.cluster.add_service("np-guard", {"tier": "web"}, PORTS, type="NodePort", namespace=NS)
        try:
            node_port = svc["spec"]["ports"][0]["nodePort"]
            client = env.pods["node1-a"]
            own_node = [("node1", client.node.underlay_ip, node_port)]

            def live() -> tuple[bool, Results]:  # on the node's own address, from its pod
                results = env.matrix(env.pod_clients(["node1-a"]), own_node, ("tcp",))
                return all_answered(results), results

            poll("node1's NodePort answers its pod", live)
            got = env.run(ask("tcp", client.netns, EXTERNAL_IP, node_port))
            assert got == "refused", f"{env.mode}: {EXTERNAL_IP}:{node_port} -> {got}"
        finally:
            env.cluster.delete_service("np-guard", NS)


class TestPolicy:
    def test_the_backends_ingress_policy_applies_to_clients_of_the_service(self, env: Env) -> None:
        """node2-a accepts only role=b: through its Service, role=b pods on its node and on another
        node answer; others (on its node and on another) do not, until the policy goes."""
        backend, ip = "node2-a", env.cluster_ip("node2-a")
        env.add_backend("node2", "stranger", {"role": "x"}, serve=False)
        allowed, denied = ["node2-b", "node1-b"], ["stranger", "node1-a"]
        clients = env.pod_clients(allowed + denied)
        target = [(backend, ip, PORT)]
        name = "only-b-to-node2-a"

        def verdicts(results: Results) -> dict[tuple[str, str], bool]:
            return {(proto, client): isinstance(got, Answer) for (proto, client, _), got in results.items()}

        def everyone() -> tuple[bool, Results]:
            results = env.matrix(clients, target)
            return all_answered(results), results

        def as_the_policy_says() -> tuple[bool, Results]:
            results = env.matrix(clients, target)
            good = all(
                (got == Answer(backend, env.pods[c].ip)) if c in allowed else got == "timeout"
                for (_, c, _), got in results.items()
            )
            return good, results

        try:
            poll("every client reaches node2-a before the policy", everyone)
            env.cluster.client.create(
                POLICIES,
                {
                    "apiVersion": "networking.k8s.io/v1",
                    "kind": "NetworkPolicy",
                    "metadata": {"name": name, "namespace": NS},
                    "spec": {
                        "podSelector": {"matchLabels": {"pod": backend}},
                        "policyTypes": ["Ingress"],
                        "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "b"}}}]}],
                    },
                },
            )
            results = poll("only role=b reaches node2-a through its Service", as_the_policy_says)
            assert verdicts(results) == {(p, c): c in allowed for p in PROTOS for c in allowed + denied}
            env.cluster.client.delete(f"{POLICIES}/{name}")
            poll("every client reaches node2-a again without the policy", everyone)
        finally:
            env.cluster.client.delete(f"{POLICIES}/{name}")
            env.remove_backend("stranger")


class TestEndpoints:
    @pytest.mark.parametrize("kind", ["pod", "node"])
    def test_a_service_without_endpoints_refuses_at_once(
        self, env: Env, kind: str, request: pytest.FixtureRequest
    ) -> None:
        """Never a timeout: openflow answers from the agent's responder (TCP RST, ICMP port
        unreachable); kube-proxy's ``reject`` rule sends ICMP port unreachable to a pod (forward
        hook) and fails a node's own UDP send at once with EPERM (output hook)."""
        name = f"empty-{kind}"
        svc = env.cluster.add_service(name, {"pod": "nobody"}, PORTS, namespace=NS)
        try:
            client = env.pod_clients(["node2-b"])[0] if kind == "pod" else env.node_clients()[1]
            target = [(name, svc["spec"]["clusterIP"], PORT)]
            expected = {
                proto: "EPERM" if (env.mode, kind, proto) == ("kube-proxy", "node", "udp") else "refused"
                for proto in PROTOS
            }

            def attempt() -> tuple[bool, Results]:
                results = env.matrix([client], target)
                return all(got == expected[key[0]] for key, got in results.items()), results

            # Few probes: the kernel rate-limits ICMP errors to one host (1/s, burst 6), kube-proxy's too.
            poll("refused", attempt)

            async def timed() -> list[tuple[str, Outcome, float]]:
                out = []
                for proto in PROTOS:
                    t0 = time.monotonic()
                    got = await ask(proto, client[1], target[0][1], PORT)
                    out.append((proto, got, time.monotonic() - t0))
                return out

            wrong = [r for r in env.run(timed()) if r[1] != expected[r[0]] or r[2] > QUICK_REFUSAL]
            assert not wrong, f"{env.mode}, {kind} client: {wrong}"
        finally:
            env.cluster.delete_service(name, NS)

    def test_scaling_replicas_updates_the_endpoint_slice_and_traffic_follows(self, env: Env) -> None:
        """A Deployment-like set app=scaled, one replica per node round-robin: 1 -> 3 -> 1."""
        app = {"app": "scaled"}
        nodes = list(env.cluster.bed.nodes)
        svc = env.cluster.add_service("scaled", app, PORTS, namespace=NS)
        ip = svc["spec"]["clusterIP"]
        replicas: list[str] = []
        client = env.pods["node1-a"]

        def scale(n: int) -> set[str]:
            while len(replicas) < n:
                name = f"scaled-{len(replicas)}"
                env.add_backend(nodes[len(replicas) % len(nodes)], name, app)
                replicas.append(name)
            while len(replicas) > n:
                name = replicas.pop()
                env.cluster.terminate_pod(env.pods[name])  # graceful: Terminating, then gone
                env.remove_backend(name)
            return {env.pods[r].ip for r in replicas}

        def ready_addresses() -> set[str]:
            return {
                addr
                for s in env.cluster.endpoint_slices("scaled", NS)
                for ep in s.get("endpoints") or []
                if (ep.get("conditions") or {}).get("ready")
                for addr in ep.get("addresses") or []
            }

        def slice_is(want: set[str]) -> Callable[[], tuple[bool, set[str]]]:
            def attempt() -> tuple[bool, set[str]]:
                now = ready_addresses()
                return now == want, now

            return attempt

        async def backends(count: int) -> list[Outcome]:
            return [await ask(proto, client.netns, ip, PORT) for proto in PROTOS for _ in range(count)]

        def answered_by(names: set[str]) -> Callable[[], tuple[bool, Any]]:
            """Done when 20 answers in a row come from ``names`` only and every name answered
            (accumulated over attempts while scaling up)."""
            seen: set[str] = set()

            def attempt() -> tuple[bool, Any]:
                got = env.run(backends(10))
                names_now = {a.backend if isinstance(a, Answer) else str(a) for a in got}
                seen.update(names_now & names)
                return names_now <= names and seen == names, (names_now, seen)

            return attempt

        try:
            for n in (1, 3, 1):
                want = scale(n)
                poll(f"EndpointSlice with {n} ready endpoints", slice_is(want))
                poll(f"traffic to the {n} replicas", answered_by(set(replicas)))
        finally:
            while replicas:
                env.remove_backend(replicas.pop())
            env.cluster.delete_service("scaled", NS)
