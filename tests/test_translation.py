"""Pure logic, no root: VSwitchConfig validation, controller field ownership, pipeline flow text."""

from __future__ import annotations

from typing import Any

import pytest

from kvswitch.config import ControllerSettings, InvalidConfig, OverlayType, parse_spec
from kvswitch.datapath import LocalPod, RemoteNode, node_flows, pod_flows, remote_node_flows
from kvswitch.handlers.controller import NodeNotReady, desired_spec, node_overlay_ip, spec_patch
from kvswitch.ovs.flows import Canonicalizer
from kvswitch.ovs.pipeline import GATEWAY_OFPORT, TUNNEL_OFPORT, Table
from kvswitch.status import merge_condition, ready_condition

GOOD = {
    "clusterCIDR": "10.244.0.0/16",
    "podCIDR": "10.244.1.0/24",
    "serviceCIDR": "10.96.0.0/12",
    "overlayType": "vxlan",
    "overlayIP": "10.250.0.11",
}


class TestVSwitchConfigSpec:
    def test_valid_spec_and_derived_values(self) -> None:
        spec = parse_spec(GOOD)
        assert spec.gateway_ip == "10.244.1.1"
        assert spec.pod_mtu(1500) == 1450
        assert parse_spec({**GOOD, "overlayType": "gre"}).pod_mtu(1500) == 1458
        assert parse_spec({**GOOD, "mtu": 1400}).pod_mtu(9000) == 1400
        assert spec.to_api() == GOOD

    @pytest.mark.parametrize(
        ("change", "reason"),
        [
            ({"clusterCIDR": "10.244.0.0/33"}, "clusterCIDR"),
            ({"clusterCIDR": "10.244.0.1/16"}, "host bits"),
            ({"podCIDR": "10.245.1.0/24"}, "not inside clusterCIDR"),
            ({"podCIDR": "10.244.1.0/31"}, "too small"),
            ({"serviceCIDR": "fd00::/108"}, "IPv4"),
            ({"overlayType": "ipip"}, "overlayType"),
            ({"overlayIP": "10.250.0"}, "overlayIP"),
            ({"overlayIP": "256.1.1.1"}, "overlayIP"),
            ({"mtu": 100}, "mtu"),
            ({"bogus": 1}, "bogus"),
        ],
    )
    def test_invalid_specs_are_refused_with_the_field_named(
        self, change: dict[str, Any], reason: str
    ) -> None:
        with pytest.raises(InvalidConfig, match=reason):
            parse_spec({**GOOD, **change})

    def test_missing_spec(self) -> None:
        with pytest.raises(InvalidConfig):
            parse_spec(None)


def _node(
    pod_cidr: str | None = "10.244.3.0/24", addresses: list[dict[str, str]] | None = None
) -> dict[str, Any]:
    return {
        "metadata": {"name": "n3", "uid": "u3"},
        "spec": {"podCIDR": pod_cidr} if pod_cidr else {},
        "status": {
            "addresses": addresses
            if addresses is not None
            else [
                {"type": "Hostname", "address": "n3"},
                {"type": "ExternalIP", "address": "192.0.2.3"},
                {"type": "InternalIP", "address": "10.250.0.13"},
            ]
        },
    }


