"""The NetworkPolicy reference evaluator on hand-written clusters, and its case generator.

Pure Python: every test builds a small cluster of plain API dicts and asks
:func:`policy_reference.allowed`. The bracketed tags ([NP], [API], [LS], [LBL]) name the
documentation page each expectation comes from (listed in ``tests/policy_reference.py``).
"""

from __future__ import annotations

import collections
from typing import Any

import kubernetes_validate
import pytest

from tests.policy_reference import (
    ALL_FEATURES,
    PROTOCOLS,
    Case,
    Cluster,
    allowed,
    assign_ips,
    case_kind,
    describe,
    evaluate,
    feature_census,
    generate,
    make_cases,
    make_cluster,
    policy_types,
    selector_matches,
    validate_cluster,
    validate_policy,
)

Obj = dict[str, Any]

NODE_IPS = {"node1": "10.250.0.11", "node2": "10.250.0.12"}
EXT = "10.250.0.200"
EXT2 = "10.250.0.205"

# prod: web (node1) and db (node2); dev: client (node1); other: stranger (node2, also app=web).
WEB, DB, CLIENT, STRANGER = "10.244.1.2", "10.244.2.2", "10.244.1.3", "10.244.2.3"
NODE1, NODE2 = NODE_IPS["node1"], NODE_IPS["node2"]


def _ns(name: str, **labels: str) -> Obj:
    return {"metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name, **labels}}}


def _pod(
    name: str,
    namespace: str,
    ip: str,
    node: str,
    labels: dict[str, str],
    ports: list[tuple[str | None, str, int]],
) -> Obj:
    cports: list[Obj] = []
    for port_name, proto, number in ports:
        cp: Obj = {"containerPort": number, "protocol": proto}
        if port_name:
            cp["name"] = port_name
        cports.append(cp)
    return {
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "c", "ports": cports}]},
        "status": {"podIP": ip},
    }


def _np(namespace: str, spec: Obj, name: str = "np") -> Obj:
    return {"metadata": {"name": name, "namespace": namespace}, "spec": {"podSelector": {}, **spec}}


def world(*policies: Obj) -> Cluster:
    """The hand-written cluster every evaluator test uses, with the given policies."""
    cluster = Cluster(
        namespaces=[_ns("prod", env="prod", team="blue"), _ns("dev", env="dev"), _ns("other")],
        pods=[
            _pod("web", "prod", WEB, "node1", {"app": "web", "tier": "front"}, [("http", "TCP", 80)]),
            _pod(
                "db",
                "prod",
                DB,
                "node2",
                {"app": "db", "tier": "back"},
                [("http", "TCP", 8080), ("dns", "UDP", 53), ("sctp-svc", "SCTP", 9000)],
            ),
            _pod("client", "dev", CLIENT, "node1", {"app": "client"}, []),
            _pod("stranger", "other", STRANGER, "node2", {"app": "web"}, [("http", "TCP", 8000)]),
        ],
        policies=[{**p, "metadata": {**p["metadata"], "name": f"np-{i}"}} for i, p in enumerate(policies)],
        node_ips=dict(NODE_IPS),
        external=[EXT, EXT2],
    )
    validate_cluster(cluster)
    return cluster


def deny_ingress(namespace: str, selector: Obj | None = None) -> Obj:
    return _np(namespace, {"podSelector": selector or {}, "policyTypes": ["Ingress"]})


def deny_egress(namespace: str, selector: Obj | None = None) -> Obj:
    return _np(namespace, {"podSelector": selector or {}, "policyTypes": ["Egress"]})


def on(app: str) -> Obj:
    return {"matchLabels": {"app": app}}


# --- isolation and policy types -----------------------------------------------------------------


def test_without_policies_everything_is_allowed() -> None:
    cluster = world()
    ips = [WEB, DB, CLIENT, STRANGER, NODE1, NODE2, EXT]
    for src in ips:
        for dst in ips:
            for proto in PROTOCOLS:
                assert allowed(cluster, src, dst, proto, 1234)


