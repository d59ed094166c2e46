"""Least privilege: what each identity may do in the API, and what each container may do on its node.

The rendered Roles and bindings are folded into the exact set of permissions every ServiceAccount
ends up with; that set must equal the one written down here. An extra verb, resource, wildcard or
binding fails the test, and so does a missing one (the component would not work). The same for
the containers: capabilities, privilege, host namespaces and host paths are pinned.
"""

from __future__ import annotations

import copy
from typing import Any

import celpy
import pytest
from celpy.adapter import json_to_cel

from tests.test_chart import NON_DEFAULT, Obj, container, find, one, pod_spec, render

NS = "kube-system"
READ = frozenset({"get", "list", "watch"})
WRITE_VERBS = {"create", "update", "patch", "delete", "deletecollection", "escalate", "bind", "impersonate"}

# (namespace or "*" for cluster-wide, apiGroup, resource, verb, resourceName or None)
Perm = tuple[str, str, str, str, str | None]


def _perms(
    scope: str, group: str, resource: str, verbs: frozenset[str] | set[str], name: str | None = None
) -> set[Perm]:
    return {(scope, group, resource, verb, name) for verb in verbs}


EXPECTED: dict[str, set[Perm]] = {
    "k-vswitch-agent": (
        _perms("*", "", "pods", READ)
        | _perms("*", "", "namespaces", READ)
        | _perms("*", "", "nodes", READ)
        | _perms("*", "networking.k8s.io", "networkpolicies", READ)
        | _perms("*", "", "services", READ)
        | _perms("*", "discovery.k8s.io", "endpointslices", READ)
        | _perms("*", "kvswitch.io", "vswitchconfigs", READ)
        | _perms("*", "kvswitch.io", "vswitchconfigs/status", {"patch"})
        | _perms("*", "", "events", {"create"})
    ),
    "k-vswitch-controller": (
        _perms("*", "", "nodes", READ)
        | _perms("*", "kvswitch.io", "vswitchconfigs", READ | {"create", "patch", "delete"})
        | _perms("*", "kvswitch.io", "vswitchconfigs/status", {"patch"})
        | _perms("*", "kopf.dev", "clusterkopfpeerings", {"list", "watch"})
        | _perms("*", "kopf.dev", "clusterkopfpeerings", {"get", "patch"}, "k-vswitch-controller")
        | _perms(NS, "", "events", {"create"})
    ),
    "k-vswitch-cleanup": (
        _perms(NS, "apps", "daemonsets", {"get"}, "k-vswitch-cleanup") | _perms(NS, "", "pods", {"list"})
    ),
}


