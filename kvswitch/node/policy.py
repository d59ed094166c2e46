"""The node's NetworkPolicy inputs: every pod, namespace and policy of the cluster as the API reports
them, kept incrementally, and the policy flows of this node's pods computed from them."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import cast

from kvswitch import metrics
from kvswitch.datapath import LocalPod
from kvswitch.ovs.flows import Flow
from kvswitch.ovs.pipeline import Owner
from kvswitch.policy.compute import PolicyState, paused_gc
from kvswitch.policy.flows import ConjIds, NodePolicyFlows
from kvswitch.policy.model import NamespaceInfo, PodInfo, Policy

CACHE_FORMAT = "k-vswitch policy inputs 1"  # a snapshot's first element; another value: not ours


class PolicyInputs:
    """``node_name`` tells which pods are local; ``local_pods`` gives the attachments the CNI made
    here (their IPs stand in for the API's until the API knows them)."""

    def __init__(self, node_name: str, local_pods: Callable[[], list[LocalPod]]) -> None:
        self.node_name = node_name
        self._local_pods = local_pods
        self.state = PolicyState()
        self.table = NodePolicyFlows(self.state)  # this node's flows, kept per event
        self._api_pods: dict[str, PodInfo] = {}  # every pod of the cluster, by namespace/name
        self._local_keys: set[str] = set()

    def set_pod(self, key: str, pod: PodInfo | None) -> None:
        if pod is None:
            self._api_pods.pop(key, None)
        else:
            self._api_pods[key] = pod
        if pod is not None and pod.node == self.node_name:
            self._local_keys.add(key)
        else:
            self._local_keys.discard(key)
        self.state.set_pod(key, self._effective(key))

    def knows(self, key: str) -> bool:
        """The API has told us about pod ``key`` (namespace/name)."""
        return key in self._api_pods

    def set_namespace(self, name: str, ns: NamespaceInfo | None) -> None:
        self.state.set_namespace(name, ns)

    def set_policy(self, key: str, policy: Policy | None) -> None:
        self.state.set_policy(key, policy)

    def replace(self, pods: list[PodInfo], namespaces: list[NamespaceInfo], policies: list[Policy]) -> None:
        """Start over from a full listing (agent start-up, tests)."""
        with paused_gc():
            self._api_pods = {p.key: p for p in pods}
            self._local_keys = {p.key for p in pods if p.node == self.node_name}
            effective = [e for k in self._api_pods if (e := self._effective(k)) is not None]
        self.state = PolicyState.build(effective, namespaces, policies)
        ids = self.table.ids
        self.table = NodePolicyFlows(self.state)  # sends every bucket: what was installed is replaced
        self.table.ids = ids  # (clauses keep their conjunction ids: unchanged flows stay unchanged)

    def snapshot(self) -> tuple[object, ...]:
        """This node's inputs and conjunction ids, for the warm-start cache (kvswitch.node.agent):
        copied containers of immutable model objects, so pickling them in a thread is safe."""
        s = self.state
        return (
            CACHE_FORMAT,
            self.node_name,
            list(self._api_pods.values()),
            list(s.namespaces.values()),
            list(s.policies.values()),
            self.table.ids.copy(),
        )

    def restore(self, snapshot: tuple[object, ...]) -> bool:
        """Start over from a :meth:`snapshot` of this node's agent (False: not one, nothing done).
        The conjunction ids come back too, so the same inputs give the same flows, byte for byte."""
        if len(snapshot) != 6 or snapshot[0] != CACHE_FORMAT or snapshot[1] != self.node_name:
            return False
        _, _, pods, namespaces, policies, ids = snapshot
        if not isinstance(ids, ConjIds):
            return False
        self.replace(
            cast(list[PodInfo], pods), cast(list[NamespaceInfo], namespaces), cast(list[Policy], policies)
        )
        self.table.ids = ids
        return True

    def _effective(self, key: str) -> PodInfo | None:
        """The API's pod, with the IP the CNI recorded while the API does not know it yet."""
        pod = self._api_pods.get(key)
        if pod is None or pod.ip or key not in self._local_keys:
            return pod
        ip = next((p.ip for p in self._local_pods() if f"{p.namespace}/{p.name}" == key), None)
        return pod if ip is None else dataclasses.replace(pod, ip=ip)

    def flow_changes(self) -> dict[Owner, list[Flow]]:
        """The policy flows of this node's pods (for the policies of their namespaces only) that
        changed since :meth:`installed` was last called: the full desired flows of each owner
        (a bucket of the flow keys) whose flows changed. Recomputes only what the events since
        touched. Returned again until :meth:`installed` confirms them."""
        with metrics.POLICY_COMPUTATION.time():
            for key in self._local_keys:
                pod = self._effective(key)
                if pod != self.state.pods.get(key):
                    self.state.set_pod(key, pod)
            self.table.update(p for k in self._local_keys if (p := self.state.pods.get(k)) is not None)
            return self.table.pending()

    def installed(self) -> None:
        """What :meth:`flow_changes` last returned is in OVS."""
        self.table.confirm()

    def flows(self) -> list[Flow]:
        """Every policy flow of this node, brought up to date."""
        self.flow_changes()
        return self.table.flows()