def test_isolation_is_per_direction() -> None:
    # [NP] "The two sorts of isolation (or not) are declared independently".
    ingress_only = world(deny_ingress("prod", on("db")))
    assert not allowed(ingress_only, WEB, DB, "TCP", 8080)
    assert allowed(ingress_only, DB, WEB, "TCP", 80)  # db's egress is not isolated
    assert allowed(ingress_only, DB, EXT, "TCP", 443)

    egress_only = world(deny_egress("prod", on("web")))
    assert not allowed(egress_only, WEB, DB, "TCP", 8080)
    assert not allowed(egress_only, WEB, EXT, "UDP", 53)
    assert allowed(egress_only, DB, WEB, "TCP", 80)  # web's ingress is not isolated
    assert allowed(egress_only, EXT, WEB, "TCP", 80)


def test_a_policy_selects_pods_of_its_own_namespace_only() -> None:
    # [API] podSelector: "An empty podSelector matches all pods in this namespace."
    cluster = world(deny_ingress("dev"))
    assert not allowed(cluster, WEB, CLIENT, "TCP", 80)
    assert allowed(cluster, CLIENT, DB, "TCP", 8080)
    assert allowed(cluster, CLIENT, STRANGER, "TCP", 8000)


def test_inferred_policy_types() -> None:
    # [API] "policies that contain an Egress section are assumed to affect Egress, and all policies
    # (whether or not they contain an Ingress section) are assumed to affect Ingress."
    to_ext = {"egress": [{"to": [{"ipBlock": {"cidr": f"{EXT}/32"}}]}]}
    cluster = world(_np("prod", {"podSelector": on("web"), **to_ext}))
    assert policy_types(cluster.policies[0]) == {"Ingress", "Egress"}
    assert allowed(cluster, WEB, EXT, "TCP", 443)
    assert not allowed(cluster, WEB, DB, "TCP", 8080)  # egress isolated by the inferred type
    assert not allowed(cluster, CLIENT, WEB, "TCP", 80)  # ingress always inferred, no rules

    # Choice (module docstring): `egress: []` has no egress rules, so Egress is NOT inferred.
    empty_egress = world(_np("prod", {"podSelector": on("web"), "egress": []}))
    assert policy_types(empty_egress.policies[0]) == {"Ingress"}
    assert allowed(empty_egress, WEB, DB, "TCP", 8080)
    assert not allowed(empty_egress, CLIENT, WEB, "TCP", 80)

    inferred_ingress: list[Obj] = [{}, {"policyTypes": []}, {"ingress": [{}]}]
    for spec in inferred_ingress:
        assert policy_types(_np("prod", spec)) == {"Ingress"}


def test_explicit_policy_types_win_over_the_sections() -> None:
    # [API] "If you want to write an egress-only policy, you must explicitly specify policyTypes
    # [ "Egress" ]"; a section of a type not listed does not apply.
    egress_only = world(_np("prod", {"podSelector": on("web"), "policyTypes": ["Egress"], "ingress": []}))
    assert not allowed(egress_only, WEB, DB, "TCP", 8080)
    assert allowed(egress_only, CLIENT, WEB, "TCP", 80)  # `ingress: []` ignored: not an Ingress policy

    ingress_only = world(
        _np("prod", {"podSelector": on("web"), "policyTypes": ["Ingress"], "ingress": [{}], "egress": []})
    )
    assert allowed(ingress_only, WEB, DB, "TCP", 8080)  # egress section ignored
    assert allowed(ingress_only, CLIENT, WEB, "TCP", 80)

    both = world(_np("prod", {"podSelector": on("web"), "policyTypes": ["Ingress", "Egress"]}))
    assert not allowed(both, WEB, DB, "TCP", 8080)
    assert not allowed(both, CLIENT, WEB, "TCP", 80)


