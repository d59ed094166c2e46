"""The Helm chart: lint, render with default and other values, validate every object offline.

Built-in objects are checked against the Kubernetes OpenAPI schemas (``kubernetes-validate
--strict``) for the oldest and the newest version we have schemas for; custom resources against
their CRD's openAPIV3Schema. Bad values must fail ``helm install`` with a message naming the value.
Helpers here are shared by the other tests/test_chart*.py and tests/test_crd*.py files.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from kvswitch import metrics
from kvswitch.config import AgentSettings, ControllerSettings

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "k-vswitch"
CRDS = ROOT / "crds"
TOOLS_BIN = ROOT / ".tools" / "bin"
# The oldest schemas kubernetes-validate ships, and the version of our helm/kubectl.
KUBE_VERSIONS = ("1.25.0", "1.35.0")
RELEASE = "k-vswitch"
WORKLOADS = {"DaemonSet": "k-vswitch-agent", "Deployment": "k-vswitch-controller"}

Obj = dict[str, Any]


# --- helm ---------------------------------------------------------------------------------------


@functools.cache
def tool(name: str) -> Path:
    """.tools/bin/helm or kubectl, fetched by scripts/fetch-helm.sh when missing (a fresh clone, CI)."""
    path = TOOLS_BIN / name
    if not path.exists():
        subprocess.run([str(ROOT / "scripts" / "fetch-helm.sh")], check=True, timeout=300)
    return path


def helm_binary() -> Path:
    return tool("helm")


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(helm_binary()), *args], capture_output=True, text=True, timeout=60, check=False
    )


@functools.cache
def _render(sets: tuple[str, ...], namespace: str, kube_version: str | None) -> str:
    args = ["template", RELEASE, str(CHART), "--namespace", namespace, "--include-crds"]
    if kube_version:
        args += ["--kube-version", kube_version]
    for s in sets:
        args += ["--set", s]
    proc = helm(*args)
    if proc.returncode != 0:
        raise AssertionError(f"helm template {' '.join(sets)} failed:\n{proc.stderr}")
    return proc.stdout


def render(*sets: str, namespace: str = "kube-system", kube_version: str | None = None) -> list[Obj]:
    """The rendered objects (CRDs and hooks included); a fresh copy, safe to mutate."""
    text = _render(tuple(sets), namespace, kube_version)
    return [doc for doc in yaml.safe_load_all(text) if doc]


def render_fails(*sets: str) -> str:
    """stderr of a render that must fail."""
    args = ["template", RELEASE, str(CHART)]
    for s in sets:
        args += ["--set", s]
    proc = helm(*args)
    assert proc.returncode != 0, f"helm accepted {sets}"
    return proc.stderr


def find(objs: list[Obj], kind: str, name: str | None = None) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objs: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = find(objs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_spec(workload: Obj) -> Obj:
    spec: Obj = workload["spec"]["template"]["spec"]
    return spec


def container(workload: Obj, name: str) -> Obj:
    spec = pod_spec(workload)
    for c in spec.get("initContainers", []) + spec["containers"]:
        if c["name"] == name:
            return dict(c)
    raise AssertionError(f"no container {name} in {workload['metadata']['name']}")


def plain_env(c: Obj) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


# --- validation against CRD schemas ---------------------------------------------------------------


def load_yaml(path: Path) -> Obj:
    doc: Obj = yaml.safe_load(path.read_text())
    return doc


def _go_pattern(
    validator: Any, pattern: str, instance: Any, schema: Obj
) -> Iterator[jsonschema.ValidationError]:
    # The API server matches patterns with Go's regexp, where `$` is the end of the text; Python's
    # `$` also matches before a final newline, which would let "10.0.0.1\n" through here.
    if isinstance(instance, str) and not re.search(re.sub(r"(?<!\\)\$", r"\\Z", pattern), instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


_K8sValidator = jsonschema.validators.extend(  # type: ignore[no-untyped-call]
    jsonschema.Draft7Validator, {"pattern": _go_pattern}
)


def _strict(schema: Obj, root: bool = False) -> Obj:
    """The schema as kubectl's strict field validation sees it: unknown fields are errors."""
    out = copy.deepcopy(schema)
    if root:
        out.setdefault("properties", {})
        for implicit in ("apiVersion", "kind", "metadata"):
            out["properties"].setdefault(implicit, {"type": "object" if implicit == "metadata" else "string"})
    if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["properties"] = {k: _strict(v) for k, v in out["properties"].items()}
        out.setdefault("additionalProperties", False)
    if isinstance(out.get("items"), dict):
        out["items"] = _strict(out["items"])
    return out