def effective_permissions(objs: list[Obj]) -> dict[str, set[Perm]]:
    """ServiceAccount name -> every permission its bindings give it."""
    roles = {
        (o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o
        for o in objs
        if o["kind"] in ("Role", "ClusterRole")
    }
    result: dict[str, set[Perm]] = {}
    for binding in objs:
        if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        ref = binding["roleRef"]
        role_ns = binding["metadata"].get("namespace") if ref["kind"] == "Role" else None
        role = roles[ref["kind"], role_ns, ref["name"]]
        scope = binding["metadata"]["namespace"] if binding["kind"] == "RoleBinding" else "*"
        for subject in binding["subjects"]:
            assert subject["kind"] == "ServiceAccount", (
                f"{binding['metadata']['name']} binds a {subject['kind']}"
            )
            perms = result.setdefault(subject["name"], set())
            for rule in role.get("rules", []):
                assert "nonResourceURLs" not in rule
                names: list[str | None] = list(rule.get("resourceNames") or [None])
                for group in rule["apiGroups"]:
                    for resource in rule["resources"]:
                        for verb in rule["verbs"]:
                            for name in names:
                                perms.add((scope, group, resource, verb, name))
    return result


def rbac_violations(objs: list[Obj]) -> list[str]:
    got = effective_permissions(objs)
    problems = []
    for sa in sorted(set(got) | set(EXPECTED)):
        extra = got.get(sa, set()) - EXPECTED.get(sa, set())
        missing = EXPECTED.get(sa, set()) - got.get(sa, set())
        problems += [f"{sa} may also {p}" for p in sorted(extra, key=str)]
        problems += [f"{sa} lacks {p}" for p in sorted(missing, key=str)]
    return problems


def _rule(objs: list[Obj], kind: str, name: str, resource: str) -> dict[str, Any]:
    role = one(objs, kind, name)
    rule: dict[str, Any] = next(r for r in role["rules"] if resource in r["resources"])
    return rule


class TestRbac:
    @pytest.mark.parametrize("sets", [(), NON_DEFAULT[:4]])
    def test_every_identity_has_exactly_its_permissions(self, sets: tuple[str, ...]) -> None:
        assert rbac_violations(render(*sets)) == []

    def test_agent_cannot_touch_vswitchconfig_specs(self) -> None:
        agent = effective_permissions(render())["k-vswitch-agent"]
        spec_verbs = {
            verb
            for (_, group, resource, verb, _) in agent
            if (group, resource) == ("kvswitch.io", "vswitchconfigs")
        }
        assert spec_verbs == READ
        status_verbs = {v for (_, g, r, v, _) in agent if (g, r) == ("kvswitch.io", "vswitchconfigs/status")}
        assert status_verbs == {"patch"}

    def test_agent_writes_nothing_but_status_and_events(self) -> None:
        agent = effective_permissions(render())["k-vswitch-agent"]
        writes = {(g, r, v) for (_, g, r, v, _) in agent if v in WRITE_VERBS}
        assert writes == {("kvswitch.io", "vswitchconfigs/status", "patch"), ("", "events", "create")}

    def test_controller_never_writes_nodes(self) -> None:
        controller = effective_permissions(render())["k-vswitch-controller"]
        assert {v for (_, g, r, v, _) in controller if (g, r) == ("", "nodes")} == READ

    def test_no_wildcards_no_secrets_no_update(self) -> None:
        for sa, perms in effective_permissions(render()).items():
            for _, group, resource, verb, _ in perms:
                assert "*" not in (group, resource, verb), f"{sa}: wildcard in {group}/{resource} {verb}"
                assert resource not in ("secrets", "serviceaccounts/token", "pods/exec"), f"{sa}: {resource}"
                assert verb != "update", f"{sa}: kopf only patches, `update` is never needed ({resource})"

    def test_each_workload_runs_as_its_own_account(self) -> None:
        objs = render()
        accounts = {
            w["metadata"]["name"]: pod_spec(w).get("serviceAccountName")
            for w in find(objs, "DaemonSet") + find(objs, "Deployment") + find(objs, "Job")
        }
        assert accounts == {
            "k-vswitch-agent": "k-vswitch-agent",
            "k-vswitch-controller": "k-vswitch-controller",
            "k-vswitch-cleanup": None,  # and no token mounted, below
            "k-vswitch-cleanup-wait": "k-vswitch-cleanup",
        }
        assert pod_spec(one(objs, "DaemonSet", "k-vswitch-cleanup"))["automountServiceAccountToken"] is False


class TestRbacCheckCanFail:
    """The checker itself: every kind of widening the chart could suffer is reported."""

    def test_an_extra_verb_on_vswitchconfig_specs(self) -> None:
        objs = render()
        _rule(objs, "ClusterRole", "k-vswitch-agent", "vswitchconfigs")["verbs"].append("update")
        assert rbac_violations(objs) == [
            "k-vswitch-agent may also ('*', 'kvswitch.io', 'vswitchconfigs', 'update', None)"
        ]

    def test_a_wildcard_resource(self) -> None:
        objs = render()
        _rule(objs, "ClusterRole", "k-vswitch-controller", "nodes")["resources"] = ["*"]
        assert any("may also ('*', '', '*', 'get', None)" in p for p in rbac_violations(objs))

    def test_losing_the_resource_name_on_the_peering(self) -> None:
        objs = render()
        rule = next(
            r for r in one(objs, "ClusterRole", "k-vswitch-controller")["rules"] if "resourceNames" in r
        )
        del rule["resourceNames"]
        assert "k-vswitch-controller may also ('*', 'kopf.dev', 'clusterkopfpeerings', 'patch', None)" in (
            rbac_violations(objs)
        )

    def test_binding_the_agent_to_the_controller_role(self) -> None:
        objs = render()
        binding = copy.deepcopy(one(objs, "ClusterRoleBinding", "k-vswitch-controller"))
        binding["metadata"]["name"] = "sneaky"
        binding["subjects"][0]["name"] = "k-vswitch-agent"
        assert any(p.startswith("k-vswitch-agent may also") for p in rbac_violations([*objs, binding]))

    def test_a_missing_permission(self) -> None:
        objs = render()
        one(objs, "Role", "k-vswitch-controller")["rules"] = []
        assert rbac_violations(objs) == [f"k-vswitch-controller lacks ('{NS}', '', 'events', 'create', None)"]


# --- containers ---------------------------------------------------------------------------------

# container -> (runs as root, capabilities added, host paths with read-only flag)
EXPECTED_CONTAINERS: dict[str, tuple[bool, set[str], dict[str, bool]]] = {
    "k-vswitch-agent/install-cni": (True, set(), {"/opt/cni/bin": False}),
    "k-vswitch-agent/k-vswitchd": (
        True,
        {"NET_ADMIN", "SYS_ADMIN"},
        {
            "/var/run/openvswitch": False,
            "/etc/cni/net.d": False,
            "/var/run/k-vswitch": False,
            "/var/run/netns": True,
            "/opt/cni/bin": True,
            "/var/lib/cni/networks": False,
            "/var/log/kvswitch": False,
        },
    ),
    "k-vswitch-controller/controller": (False, set(), {}),
    "k-vswitch-cleanup/uninstall-cni": (True, set(), {"/opt/cni/bin": False, "/etc/cni/net.d": False}),
    "k-vswitch-cleanup-wait/wait": (False, set(), {}),
}


def container_violations(objs: list[Obj]) -> list[str]:
    problems: list[str] = []
    seen = set()
    for workload in find(objs, "DaemonSet") + find(objs, "Deployment") + find(objs, "Job"):
        spec = pod_spec(workload)
        wname = workload["metadata"]["name"]
        for flag in ("hostPID", "hostIPC"):
            if spec.get(flag):
                problems.append(f"{wname}: {flag}")
        if spec.get("securityContext", {}).get("seccompProfile") != {"type": "RuntimeDefault"}:
            problems.append(f"{wname}: seccomp is not RuntimeDefault")
        host_volumes = {v["name"]: v["hostPath"]["path"] for v in spec.get("volumes", []) if "hostPath" in v}
        for c in spec.get("initContainers", []) + spec["containers"]:
            key = f"{wname}/{c['name']}"
            seen.add(key)
            if key not in EXPECTED_CONTAINERS:
                problems.append(f"{key}: unexpected container")
                continue
            root, caps, paths = EXPECTED_CONTAINERS[key]
            sc = c.get("securityContext", {})
            pod_sc = spec.get("securityContext", {})
            uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
            if root != (uid == 0):
                problems.append(f"{key}: runAsUser {uid}")
            if not root and not pod_sc.get("runAsNonRoot") and not sc.get("runAsNonRoot"):
                problems.append(f"{key}: runAsNonRoot not set")
            if sc.get("privileged") is not False:
                problems.append(f"{key}: privileged not false")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{key}: writable root filesystem")
            if sc.get("capabilities", {}).get("drop") != ["ALL"]:
                problems.append(f"{key}: does not drop ALL capabilities")
            added = set(sc.get("capabilities", {}).get("add", []))
            if added != caps:
                problems.append(f"{key}: capabilities {sorted(added)}")
            # Without SYS_ADMIN nothing stops us from also closing setuid escalation.
            if "SYS_ADMIN" not in added and sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{key}: allowPrivilegeEscalation not false")
            mounted = {
                host_volumes[m["name"]]: bool(m.get("readOnly"))
                for m in c.get("volumeMounts", [])
                if m["name"] in host_volumes
            }
            if mounted != paths:
                problems.append(f"{key}: host paths {mounted}")
    problems += [f"{k}: missing" for k in sorted(set(EXPECTED_CONTAINERS) - seen)]
    return problems


class TestContainers:
    def test_every_container_has_exactly_its_privileges(self) -> None:
        assert container_violations(render()) == []

    def test_only_the_agent_and_node_file_helpers_are_root(self) -> None:
        roots = {k for k, (root, _, _) in EXPECTED_CONTAINERS.items() if root}
        assert roots == {
            "k-vswitch-agent/install-cni",
            "k-vswitch-agent/k-vswitchd",
            "k-vswitch-cleanup/uninstall-cni",
        }

    def test_extra_capabilities_are_added_on_request_only(self) -> None:
        ds = one(render("agent.extraCapabilities={DAC_OVERRIDE}"), "DaemonSet", "k-vswitch-agent")
        caps = container(ds, "k-vswitchd")["securityContext"]["capabilities"]
        assert caps == {"drop": ["ALL"], "add": ["NET_ADMIN", "SYS_ADMIN", "DAC_OVERRIDE"]}

    def test_an_added_capability_is_reported(self) -> None:
        objs = render()
        ds = one(objs, "DaemonSet", "k-vswitch-agent")
        pod_spec(ds)["containers"][0]["securityContext"]["capabilities"]["add"].append("SYS_PTRACE")
        assert container_violations(objs) == [
            "k-vswitch-agent/k-vswitchd: capabilities ['NET_ADMIN', 'SYS_ADMIN', 'SYS_PTRACE']"
        ]

    def test_host_pid_and_a_new_host_path_are_reported(self) -> None:
        objs = render()
        spec = pod_spec(one(objs, "Deployment"))
        spec["hostPID"] = True
        spec["volumes"].append({"name": "root", "hostPath": {"path": "/"}})
        spec["containers"][0]["volumeMounts"].append({"name": "root", "mountPath": "/host"})
        assert container_violations(objs) == [
            "k-vswitch-controller: hostPID",
            "k-vswitch-controller/controller: host paths {'/': False}",
        ]


class TestOwnNodePolicy:
    """The admission policy's CEL, evaluated offline (cel-python) as the API server would."""

    @staticmethod
    def _policy() -> Obj:
        return one(render(), "ValidatingAdmissionPolicy")

    @staticmethod
    def _eval(expression: str, username: str, node: str | None, target: str) -> Any:
        env = celpy.Environment()
        user: dict[str, Any] = {"username": username}
        if node is not None:
            user["extra"] = {"authentication.kubernetes.io/node-name": [node]}
        activation = {
            "request": json_to_cel({"userInfo": user}),
            "object": json_to_cel({"metadata": {"name": target}}),
        }
        return env.program(env.compile(expression)).evaluate(activation)

    AGENT = f"system:serviceaccount:{NS}:k-vswitch-agent"

    def test_it_applies_to_the_agents_status_writes_only(self) -> None:
        policy = self._policy()
        rules = policy["spec"]["matchConstraints"]["resourceRules"]
        assert rules == [
            {
                "apiGroups": ["kvswitch.io"],
                "apiVersions": ["*"],
                "operations": ["UPDATE"],
                "resources": ["vswitchconfigs/status"],
            }
        ]
        condition = policy["spec"]["matchConditions"][0]["expression"]
        assert bool(self._eval(condition, self.AGENT, "node-a", "node-a"))
        assert not self._eval(condition, f"system:serviceaccount:{NS}:k-vswitch-controller", None, "node-a")

    @pytest.mark.parametrize(
        ("node", "target", "allowed"),
        [("node-a", "node-a", True), ("node-a", "node-b", False), (None, "node-b", True)],
    )
    def test_an_agent_may_write_its_own_nodes_status_only(
        self, node: str | None, target: str, allowed: bool
    ) -> None:
        validation = self._policy()["spec"]["validations"][0]
        assert bool(self._eval(validation["expression"], self.AGENT, node, target)) is allowed
        if not allowed:
            message = self._eval(validation["messageExpression"], self.AGENT, node, target)
            expected = f"k-vswitchd on node {node} may write the status of its own VSwitchConfig only"
            assert message == f"{expected}, not of {target}"

    def test_the_binding_denies(self) -> None:
        objs = render()
        binding = one(objs, "ValidatingAdmissionPolicyBinding")
        assert binding["spec"] == {
            "policyName": one(objs, "ValidatingAdmissionPolicy")["metadata"]["name"],
            "validationActions": ["Deny"],
        }