def test_policies_are_additive() -> None:
    # [NP] "Network policies do not conflict; they are additive."
    from_web = _np("prod", {"podSelector": on("db"), "ingress": [{"from": [{"podSelector": on("web")}]}]})
    dns_from_dev = _np(
        "prod",
        {
            "podSelector": on("db"),
            "ingress": [
                {
                    "from": [{"namespaceSelector": {"matchLabels": {"env": "dev"}}}],
                    "ports": [{"protocol": "UDP", "port": 53}],
                }
            ],
        },
    )
    cluster = world(deny_ingress("prod"), from_web, dns_from_dev)
    assert allowed(cluster, WEB, DB, "TCP", 8080)
    assert allowed(cluster, CLIENT, DB, "UDP", 53)
    assert not allowed(cluster, CLIENT, DB, "TCP", 8080)
    assert not allowed(cluster, STRANGER, DB, "UDP", 53)
    assert not allowed(cluster, CLIENT, WEB, "TCP", 80)  # only the deny-all selects web


def test_both_ends_must_allow() -> None:
    # [NP] "both the egress policy on the source pod and the ingress policy on the destination pod
    # need to allow the connection."
    web_to_db = _np(
        "prod",
        {
            "podSelector": on("web"),
            "policyTypes": ["Egress"],
            "egress": [{"to": [{"podSelector": on("db")}]}],
        },
    )
    assert allowed(world(web_to_db), WEB, DB, "TCP", 8080)
    assert not allowed(world(web_to_db, deny_ingress("prod", on("db"))), WEB, DB, "TCP", 8080)
    assert not allowed(world(web_to_db), WEB, STRANGER, "TCP", 8000)


# --- peers --------------------------------------------------------------------------------------


def _ingress_from(*peers: Obj, to: str = "db") -> Cluster:
    return world(_np("prod", {"podSelector": on(to), "ingress": [{"from": list(peers)}]}))


def test_pod_selector_peer_stays_in_the_policy_namespace() -> None:
    # [API] podSelector peer: "Otherwise it selects the Pods matching PodSelector in the policy's
    # own Namespace."
    cluster = _ingress_from({"podSelector": on("web")})
    assert allowed(cluster, WEB, DB, "TCP", 8080)
    assert not allowed(cluster, STRANGER, DB, "TCP", 8080)  # app=web, but in namespace `other`
    assert not allowed(cluster, EXT, DB, "TCP", 8080)


def test_namespace_selector_peer() -> None:
    # [API] "Otherwise it selects all Pods in the Namespaces selected by NamespaceSelector."
    cluster = _ingress_from({"namespaceSelector": {"matchLabels": {"env": "dev"}}})
    assert allowed(cluster, CLIENT, DB, "SCTP", 9000)
    assert not allowed(cluster, WEB, DB, "TCP", 8080)  # own namespace is not implied
    assert not allowed(cluster, NODE1, DB, "TCP", 8080)  # selectors never match non-pods
    by_name = _ingress_from(
        {
            "namespaceSelector": {
                "matchExpressions": [
                    {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["other"]}
                ]
            }
        }
    )
    assert allowed(by_name, STRANGER, DB, "TCP", 8080)
    assert not allowed(by_name, CLIENT, DB, "TCP", 8080)