def crd_validator(crd: Obj, version: str | None = None) -> Callable[[Obj], list[str]]:
    """Validates custom resources of ``crd``; returns the dotted paths of the errors."""
    versions = crd["spec"]["versions"]
    served = next(v for v in versions if version in (None, v["name"]))
    validator = _K8sValidator(_strict(served["schema"]["openAPIV3Schema"], root=True))

    def errors(obj: Obj) -> list[str]:
        return sorted(
            ".".join(str(p) for p in e.absolute_path) or "(root)" for e in validator.iter_errors(obj)
        )

    return errors


def kube_errors(objs: list[Obj], kube_version: str) -> list[str]:
    """Strict schema errors of every object: built-ins by kubernetes-validate, CRs by their CRD."""
    crds = {
        (c["spec"]["group"], c["spec"]["names"]["kind"]): c
        for c in objs
        if c["kind"] == "CustomResourceDefinition"
    }
    problems = []
    for obj in objs:
        group = obj["apiVersion"].rpartition("/")[0]
        label = f"{obj['kind']}/{obj['metadata'].get('name')}"
        if (group, obj["kind"]) in crds:
            problems += [f"{label}: {p}" for p in crd_validator(crds[group, obj["kind"]])(obj)]
            continue
        try:
            kubernetes_validate.validate(obj, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{label}: {'.'.join(str(p) for p in exc.absolute_path)}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{label}: no schema for {obj['apiVersion']} in Kubernetes {kube_version}")
    return problems


# --- tests --------------------------------------------------------------------------------------

# Every value changed at once, to catch templates that only work with the defaults.
NON_DEFAULT = (
    "clusterCIDR=172.16.0.0/12",
    "serviceCIDR=10.43.0.0/16",
    "overlayType=gre",
    "mtu=1400",
    "logLevel=debug",
    "image.repository=registry.example/k-vswitch",
    "image.tag=dev",
    "image.pullPolicy=Always",
    "imagePullSecrets[0].name=regcred",
    "apiServer.host=192.0.2.10",
    "apiServer.port=6443",
    "hostPaths.cniBinDir=/var/lib/rancher/k3s/data/cni",
    "hostPaths.cniConfDir=/var/lib/rancher/k3s/agent/etc/cni/net.d",
    "agent.probePort=19450",
    "agent.maxUnavailable=10%",
    "agent.extraCapabilities={DAC_OVERRIDE}",
    "agent.tolerations=null",
    "controller.probePort=19451",
    "controller.priorityClassName=",
    "cleanup.timeoutSeconds=60",
    "metrics.agentPort=19465",
    "metrics.controllerPort=19466",
    "metrics.podAnnotations=false",
    "telemetry.sflow.collector=192.0.2.50:6343",
    "telemetry.sflow.sampling=128",
)
RENDERINGS = {
    "defaults": ((), "kube-system", None),
    "non-default": (NON_DEFAULT, "k-vswitch", None),
    "cleanup-off-k8s-1.29": (("cleanup.enabled=false", "agent.ownNodeStatusOnly=false"), "net", "1.29.0"),
}


class TestLint:
    def test_lint_strict_passes_with_defaults(self) -> None:
        proc = helm("lint", "--strict", str(CHART))
        assert proc.returncode == 0, proc.stdout + proc.stderr

    def test_lint_strict_passes_with_every_value_changed(self) -> None:
        args = ["lint", "--strict", str(CHART), "--namespace", "k-vswitch"]
        for s in NON_DEFAULT:
            args += ["--set", s]
        proc = helm(*args)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    def test_lint_fails_on_a_broken_template(self, tmp_path: Path) -> None:
        broken = tmp_path / "k-vswitch"
        subprocess.run(["cp", "-r", str(CHART), str(broken)], check=True)
        (broken / "templates" / "broken.yaml").write_text(
            "kind: ConfigMap\nmetadata: {{ .Values.nope.nope }}\n"
        )
        assert helm("lint", "--strict", str(broken)).returncode != 0


class TestRenderedObjectsValidate:
    @pytest.mark.parametrize("rendering", RENDERINGS)
    @pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
    def test_every_object_passes_strict_schema_validation(self, rendering: str, kube_version: str) -> None:
        sets, namespace, chart_kube = RENDERINGS[rendering]
        # Rendered for that cluster version, as `helm install` would (it renders for the server's).
        objs = render(*sets, namespace=namespace, kube_version=chart_kube or kube_version)
        assert len(objs) > 10
        assert kube_errors(objs, kube_version) == []

    def test_validation_catches_a_misspelled_field(self) -> None:
        objs = render()
        ds = one(objs, "DaemonSet", "k-vswitch-agent")
        pod_spec(ds)["hostNetwrok"] = True
        assert any("hostNetwrok" in p for p in kube_errors([ds], KUBE_VERSIONS[-1]))

    def test_validation_catches_a_bad_custom_resource(self) -> None:
        objs = render()
        peering = one(objs, "ClusterKopfPeering")
        peering["spec"] = {"x": 1}
        crds = find(objs, "CustomResourceDefinition")
        assert kube_errors([*crds, peering], KUBE_VERSIONS[-1]) != []

    def test_the_crds_are_rendered_from_the_chart(self) -> None:
        names = {c["metadata"]["name"] for c in find(render(), "CustomResourceDefinition")}
        assert names == {"vswitchconfigs.kvswitch.io", "clusterkopfpeerings.kopf.dev"}

    def test_objects_land_in_the_release_namespace(self) -> None:
        for obj in render(*NON_DEFAULT, namespace="k-vswitch"):
            if "namespace" in obj["metadata"]:
                assert obj["metadata"]["namespace"] == "k-vswitch", obj["metadata"]["name"]


class TestValuesAreCheckedAtInstall:
    """Each bad value fails `helm install` (same checks as `helm template`) naming what is wrong."""

    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            ("clusterCIDR=10.244.0.0/33", "'/clusterCIDR': '10.244.0.0/33' does not match"),
            ("clusterCIDR=10.256.0.0/16", "'/clusterCIDR': '10.256.0.0/16' does not match"),
            ("clusterCIDR=10.244.0.0", "'/clusterCIDR': '10.244.0.0' does not match"),
            ("serviceCIDR=fd00::/108", "'/serviceCIDR': 'fd00::/108' does not match"),
            ("serviceCIDR=010.96.0.0/12", "'/serviceCIDR': '010.96.0.0/12' does not match"),
            ("overlayType=ipip", "'/overlayType': value must be one of 'vxlan', 'gre', 'geneve'"),
            ("overlayType=VXLAN", "'/overlayType': value must be one of"),
            ("mtu=575", "'/mtu': minimum: got 575, want 576"),
            ("mtu=9217", "'/mtu': maximum: got 9,217, want 9,216"),
            ("logLevel=verbose", "'/logLevel': value must be one of"),
            ("clusterCidr=10.0.0.0/8", "additional properties 'clusterCidr' not allowed"),
            ("agent.probePort=80", "'/agent/probePort': minimum: got 80, want 1,024"),
            ("agent.extraCapabilities={ALL}", "'/agent/extraCapabilities/0': value must be one of"),
            ("agent.maxUnavailable=0", "'/agent/maxUnavailable'"),
            ("image.pullPolicy=Sometimes", "'/image/pullPolicy': value must be one of"),
            ("hostPaths.cniBinDir=opt/cni/bin", "'/hostPaths/cniBinDir': 'opt/cni/bin' does not match"),
            ("metrics.agentPort=80", "'/metrics/agentPort': minimum: got 80, want 1,024"),
            (
                "metrics.serviceMonitor.interval=30sec",
                "'/metrics/serviceMonitor/interval': '30sec' does not match",
            ),
        ],
    )
    def test_schema_rejects(self, value: str, expected: str) -> None:
        stderr = render_fails(value)
        assert "values don't meet the specifications of the schema" in stderr
        assert expected in stderr, stderr

    @pytest.mark.parametrize(
        ("values", "expected"),
        [
            (
                ("clusterCIDR=10.244.1.0/16",),
                "clusterCIDR 10.244.1.0/16 has host bits set: the address must be the first of its /16 block",
            ),
            (
                ("serviceCIDR=10.96.0.1/12",),
                "serviceCIDR 10.96.0.1/12 has host bits set",
            ),
            (
                ("serviceCIDR=10.244.128.0/20",),
                "clusterCIDR 10.244.0.0/16 and serviceCIDR 10.244.128.0/20 overlap",
            ),
            (
                ("clusterCIDR=10.0.0.0/8",),
                "clusterCIDR 10.0.0.0/8 and serviceCIDR 10.96.0.0/12 overlap",
            ),
            (
                ("agent.probePort=9451",),
                "agent.probePort and controller.probePort are both 9451",
            ),
            (
                ("metrics.agentPort=9450",),
                "agent.probePort and metrics.agentPort are both 9450",
            ),
            (
                ("metrics.controllerPort=9465",),
                "metrics.agentPort and metrics.controllerPort are both 9465",
            ),
        ],
    )
    def test_cross_value_checks_reject(self, values: tuple[str, ...], expected: str) -> None:
        assert expected in render_fails(*values)

    @pytest.mark.parametrize(
        "values",
        [
            ("clusterCIDR=0.0.0.0/1", "serviceCIDR=128.0.0.0/1"),  # /1 blocks: adjacent, not overlapping
            ("clusterCIDR=10.96.0.0/12", "serviceCIDR=10.112.0.0/12"),
            ("serviceCIDR=192.168.255.255/32", "mtu=576"),
            ("mtu=9216", "overlayType=geneve"),
        ],
    )
    def test_edge_values_are_accepted(self, values: tuple[str, ...]) -> None:
        assert render(*values)

    def test_install_itself_refuses_bad_values(self) -> None:
        # `helm install --dry-run=client` runs the same validation as a real install.
        proc = helm("install", "--dry-run=client", RELEASE, str(CHART), "--set", "overlayType=wireguard")
        assert proc.returncode != 0
        assert "'/overlayType': value must be one of 'vxlan', 'gre', 'geneve'" in proc.stderr