class TestController:
    def test_spec_from_node_and_settings(self) -> None:
        settings = ControllerSettings(overlay_type=OverlayType.GRE, mtu=1400)
        spec = desired_spec(_node(), settings)
        assert spec == {
            "clusterCIDR": "10.244.0.0/16",
            "podCIDR": "10.244.3.0/24",
            "serviceCIDR": "10.96.0.0/12",
            "overlayType": "gre",
            "overlayIP": "10.250.0.13",
            "serviceProxy": "openflow",
            "mtu": 1400,
        }
        parse_spec(spec)  # what the controller writes passes the agent's validation

    def test_overlay_ip_prefers_internal_then_external(self) -> None:
        assert node_overlay_ip(_node()) == "10.250.0.13"
        assert (
            node_overlay_ip(_node(addresses=[{"type": "ExternalIP", "address": "192.0.2.3"}])) == "192.0.2.3"
        )
        assert node_overlay_ip(_node(addresses=[{"type": "InternalIP", "address": "fd00::3"}])) is None

    def test_node_without_pod_cidr_or_address_is_not_ready(self) -> None:
        with pytest.raises(NodeNotReady, match="podCIDR"):
            desired_spec(_node(pod_cidr=None), ControllerSettings())
        with pytest.raises(NodeNotReady, match="InternalIP"):
            desired_spec(_node(addresses=[]), ControllerSettings())

    def test_settings_changes_propagate_but_user_edits_of_tunables_stay(self) -> None:
        last = dict(GOOD)
        desired = {**GOOD, "overlayType": "gre", "serviceCIDR": "10.97.0.0/16"}
        # untouched object: both changes go through
        patch, owned = spec_patch(dict(GOOD), last, desired)
        assert patch == {"overlayType": "gre", "serviceCIDR": "10.97.0.0/16"} and owned == desired
        # the user chose geneve and an MTU: the controller's overlay change does not revert them
        current = {**GOOD, "overlayType": "geneve", "mtu": 1300}
        patch, owned = spec_patch(current, last, desired)
        assert patch == {"serviceCIDR": "10.97.0.0/16"}
        assert owned["overlayType"] == "vxlan" and "mtu" not in owned
        # a controller-owned field edited by hand is put back
        patch, _ = spec_patch({**GOOD, "podCIDR": "10.244.9.0/24"}, last, GOOD)
        assert patch == {"podCIDR": "10.244.1.0/24"}

    def test_settings_mtu_removed_is_removed_unless_user_set(self) -> None:
        last = {**GOOD, "mtu": 1400}
        patch, owned = spec_patch({**GOOD, "mtu": 1400}, last, dict(GOOD))
        assert patch == {"mtu": None} and "mtu" not in owned


class TestConditions:
    def test_unchanged_condition_is_not_rewritten(self) -> None:
        first = merge_condition(None, ready_condition(True, "Applied", "ok", 1))
        assert first is not None and first[0]["status"] == "True" and "lastTransitionTime" in first[0]
        assert merge_condition(first, ready_condition(True, "Applied", "ok", 1)) is None
        second = merge_condition(first, ready_condition(True, "Applied", "ok", 2))
        assert second is not None and second[0]["lastTransitionTime"] == first[0]["lastTransitionTime"]
        third = merge_condition(second, ready_condition(False, "InvalidSpec", "bad", 3))
        assert third is not None and third[0]["status"] == "False"


class TestPipelineFlows:
    def _all(self) -> list[Any]:
        spec = parse_spec(GOOD)
        pod = LocalPod("veth1", 3, "10.244.1.5", "0a:58:0a:f4:01:05")
        return (
            node_flows(spec, GATEWAY_OFPORT, TUNNEL_OFPORT)
            + pod_flows(pod)
            + remote_node_flows(RemoteNode("n2", "10.244.2.0/24", "10.250.0.12"), TUNNEL_OFPORT)
        )

    def test_flows_are_written_in_ovs_canonical_form(self) -> None:
        """Then a full resync compares strings without asking ovs-ofctl (see the flows benchmark)."""
        flows = self._all()
        canon = Canonicalizer().canonical(flows)
        for f in flows:
            assert canon[(f.table, f.priority, f.match, f.actions)] == (f.match, f.actions)

    def test_keys_are_unique_and_every_table_has_a_default(self) -> None:
        flows = self._all()
        assert len({f.key for f in flows}) == len(flows)
        tables = {f.table for f in flows}
        for table in tables:
            assert any(f.table == table and f.priority == 0 and f.match == "" for f in flows), Table(table)

    def test_pod_spoof_guard_pins_ip_and_mac(self) -> None:
        guard = [
            f
            for f in pod_flows(LocalPod("v", 7, "10.244.1.9", "0a:58:0a:f4:01:09"))
            if f.table == Table.SPOOF_GUARD
        ]
        assert all("in_port=7" in f.match and "dl_src=0a:58:0a:f4:01:09" in f.match for f in guard)
        assert any("nw_src=10.244.1.9" in f.match for f in guard)
        assert any("arp_spa=10.244.1.9" in f.match and "arp_op=1" in f.match for f in guard)


Event = tuple[str, str, "dict[str, Any] | None"]  # (kind, key, object or None for a delete)