def test_namespace_and_pod_selector_in_one_peer_is_an_and_two_peers_an_or() -> None:
    # [NP] a single element "allowing connections from Pods with the label role=client in
    # namespaces with the label user=alice", two elements: "*or*".
    other = {"matchLabels": {"kubernetes.io/metadata.name": "other"}}
    one_peer = _ingress_from({"namespaceSelector": other, "podSelector": on("web")})
    assert allowed(one_peer, STRANGER, DB, "TCP", 8080)
    assert not allowed(one_peer, WEB, DB, "TCP", 8080)
    assert not allowed(one_peer, CLIENT, DB, "TCP", 8080)
    wrong_pod = _ingress_from({"namespaceSelector": other, "podSelector": on("db")})
    assert not allowed(wrong_pod, STRANGER, DB, "TCP", 8080)  # right namespace, wrong pod

    two_peers = _ingress_from({"namespaceSelector": other}, {"podSelector": on("web")})
    assert allowed(two_peers, STRANGER, DB, "TCP", 8080)
    assert allowed(two_peers, WEB, DB, "TCP", 8080)
    assert not allowed(two_peers, CLIENT, DB, "TCP", 8080)


def test_ip_block_with_except_in_both_directions() -> None:
    # [NP] "all of 172.17.0.0/16 except 172.17.1.0/24".
    block = {"ipBlock": {"cidr": "10.250.0.192/27", "except": ["10.250.0.200/30"]}}
    cluster = world(
        _np(
            "prod",
            {"podSelector": on("web"), "ingress": [{"from": [block]}], "egress": [{"to": [block]}]},
        )
    )
    assert allowed(cluster, EXT2, WEB, "TCP", 80)
    assert not allowed(cluster, EXT, WEB, "TCP", 80)  # in the except
    assert not allowed(cluster, "10.250.0.100", WEB, "TCP", 80)  # outside the cidr
    assert allowed(cluster, WEB, EXT2, "UDP", 53)
    assert not allowed(cluster, WEB, EXT, "UDP", 53)


def test_ip_block_matches_pod_and_node_addresses() -> None:
    # Choice (module docstring): an ipBlock is address based; pod IPs are "should not", not "cannot".
    node1_pods = _ingress_from({"ipBlock": {"cidr": "10.244.1.0/24", "except": [f"{CLIENT}/32"]}})
    assert allowed(node1_pods, WEB, DB, "TCP", 8080)
    assert not allowed(node1_pods, CLIENT, DB, "TCP", 8080)
    assert not allowed(node1_pods, STRANGER, DB, "TCP", 8080)
    # node1 is not db's node, so it is an ordinary address for db.
    assert not allowed(node1_pods, NODE1, DB, "TCP", 8080)
    assert allowed(_ingress_from({"ipBlock": {"cidr": "10.250.0.0/24"}}), NODE1, DB, "TCP", 8080)
    # An address in one peer's except is still allowed by another peer that matches it.
    overlap = _ingress_from(
        {"ipBlock": {"cidr": "10.244.0.0/16", "except": ["10.244.1.0/24"]}}, {"podSelector": on("web")}
    )
    assert allowed(overlap, WEB, DB, "TCP", 8080)
    assert not allowed(overlap, CLIENT, DB, "TCP", 8080)


# --- label selectors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("operator", "values", "labels", "expected"),
    [
        ("In", ["a", "b"], {"k": "b"}, True),
        ("In", ["a"], {"k": "c"}, False),
        ("In", ["a"], {}, False),
        ("NotIn", ["a"], {"k": "c"}, True),
        ("NotIn", ["a", "b"], {"k": "a"}, False),
        ("NotIn", ["a"], {}, True),  # [LBL] "and all resources with no labels with the tier key"
        ("Exists", [], {"k": ""}, True),
        ("Exists", [], {"x": "k"}, False),
        ("DoesNotExist", [], {"x": "k"}, True),
        ("DoesNotExist", [], {"k": "a"}, False),
    ],
)
def test_match_expression_operators(
    operator: str, values: list[str], labels: dict[str, str], expected: bool
) -> None:
    req: Obj = {"key": "k", "operator": operator}
    if values:
        req["values"] = values
    assert selector_matches({"matchExpressions": [req]}, labels) is expected