class TestWorkloads:
    def test_agent_daemonset_runs_everywhere_and_rolls(self) -> None:
        ds = one(render(), "DaemonSet", "k-vswitch-agent")
        spec = pod_spec(ds)
        assert spec["tolerations"] == [{"operator": "Exists"}]  # every taint, every effect
        assert spec["hostNetwork"] is True
        assert spec["priorityClassName"] == "system-node-critical"
        assert ds["spec"]["updateStrategy"] == {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0},
        }
        env = {e["name"]: e for e in container(ds, "k-vswitchd")["env"]}
        assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
        assert container(ds, "install-cni")["command"] == ["/usr/local/lib/k-vswitch/install-cni.sh"]

    @pytest.mark.parametrize(
        ("workload", "name", "port"),
        [("DaemonSet", "k-vswitchd", 9450), ("Deployment", "controller", 9451)],
    )
    def test_probes_hit_kopfs_liveness_endpoint(self, workload: str, name: str, port: int) -> None:
        c = container(one(render(), workload, WORKLOADS[workload]), name)
        assert plain_env(c)["KVSWITCH_LIVENESS_ENDPOINT"] == f"http://0.0.0.0:{port}/healthz"
        assert c["ports"][0] == {"name": "probes", "containerPort": port, "protocol": "TCP"}
        for probe in ("livenessProbe", "readinessProbe"):
            assert c[probe]["httpGet"] == {"path": "/healthz", "port": "probes"}

    def test_controller_is_a_single_recreated_replica_with_a_peering(self) -> None:
        objs = render()
        deploy = one(objs, "Deployment", "k-vswitch-controller")
        assert deploy["spec"]["replicas"] == 1
        assert deploy["spec"]["strategy"] == {"type": "Recreate"}
        peering = one(objs, "ClusterKopfPeering")
        assert (
            plain_env(container(deploy, "controller"))["KVSWITCH_PEERING_NAME"] == peering["metadata"]["name"]
        )
        # Schedulable before any node has a pod network.
        spec = pod_spec(deploy)
        assert spec["hostNetwork"] is True
        assert {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoSchedule"} in spec[
            "tolerations"
        ]

    def test_controller_rolls_when_its_settings_change(self) -> None:
        def checksum(*sets: str) -> str:
            deploy = one(render(*sets), "Deployment")
            value: str = deploy["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
            return value

        assert checksum() == checksum("logLevel=debug")  # not a ConfigMap setting
        assert checksum() != checksum("overlayType=geneve")

    def test_non_default_values_reach_the_objects(self) -> None:
        objs = render(*NON_DEFAULT, namespace="k-vswitch")
        ds = one(objs, "DaemonSet", "k-vswitch-agent")
        agent = container(ds, "k-vswitchd")
        assert agent["image"] == "registry.example/k-vswitch:dev"
        assert agent["imagePullPolicy"] == "Always"
        assert pod_spec(ds)["imagePullSecrets"] == [{"name": "regcred"}]
        assert "tolerations" not in pod_spec(ds)
        assert ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] == "10%"
        assert plain_env(agent)["KUBERNETES_SERVICE_HOST"] == "192.0.2.10"
        assert plain_env(agent)["KVSWITCH_CNI_BIN_DIR"] == "/var/lib/rancher/k3s/data/cni"
        host_paths = {v["name"]: v["hostPath"]["path"] for v in pod_spec(ds)["volumes"] if "hostPath" in v}
        assert host_paths["cni-conf"] == "/var/lib/rancher/k3s/agent/etc/cni/net.d"
        assert "priorityClassName" not in pod_spec(one(objs, "Deployment"))
        job = one(objs, "Job")
        assert job["spec"]["activeDeadlineSeconds"] == 120

    def test_cleanup_and_policy_can_be_left_out(self) -> None:
        objs = render("cleanup.enabled=false", "agent.ownNodeStatusOnly=false")
        assert not [o for o in objs if o["metadata"]["name"].startswith("k-vswitch-cleanup")]
        assert not find(objs, "ValidatingAdmissionPolicy")
        assert not find(render(kube_version="1.29.0"), "ValidatingAdmissionPolicy")  # needs >= 1.30
        assert find(render(kube_version="1.30.0"), "ValidatingAdmissionPolicy")

    def test_notes_render_with_the_values(self) -> None:
        proc = helm(
            "install", "--dry-run=client", RELEASE, str(CHART), "-n", "net", "--set", "overlayType=gre"
        )
        assert proc.returncode == 0, proc.stderr
        notes = proc.stdout.split("NOTES:", 1)[1]
        assert "10.244.0.0/16 (gre between nodes)" in notes
        assert "pod-security.kubernetes.io/enforce=privileged" in notes  # outside kube-system