class _RandomCluster:
    """A generated cluster (tests/policy_reference.py) and random API events on it: pods created,
    relabelled, readdressed, re-ported, moved between nodes and deleted; namespaces relabelled,
    created and deleted; policies created, rewritten and deleted (with policies of other seeds)."""

    def __init__(self, seed: int) -> None:
        import copy
        import random

        from tests import policy_reference as ref

        self.ref = ref
        cluster = ref.generate(seed, n_cases=1)[0]
        self.rng = random.Random(seed)
        self.nodes = sorted(cluster.node_ips)
        self.pods = {ref.pod_key(p): p for p in cluster.pods}
        self.nss = {n["metadata"]["name"]: n for n in cluster.namespaces}
        self.pols = {f"{p['metadata']['namespace']}/{p['metadata']['name']}": p for p in cluster.policies}
        for i, p in enumerate(self.pols.values()):  # the audit log changes the flows' actions
            if i % 3 == 0:
                p["metadata"]["annotations"] = {"kvswitch.io/log": "true"}
        self.donors = [
            copy.deepcopy(p) for s in (seed + 100, seed + 200) for p in ref.generate(s, n_cases=1)[0].policies
        ]
        self.serial = 0

    def _labels(self, vocab: dict[str, tuple[str, ...]]) -> dict[str, str]:
        return {k: self.rng.choice(v) for k, v in vocab.items() if self.rng.random() < 0.6}

    def _ports(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for name, proto, numbers, _ in self.ref.PORT_TEMPLATES:
            if self.rng.random() < 0.4:
                out.append(
                    {
                        "containerPort": self.rng.choice(numbers),
                        "protocol": proto,
                        **({"name": name} if name else {}),
                    }
                )
        return out

    def _ip(self) -> str:
        return f"10.244.{self.rng.choice([1, 2, 3, 9])}.{self.rng.randrange(2, 40)}"  # collisions happen

    def events(self) -> list[Event]:
        """One random edit of the cluster, as the API events it causes."""
        rng = self.rng
        what = rng.choice(
            ["pod-labels", "pod-labels", "pod-ip", "pod-gone", "pod-new", "pod-move", "pod-ports",
             "ns-labels", "ns-labels", "ns-gone", "ns-new", "policy-gone", "policy-new", "policy-change"]
        )  # fmt: skip
        self.serial += 1
        if what == "pod-new" or (what.startswith("pod") and not self.pods):
            ns = rng.choice(sorted(self.nss) or ["ns-x"])
            pod = {
                "metadata": {
                    "name": f"new-{self.serial}",
                    "namespace": ns,
                    "labels": self._labels(self.ref.POD_LABEL_VOCAB),
                },
                "spec": {
                    "nodeName": rng.choice(self.nodes),
                    "containers": [{"name": "c", "ports": self._ports()}],
                },
                "status": {"podIP": self._ip()} if rng.random() < 0.9 else {},
            }
            key = self.ref.pod_key(pod)
            self.pods[key] = pod
            return [("pod", key, pod)]
        if what.startswith("pod"):
            key = rng.choice(sorted(self.pods))
            pod = self.pods[key]
            if what == "pod-gone":
                del self.pods[key]
                return [("pod", key, None)]
            if what == "pod-labels":
                pod["metadata"]["labels"] = self._labels(self.ref.POD_LABEL_VOCAB)
            elif what == "pod-ip":
                pod["status"] = {"podIP": self._ip()} if rng.random() < 0.9 else {}
            elif what == "pod-move":
                pod["spec"]["nodeName"] = rng.choice(self.nodes)
            else:
                pod["spec"]["containers"] = [{"name": "c", "ports": self._ports()}]
            return [("pod", key, pod)]
        if what == "ns-new" or (what.startswith("ns") and not self.nss):
            name = rng.choice(["ns-a", "ns-b", "ns-c", "ns-d", f"ns-{self.serial}"])
            ns = {"metadata": {"name": name, "labels": self._labels(self.ref.NS_LABEL_VOCAB)}}
            self.nss[name] = ns
            return [("ns", name, ns)]
        if what.startswith("ns"):
            name = rng.choice(sorted(self.nss))
            if what == "ns-gone":
                del self.nss[name]
                return [("ns", name, None)]
            self.nss[name]["metadata"]["labels"] = {
                **self._labels(self.ref.NS_LABEL_VOCAB),
                "kubernetes.io/metadata.name": name,
            }
            return [("ns", name, self.nss[name])]
        if what == "policy-gone" and self.pols:
            key = rng.choice(sorted(self.pols))
            del self.pols[key]
            return [("policy", key, None)]
        import copy

        donor = copy.deepcopy(rng.choice(self.donors))
        if what == "policy-change" and self.pols:
            key = rng.choice(sorted(self.pols))
            ns, _, name = key.partition("/")
        else:
            ns, name = rng.choice(sorted(self.nss) or ["ns-a"]), f"np-new-{self.serial}"
            key = f"{ns}/{name}"
        donor["metadata"] = {"name": name, "namespace": ns}
        if rng.random() < 0.3:
            donor["metadata"]["annotations"] = {"kvswitch.io/log": "true"}
        self.pols[key] = donor
        return [("policy", key, donor)]

    def fresh(self) -> Any:
        from kvswitch.policy.compute import PolicyState
        from kvswitch.policy.model import NamespaceInfo, PodInfo, Policy

        return PolicyState.build(
            [PodInfo.parse(p) for p in self.pods.values()],
            [NamespaceInfo.parse(n) for n in self.nss.values()],
            [Policy.parse(p) for p in self.pols.values()],
        )


class TestIncrementalPolicyState:
    """Updating the indexes, selections, cached policies and rendered flows in place must give
    exactly what a fresh computation gives."""

    @staticmethod
    def _clauses(state: Any) -> set[Any]:
        result = state.compute()
        return {(c.key, c.targets, c.peers, c.ports) for c in result.clauses} | {
            ("iso-in", frozenset(result.ingress_isolated)),
            ("iso-out", frozenset(result.egress_isolated)),
        }

    @pytest.mark.parametrize("seed", range(12))
    def test_random_edits_match_a_fresh_build(self, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
        from kvswitch.policy import compute
        from kvswitch.policy.model import NamespaceInfo, PodInfo, Policy

        if seed % 2:  # namespaces indexed by label (the big ones in a real cluster), as they grow and shrink
            monkeypatch.setattr(compute, "LABEL_INDEX_MIN", 3)

        cluster = _RandomCluster(seed)
        state = cluster.fresh()
        state.compute()  # warm every memo and cache, so stale ones would show
        for step in range(60):
            events = cluster.events()
            for kind, key, obj in events:
                if kind == "pod":
                    state.set_pod(key, None if obj is None else PodInfo.parse(obj))
                elif kind == "ns":
                    state.set_namespace(key, None if obj is None else NamespaceInfo.parse(obj))
                else:
                    state.set_policy(key, None if obj is None else Policy.parse(obj))
            assert self._clauses(state) == self._clauses(cluster.fresh()), f"step {step}: {events}"

    @pytest.mark.parametrize("seed", range(16))
    def test_random_edits_give_the_flows_of_a_fresh_computation(
        self, seed: int, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The agent's path (PolicyInputs: cached policies, per-clause rendering, flow buckets
        handed to the reconciler and confirmed) against policy_flows() over a fresh PolicyState,
        byte for byte (with the same conjunction ids), after batches of 1-4 random events."""
        from kvswitch.node.policy import PolicyInputs
        from kvswitch.ovs.flows import Flow
        from kvswitch.ovs.pipeline import Owner
        from kvswitch.policy import compute
        from kvswitch.policy.flows import policy_flows
        from kvswitch.policy.model import NamespaceInfo, PodInfo, Policy

        if seed % 2:
            monkeypatch.setattr(compute, "LABEL_INDEX_MIN", 3)
        cluster = _RandomCluster(seed)
        node = cluster.nodes[seed % len(cluster.nodes)]
        inputs = PolicyInputs(node, lambda: [])
        inputs.replace(
            [PodInfo.parse(p) for p in cluster.pods.values()],
            [NamespaceInfo.parse(n) for n in cluster.nss.values()],
            [Policy.parse(p) for p in cluster.pols.values()],
        )
        installed: dict[Owner, list[Flow]] = {}

        def install() -> list[str]:
            installed.update(inputs.flow_changes())
            inputs.installed()
            return sorted(f.render() for flows in installed.values() for f in flows)

        def expected() -> list[str]:
            state = cluster.fresh()
            local = [PodInfo.parse(p) for p in cluster.pods.values() if p["spec"]["nodeName"] == node]
            result = state.compute(namespaces={p.namespace for p in local})
            ids = inputs.table.ids.copy()  # a fresh build assigns ids from scratch: compare with ours
            return sorted(f.render() for f in policy_flows(result, local, ids))

        assert install() == expected()
        assert inputs.flow_changes() == {}, "nothing happened, nothing to send"
        for step in range(60):
            events = [e for _ in range(cluster.rng.randint(1, 4)) for e in cluster.events()]
            for kind, key, obj in events:
                if kind == "pod":
                    inputs.set_pod(key, None if obj is None else PodInfo.parse(obj))
                elif kind == "ns":
                    inputs.set_namespace(key, None if obj is None else NamespaceInfo.parse(obj))
                else:
                    inputs.set_policy(key, None if obj is None else Policy.parse(obj))
            got, want = install(), expected()
            assert got == want, (
                f"step {step}: {events}\n-{sorted(set(want) - set(got))}\n+{sorted(set(got) - set(want))}"
            )