def test_selector_requirements_are_anded_empty_matches_all_null_matches_none() -> None:
    # [LS] "The result of matchLabels and matchExpressions are ANDed. An empty label selector
    # matches all objects. A null label selector matches no objects."
    sel = {"matchLabels": {"app": "web"}, "matchExpressions": [{"key": "tier", "operator": "Exists"}]}
    assert selector_matches(sel, {"app": "web", "tier": "x"})
    assert not selector_matches(sel, {"app": "web"})
    assert not selector_matches(sel, {"tier": "x"})
    assert selector_matches({}, {}) and selector_matches({}, {"a": "b"})
    assert not selector_matches(None, {"a": "b"})
    # matchExpressions through a whole policy: NotIn also selects pods without the key.
    cluster = world(
        deny_ingress(
            "prod", {"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["front"]}]}
        )
    )
    assert allowed(cluster, CLIENT, WEB, "TCP", 80)
    assert not allowed(cluster, CLIENT, DB, "TCP", 8080)
    dev_unlabelled = world(
        deny_ingress("dev", {"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["front"]}]})
    )
    assert not allowed(dev_unlabelled, WEB, CLIENT, "TCP", 80)


def test_empty_selectors_select_everything_in_their_scope() -> None:
    # [API] peer podSelector/namespaceSelector: "if present but empty, it selects all pods" /
    # "all namespaces".
    same_ns = _ingress_from({"podSelector": {}})
    assert allowed(same_ns, WEB, DB, "TCP", 8080)
    assert not allowed(same_ns, CLIENT, DB, "TCP", 8080)
    all_ns = _ingress_from({"namespaceSelector": {}})
    assert allowed(all_ns, CLIENT, DB, "TCP", 8080) and allowed(all_ns, STRANGER, DB, "TCP", 8080)
    assert not allowed(all_ns, EXT, DB, "TCP", 8080)  # every pod, but nothing that is not a pod
    both_empty = _ingress_from({"namespaceSelector": {}, "podSelector": {}})
    assert allowed(both_empty, CLIENT, DB, "TCP", 8080)
    assert not allowed(both_empty, NODE1, DB, "TCP", 8080)


# --- rule shapes --------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", [{}, {"from": []}, {"from": [], "ports": []}])
def test_empty_or_absent_from_allows_every_source(rule: Obj) -> None:
    # [API] from: "If this field is empty or missing, this rule matches all sources".
    cluster = world(_np("prod", {"podSelector": on("db"), "ingress": [rule]}))
    for src in (WEB, CLIENT, STRANGER, NODE1, EXT):
        for proto in PROTOCOLS:
            assert allowed(cluster, src, DB, proto, 4242)


@pytest.mark.parametrize("rule", [{}, {"to": []}, {"to": [], "ports": []}])
def test_empty_or_absent_to_allows_every_destination(rule: Obj) -> None:
    cluster = world(_np("prod", {"podSelector": on("web"), "policyTypes": ["Egress"], "egress": [rule]}))
    for dst in (DB, CLIENT, STRANGER, NODE2, EXT):
        for proto in PROTOCOLS:
            assert allowed(cluster, WEB, dst, proto, 4242)


def test_empty_or_absent_rule_list_denies_everything() -> None:
    # [API] ingress: "If this field is empty then this NetworkPolicy does not allow any traffic".
    ingress_specs: list[Obj] = [
        {"ingress": []},
        {"policyTypes": ["Ingress"]},
        {"policyTypes": ["Ingress"], "ingress": []},
    ]
    for spec in ingress_specs:
        cluster = world(_np("prod", {"podSelector": on("db"), **spec}))
        for src in (WEB, CLIENT, STRANGER, NODE1, EXT):
            assert not allowed(cluster, src, DB, "TCP", 8080)
    egress_specs: list[Obj] = [{"policyTypes": ["Egress"]}, {"policyTypes": ["Egress"], "egress": []}]
    for spec in egress_specs:
        cluster = world(_np("prod", {"podSelector": on("web"), **spec}))
        for dst in (DB, CLIENT, NODE2, EXT):
            assert not allowed(cluster, WEB, dst, "UDP", 53)


# --- ports --------------------------------------------------------------------------------------


def _ingress_ports(*ports: Obj, to: str = "db") -> Cluster:
    return world(_np("prod", {"podSelector": on(to), "ingress": [{"ports": list(ports)}]}))


def test_protocols_and_the_tcp_default() -> None:
    # [API] protocol: "The protocol (TCP, UDP, or SCTP) which traffic must match. If not specified,
    # this field defaults to TCP."
    cluster = _ingress_ports(
        {"protocol": "UDP", "port": 53}, {"protocol": "SCTP", "port": 9000}, {"port": 8080}
    )
    assert allowed(cluster, WEB, DB, "UDP", 53)
    assert not allowed(cluster, WEB, DB, "TCP", 53)
    assert allowed(cluster, WEB, DB, "SCTP", 9000)
    assert not allowed(cluster, WEB, DB, "UDP", 9000)
    assert allowed(cluster, WEB, DB, "TCP", 8080)
    assert not allowed(cluster, WEB, DB, "UDP", 8080)
    assert not allowed(cluster, WEB, DB, "SCTP", 8080)


def test_port_entry_without_a_port_matches_every_port_of_its_protocol() -> None:
    # [API] port: "If this field is not provided, this matches all port names and numbers."
    udp = _ingress_ports({"protocol": "UDP"})
    assert allowed(udp, WEB, DB, "UDP", 1) and allowed(udp, WEB, DB, "UDP", 65535)
    assert not allowed(udp, WEB, DB, "TCP", 8080)
    all_tcp = _ingress_ports({})  # protocol defaults to TCP: every TCP port, nothing else
    assert allowed(all_tcp, WEB, DB, "TCP", 12345)
    assert not allowed(all_tcp, WEB, DB, "UDP", 53)
    assert not allowed(all_tcp, WEB, DB, "SCTP", 9000)


def test_numeric_port_needs_no_declared_container_port() -> None:
    cluster = _ingress_ports({"port": 9999})
    assert allowed(cluster, WEB, DB, "TCP", 9999)
    assert not allowed(cluster, WEB, DB, "TCP", 8080)


def test_end_port_range_is_inclusive() -> None:
    # [API] endPort: "the range of ports from port to endPort, inclusive".
    cluster = _ingress_ports(
        {"protocol": "TCP", "port": 8000, "endPort": 8080},
        {"protocol": "SCTP", "port": 9000, "endPort": 9000},
    )
    assert not allowed(cluster, WEB, DB, "TCP", 7999)
    assert allowed(cluster, WEB, DB, "TCP", 8000)
    assert allowed(cluster, WEB, DB, "TCP", 8080)
    assert not allowed(cluster, WEB, DB, "TCP", 8081)
    assert not allowed(cluster, WEB, DB, "UDP", 8040)
    assert allowed(cluster, WEB, DB, "SCTP", 9000)
    assert not allowed(cluster, WEB, DB, "SCTP", 9001)


def test_named_port_resolves_on_each_destination_pod() -> None:
    # [API] port: "This can either be a numerical or named port on a pod." "http" is 80 on web,
    # 8080 on db.
    cluster = world(_np("prod", {"ingress": [{"ports": [{"port": "http"}]}]}))
    assert allowed(cluster, CLIENT, WEB, "TCP", 80)
    assert not allowed(cluster, CLIENT, WEB, "TCP", 8080)
    assert allowed(cluster, CLIENT, DB, "TCP", 8080)
    assert not allowed(cluster, CLIENT, DB, "TCP", 80)


def test_named_port_needs_the_same_protocol() -> None:
    # "dns" is UDP 53 on db; the rule's protocol (default TCP) must match the container port's.
    tcp_dns = _ingress_ports({"port": "dns"})
    assert not allowed(tcp_dns, WEB, DB, "TCP", 53)
    assert not allowed(tcp_dns, WEB, DB, "UDP", 53)
    udp_dns = _ingress_ports({"protocol": "UDP", "port": "dns"})
    assert allowed(udp_dns, WEB, DB, "UDP", 53)
    assert not allowed(udp_dns, WEB, DB, "TCP", 53)
    sctp = _ingress_ports({"protocol": "SCTP", "port": "sctp-svc"})
    assert allowed(sctp, WEB, DB, "SCTP", 9000)
    assert not allowed(sctp, WEB, DB, "SCTP", 9001)


def test_named_port_in_egress_resolves_on_the_destination() -> None:
    cluster = world(
        _np(
            "prod",
            {"podSelector": on("web"), "policyTypes": ["Egress"], "egress": [{"ports": [{"port": "http"}]}]},
        )
    )
    assert allowed(cluster, WEB, DB, "TCP", 8080)
    assert not allowed(cluster, WEB, DB, "TCP", 80)  # 80 is web's own http, not db's
    assert allowed(cluster, WEB, STRANGER, "TCP", 8000)
    assert not allowed(cluster, WEB, EXT, "TCP", 80)  # not a pod: a name matches nothing
    assert not allowed(cluster, WEB, CLIENT, "TCP", 80)  # a pod without that name


# --- exemptions ---------------------------------------------------------------------------------


def test_the_pods_own_node_is_always_allowed() -> None:
    # [NP] "the only allowed connections into the pod are those from the pod's node and those
    # allowed by the ingress list" and "traffic to and from the node where a Pod is running is
    # always allowed".
    cluster = world(_np("prod", {"podSelector": on("db"), "policyTypes": ["Ingress", "Egress"]}))
    for proto in PROTOCOLS:
        assert allowed(cluster, NODE2, DB, proto, 8080)
        assert allowed(cluster, DB, NODE2, proto, 10250)
    assert not allowed(cluster, NODE1, DB, "TCP", 8080)  # another node is just an address
    assert not allowed(cluster, DB, NODE1, "TCP", 10250)
    assert "own node" in evaluate(cluster, NODE2, DB, "TCP", 8080).ingress


def test_a_pod_cannot_block_itself_and_non_pod_traffic_is_not_policed() -> None:
    # [NP] "a pod cannot block access to itself"; "NetworkPolicies apply to a connection with a pod
    # on one or both ends, and are not relevant to other connections."
    cluster = world(*(_np(ns, {"policyTypes": ["Ingress", "Egress"]}) for ns in ("prod", "dev", "other")))
    assert allowed(cluster, DB, DB, "TCP", 8080)
    assert not allowed(cluster, WEB, DB, "TCP", 8080)
    assert allowed(cluster, EXT, NODE1, "TCP", 22)
    assert allowed(cluster, EXT, EXT2, "UDP", 53)


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ({"ingress": [{"ports": [{"port": "http", "endPort": 90}]}]}, "endPort"),
        ({"ingress": [{"ports": [{"port": 90, "endPort": 80}]}]}, "endPort"),
        (
            {"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}]},
            "ipBlock excludes",
        ),
        ({"ingress": [{"from": [{}]}]}, "needs ipBlock"),
        ({"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/24", "except": ["10.0.1.0/24"]}}]}]}, "outside"),
        ({"podSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}, "needs values"),
        ({"ingress": [{"ports": [{"protocol": "ICMP"}]}]}, "protocol"),
        ({"policyTypes": ["Inbound"]}, "policyTypes"),
    ],
)
def test_validate_policy_refuses_what_the_api_refuses(spec: Obj, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        validate_policy(_np("prod", spec))


# --- the generator ------------------------------------------------------------------------------


def test_generator_is_deterministic() -> None:
    first, again, other = generate(11), generate(11), generate(12)
    assert first == again
    assert first != other
    assert make_cases(first[0], 5, 30) == make_cases(again[0], 5, 30)


def test_generator_two_phase_api_takes_the_callers_addresses() -> None:
    node_ips = {"node1": "10.250.0.11", "node2": "10.250.0.12", "node3": "10.250.0.13"}
    cluster = make_cluster(3, node_ips=node_ips, external=["10.250.0.201", "10.250.0.202"])
    assert cluster.node_ips == node_ips
    assert cluster.node_pod_cidrs == {f"node{i}": f"10.244.{i}.0/24" for i in (1, 2, 3)}
    assert all(not p["status"] for p in cluster.pods)
    with pytest.raises(ValueError, match="podIP"):
        make_cases(cluster, 3)
    ipam = {
        f"{p['metadata']['namespace']}/{p['metadata']['name']}": f"10.244.9.{i + 10}"
        for i, p in enumerate(cluster.pods)
    }
    assign_ips(cluster, ipam)
    cases = make_cases(cluster, 3, n=60)
    assert len(cases) == 60
    known = set(ipam.values()) | set(node_ips.values()) | {"10.250.0.201", "10.250.0.202"}
    assert {c.src_ip for c in cases} | {c.dst_ip for c in cases} <= known


def test_generator_balance_and_mix() -> None:
    for seed in range(4):
        cluster, cases = generate(seed)
        assert len(cases) == 200 and len(set(cases)) == 200
        share = sum(c.expected for c in cases) / len(cases)
        assert 0.4 <= share <= 0.6, (seed, share)
        kinds = collections.Counter(case_kind(cluster, c.src_ip, c.dst_ip) for c in cases)
        assert {"pod-pod-cross-node", "pod-pod-same-node", "pod-external", "external-pod", "node-pod"} <= set(
            kinds
        ), kinds
        assert "pod-self" not in kinds
        assert {c.protocol for c in cases} == set(PROTOCOLS)
        declared = {
            (cp["protocol"], cp["containerPort"])
            for p in cluster.pods
            for ct in p["spec"]["containers"]
            for cp in ct["ports"]
        }
        assert sum((c.protocol, c.port) in declared for c in cases) > len(cases) / 3
        for case in cases[:50]:
            assert allowed(cluster, *case[:4]) is case.expected
    _, fewer = generate(1, n_cases=40, allowed_share=0.25)
    assert len(fewer) == 40 and sum(c.expected for c in fewer) == 10


def test_generated_clusters_are_valid_and_use_every_feature() -> None:
    seen: set[str] = set()
    http_numbers_differ = 0
    for seed in range(10):
        cluster = make_cluster(seed)
        validate_cluster(cluster)
        seen |= feature_census(cluster.policies)
        assert (
            2 <= len(cluster.node_ips) <= 3
            and 8 <= len(cluster.pods) <= 12
            and 3 <= len(cluster.policies) <= 6
        )
        for ns in cluster.namespaces:
            assert ns["metadata"]["labels"]["kubernetes.io/metadata.name"] == ns["metadata"]["name"]
        http = {
            cp["containerPort"]
            for p in cluster.pods
            for ct in p["spec"]["containers"]
            for cp in ct["ports"]
            if cp.get("name") == "http"
        }
        http_numbers_differ += len(http) > 1
    assert seen == ALL_FEATURES, ALL_FEATURES - seen
    assert http_numbers_differ >= 8
    # The API's own schema accepts what the generator produces.
    cluster, _ = generate(0)
    for obj in cluster.namespaces + cluster.pods + cluster.policies:
        kubernetes_validate.validate(obj, "1.33.0", strict=True)


def test_describe_names_the_endpoints_and_the_reasons() -> None:
    cluster = world(deny_ingress("prod", on("db")))
    text = describe(cluster, Case(WEB, DB, "TCP", 8080, False))
    assert "prod/web@node1" in text and "prod/db@node2" in text and "expect DENY" in text
    assert "isolated for ingress by prod/np-0" in text