class TestChartMatchesTheCode:
    """The names the chart sets are the names kvswitch/config.py reads."""

    @pytest.mark.parametrize("sets", [(), ("mtu=1400", "overlayType=geneve", "clusterCIDR=172.16.0.0/12")])
    def test_controller_reads_the_configmap(
        self, monkeypatch: pytest.MonkeyPatch, sets: tuple[str, ...]
    ) -> None:
        objs = render(*sets)
        data = one(objs, "ConfigMap", "k-vswitch-controller")["data"]
        for key in list(data):
            assert key.startswith("KVSWITCH_")
        for name, value in data.items():
            monkeypatch.setenv(name, value)
        values = yaml.safe_load((CHART / "values.yaml").read_text())
        values.update(dict(s.split("=", 1) for s in sets))
        settings = ControllerSettings.from_env()
        assert settings.cluster_cidr == values["clusterCIDR"]
        assert settings.service_cidr == values["serviceCIDR"]
        assert settings.overlay_type == values["overlayType"]
        assert settings.mtu == (None if values["mtu"] is None else int(values["mtu"]))

    def test_agent_settings_point_at_what_the_pod_mounts(self, monkeypatch: pytest.MonkeyPatch) -> None:
        ds = one(render(), "DaemonSet", "k-vswitch-agent")
        agent = container(ds, "k-vswitchd")
        env = plain_env(agent)
        own = {"KVSWITCH_LOG_LEVEL", "KVSWITCH_LIVENESS_ENDPOINT"}  # read by kvswitch/daemons.py
        fields = {"KVSWITCH_" + f.upper() for f in AgentSettings.model_fields}
        unknown = {k for k in env if k.startswith("KVSWITCH_")} - fields - own
        assert not unknown, f"the agent reads no such setting: {unknown}"
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("NODE_NAME", "node-a")
        settings = AgentSettings.from_env()
        mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}

        def mounted(path: str, writable: bool) -> bool:
            return any(
                (path + "/").startswith(m.rstrip("/") + "/")
                and (not writable or not mounts[m].get("readOnly"))
                for m in mounts
            )

        assert mounted(settings.ovsdb.removeprefix("unix:"), writable=True)
        assert mounted(settings.cni_socket, writable=True)
        assert mounted(settings.cni_conf_dir, writable=True)
        assert mounted(settings.cni_bin_dir, writable=False)
        assert settings.ipam_data_dir is not None and mounted(settings.ipam_data_dir, writable=True)
        assert settings.host_netns is None  # hostNetwork: the agent's namespace is the node's
        # The agent's cni_bin_dir is read-only and install-cni did the work: no second installer.
        assert settings.install_cni is False

    def test_probe_endpoint_reaches_kopf(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import kopf

        import kvswitch.daemons as daemons

        calls: list[dict[str, Any]] = []
        monkeypatch.setattr(kopf, "run", lambda **kw: calls.append(kw))
        monkeypatch.setattr(daemons, "importlib", type("NoImport", (), {"import_module": staticmethod(str)}))
        monkeypatch.setattr(metrics, "serve", lambda port, address: True)  # no server in the test process
        for workload, name, entry in (
            ("DaemonSet", "k-vswitchd", daemons.agent),
            ("Deployment", "controller", daemons.controller),
        ):
            c = container(one(render(), workload, WORKLOADS[workload]), name)
            for k, v in plain_env(c).items():
                monkeypatch.setenv(k, v)
            monkeypatch.setenv("NODE_NAME", "node-a")  # the agent's, from the downward API
            entry()
            assert calls[-1]["liveness_endpoint"] == plain_env(c)["KVSWITCH_LIVENESS_ENDPOINT"]
            assert calls[-1]["clusterwide"] is True
        assert calls[0]["standalone"] is True  # agents never peer
        assert calls[1]["standalone"] is False

    def test_controller_keeps_alive_in_the_charts_peering(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import kopf

        import kvswitch.daemons as daemons

        calls: list[dict[str, Any]] = []
        monkeypatch.setattr(kopf, "run", lambda **kw: calls.append(kw))
        monkeypatch.setattr(daemons, "importlib", type("NoImport", (), {"import_module": staticmethod(str)}))
        monkeypatch.setattr(metrics, "serve", lambda port, address: True)
        objs = render()
        for k, v in plain_env(container(one(objs, "Deployment"), "controller")).items():
            monkeypatch.setenv(k, v)
        daemons.controller()
        assert calls[-1].get("peering_name") == one(objs, "ClusterKopfPeering")["metadata"]["name"]


class TestMetrics:
    """Prometheus metrics: each daemon serves the port the chart gives it, and Prometheus finds it."""

    @pytest.mark.parametrize("sets", [(), ("metrics.agentPort=19465", "metrics.controllerPort=19466")])
    def test_each_daemon_serves_the_charts_port(
        self, monkeypatch: pytest.MonkeyPatch, sets: tuple[str, ...]
    ) -> None:
        import kopf

        import kvswitch.daemons as daemons

        served: list[int] = []
        monkeypatch.setattr(kopf, "run", lambda **kw: None)
        monkeypatch.setattr(daemons, "importlib", type("NoImport", (), {"import_module": staticmethod(str)}))

        def serve(port: int, address: str) -> bool:
            served.append(port)
            return True

        monkeypatch.setattr(metrics, "serve", serve)
        objs = render(*sets)
        values = yaml.safe_load((CHART / "values.yaml").read_text())["metrics"]
        values.update({k.split(".")[1]: int(v) for k, v in (s.split("=") for s in sets)})
        for workload, name, entry, key in (
            ("DaemonSet", "k-vswitchd", daemons.agent, "agentPort"),
            ("Deployment", "controller", daemons.controller, "controllerPort"),
        ):
            workload_obj = one(objs, workload, WORKLOADS[workload])
            c = container(workload_obj, name)
            for k, v in plain_env(c).items():
                monkeypatch.setenv(k, v)
            monkeypatch.setenv("NODE_NAME", "node-a")
            entry()
            assert served[-1] == values[key]
            assert {"name": "metrics", "containerPort": values[key], "protocol": "TCP"} in c["ports"]
            annotations = workload_obj["spec"]["template"]["metadata"]["annotations"]
            assert annotations["prometheus.io/scrape"] == "true"
            assert annotations["prometheus.io/port"] == str(values[key])
            assert annotations["prometheus.io/path"] == "/metrics"

    def test_disabled_means_no_port_no_annotation_and_port_zero(self) -> None:
        objs = render("metrics.enabled=false")
        for workload, name in (("DaemonSet", "k-vswitchd"), ("Deployment", "controller")):
            w = one(objs, workload, WORKLOADS[workload])
            c = container(w, name)
            assert plain_env(c)["KVSWITCH_METRICS_PORT"] == "0"
            assert [p["name"] for p in c["ports"]] == ["probes"]
            assert not any(
                k.startswith("prometheus.io/") for k in w["spec"]["template"]["metadata"]["annotations"]
            )
        assert AgentSettings(node_name="n", metrics_port=0).metrics_port == 0

    def test_annotations_can_be_left_out(self) -> None:
        w = one(render("metrics.podAnnotations=false"), "DaemonSet", WORKLOADS["DaemonSet"])
        assert "prometheus.io/scrape" not in w["spec"]["template"]["metadata"]["annotations"]
        assert plain_env(container(w, "k-vswitchd"))["KVSWITCH_METRICS_PORT"] == "9465"

    def test_service_monitor_selects_the_pods_metrics_port(self) -> None:
        objs = render("metrics.serviceMonitor.enabled=true", "metrics.serviceMonitor.labels.release=prom")
        assert not find(render(), "ServiceMonitor")
        monitors = find(objs, "ServiceMonitor")
        assert len(monitors) == 2
        for workload, name in (("DaemonSet", "k-vswitchd"), ("Deployment", "controller")):
            w = one(objs, workload, WORKLOADS[workload])
            svc = one(objs, "Service", f"{WORKLOADS[workload]}-metrics")
            assert kube_errors([svc], KUBE_VERSIONS[-1]) == []
            pod_labels = w["spec"]["template"]["metadata"]["labels"]
            assert svc["spec"]["selector"].items() <= pod_labels.items()
            assert svc["spec"]["clusterIP"] == "None"
            (port,) = svc["spec"]["ports"]
            assert port["targetPort"] == "metrics"
            assert "metrics" in [p["name"] for p in container(w, name)["ports"]]
            mon = one(objs, "ServiceMonitor", svc["metadata"]["name"])
            assert mon["apiVersion"] == "monitoring.coreos.com/v1"
            assert mon["metadata"]["labels"]["release"] == "prom"
            assert mon["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
            assert mon["spec"]["namespaceSelector"] == {"matchNames": ["kube-system"]}
            assert mon["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s"}]


class TestTelemetry:
    """telemetry.* values reach the controller, which writes them into every VSwitchConfig."""

    def test_collectors_reach_the_controllers_settings(self, monkeypatch: pytest.MonkeyPatch) -> None:
        sets = ("telemetry.sflow.collector=10.0.0.5:6343", "telemetry.ipfix.collector=10.0.0.5:4739",
                "telemetry.ipfix.sampling=7")  # fmt: skip
        data = one(render(*sets), "ConfigMap", "k-vswitch-controller")["data"]
        for name, value in data.items():
            monkeypatch.setenv(name, value)
        telemetry = ControllerSettings.from_env().telemetry
        assert telemetry is not None and telemetry.sflow is not None and telemetry.ipfix is not None
        assert (telemetry.sflow.collector, telemetry.sflow.sampling) == ("10.0.0.5:6343", 64)
        assert (telemetry.ipfix.collector, telemetry.ipfix.sampling) == ("10.0.0.5:4739", 7)

    def test_off_by_default(self) -> None:
        data = one(render(), "ConfigMap", "k-vswitch-controller")["data"]
        assert not [k for k in data if "SFLOW" in k or "IPFIX" in k]
        assert ControllerSettings().telemetry is None

    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            ("telemetry.sflow.collector=10.0.0.5", "'/telemetry/sflow/collector': '10.0.0.5' does not match"),
            ("telemetry.ipfix.sampling=0", "'/telemetry/ipfix/sampling': minimum: got 0, want 1"),
        ],
    )
    def test_bad_values_are_refused(self, value: str, expected: str) -> None:
        assert expected in render_fails(value)


def test_rendering_is_json_serialisable() -> None:
    # kubectl apply sends JSON: YAML-only types (dates, sets) in values would break it.
    json.dumps(render(*NON_DEFAULT, namespace="k-vswitch"))
