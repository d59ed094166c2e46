"""The CRDs: valid apiextensions.k8s.io/v1, structural, shipped identically in the chart, and the
VSwitchConfig schema accepts the valid samples and rejects each invalid one at the expected field."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from kvswitch.config import InvalidConfig, parse_spec
from tests.test_chart import CHART, CRDS, KUBE_VERSIONS, crd_validator, load_yaml, tool

VSC = CRDS / "kvswitch.io_vswitchconfigs.yaml"
VALID = sorted((CRDS / "samples" / "valid").glob("*.yaml"))
INVALID = sorted((CRDS / "samples" / "invalid").glob("*.yaml"))
CRD_FILES = sorted(CRDS.glob("*.yaml"))


def vsc_version() -> dict[str, Any]:
    version: dict[str, Any] = load_yaml(VSC)["spec"]["versions"][0]
    return version


def spec_schema() -> dict[str, Any]:
    props: dict[str, Any] = vsc_version()["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return props


def expected_error(sample: Path) -> str:
    match = re.search(r"^# rejects: (\S+)$", sample.read_text(), re.M)
    assert match, f"{sample.name} does not say which field it breaks (# rejects: PATH)"
    return match.group(1)


class TestChartCopy:
    def test_chart_ships_the_same_crds(self) -> None:
        chart_crds = sorted((CHART / "crds").glob("*"))
        assert [p.name for p in chart_crds] == [p.name for p in CRD_FILES]
        for ours in CRD_FILES:
            assert (CHART / "crds" / ours.name).read_bytes() == ours.read_bytes(), (
                f"charts/k-vswitch/crds/{ours.name} differs from crds/{ours.name}: "
                "cp crds/*.yaml charts/k-vswitch/crds/"
            )


class TestDefinitions:
    @pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
    @pytest.mark.parametrize("crd", CRD_FILES, ids=lambda p: p.name)
    def test_crd_is_a_valid_v1_definition(self, crd: Path, kube_version: str) -> None:
        obj = load_yaml(crd)
        assert obj["apiVersion"] == "apiextensions.k8s.io/v1"
        kubernetes_validate.validate(obj, kube_version, strict=True)

    def test_names_scope_and_version(self) -> None:
        spec = load_yaml(VSC)["spec"]
        assert spec["group"] == "kvswitch.io"
        assert spec["scope"] == "Cluster"
        assert spec["names"]["kind"] == "VSwitchConfig"
        assert spec["names"]["plural"] == "vswitchconfigs"
        assert "vsc" in spec["names"]["shortNames"]
        assert [(v["name"], v["served"], v["storage"]) for v in spec["versions"]] == [
            ("v1alpha1", True, True)
        ]

    def test_status_is_a_subresource(self) -> None:
        assert vsc_version()["subresources"] == {"status": {}}

    def test_printer_columns(self) -> None:
        columns = {c["name"]: c["jsonPath"] for c in vsc_version()["additionalPrinterColumns"]}
        assert columns == {
            "Pod CIDR": ".spec.podCIDR",
            "Overlay": ".spec.overlayType",
            "Overlay IP": ".spec.overlayIP",
            "Ready": '.status.conditions[?(@.type=="Ready")].status',
            "Age": ".metadata.creationTimestamp",
        }

    @pytest.mark.parametrize(
        ("sample", "expected"),
        [
            ("node-a-full.yaml", ["10.244.1.0/24", "vxlan", "192.168.10.11", "True"]),
            ("node-b-minimal.yaml", ["172.16.0.0/24", "geneve", "10.0.0.255", ""]),  # no status yet
        ],
    )
    def test_printer_columns_evaluate_with_kubectls_jsonpath(self, sample: str, expected: list[str]) -> None:
        # kubectl's own JSONPath engine, offline (--local): what `kubectl get vsc` will print.
        columns = [c for c in vsc_version()["additionalPrinterColumns"] if c["type"] == "string"]
        template = "".join("{" + c["jsonPath"] + "}|" for c in columns)
        proc = subprocess.run(
            [str(tool("kubectl")), "label", "--local", "-f", str(CRDS / "samples" / "valid" / sample), "x=y",
             "-o", f"jsonpath={template}"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split("|")[:-1] == expected

    def test_spec_fields(self) -> None:
        spec = spec_schema()
        assert set(spec["required"]) == {"clusterCIDR", "podCIDR", "serviceCIDR", "overlayType", "overlayIP"}
        assert spec["properties"]["overlayType"]["enum"] == ["vxlan", "gre", "geneve"]
        mtu = spec["properties"]["mtu"]
        assert (mtu["type"], mtu["minimum"], mtu["maximum"]) == ("integer", 576, 9216)

    def test_conditions_have_the_metav1_condition_shape(self) -> None:
        status = vsc_version()["schema"]["openAPIV3Schema"]["properties"]["status"]
        assert status["properties"]["observedGeneration"]["type"] == "integer"
        conditions = status["properties"]["conditions"]
        assert conditions["x-kubernetes-list-type"] == "map"
        assert conditions["x-kubernetes-list-map-keys"] == ["type"]
        item = conditions["items"]
        assert set(item["required"]) == {"type", "status", "lastTransitionTime", "reason", "message"}
        assert set(item["properties"]) == {
            "type",
            "status",
            "observedGeneration",
            "lastTransitionTime",
            "reason",
            "message",
        }
        assert item["properties"]["status"]["enum"] == ["True", "False", "Unknown"]

    @pytest.mark.parametrize("crd", CRD_FILES, ids=lambda p: p.name)
    def test_schema_is_structural(self, crd: Path) -> None:
        """The API server prunes unknown fields only for structural schemas: a type on every node,
        no additionalProperties next to properties, nothing but `type: object` under metadata."""
        problems: list[str] = []

        def walk(node: dict[str, Any], path: str) -> None:
            if "type" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
                problems.append(f"{path}: no type")
            if "properties" in node and "additionalProperties" in node:
                problems.append(f"{path}: properties with additionalProperties")
            for name, child in node.get("properties", {}).items():
                if path == "" and name == "metadata" and child != {"type": "object"}:
                    problems.append("metadata: must be just `type: object`")
                walk(child, f"{path}.{name}")
            if isinstance(node.get("items"), dict):
                walk(node["items"], f"{path}[]")

        for version in load_yaml(crd)["spec"]["versions"]:
            walk(version["schema"]["openAPIV3Schema"], "")
        assert problems == []


class TestSamples:
    def test_there_are_samples_of_both_kinds(self) -> None:
        assert len(VALID) >= 3 and len(INVALID) >= 15

    @pytest.mark.parametrize("sample", VALID, ids=lambda p: p.name)
    def test_valid_sample_passes(self, sample: Path) -> None:
        assert crd_validator(load_yaml(VSC))(load_yaml(sample)) == []

    @pytest.mark.parametrize("sample", INVALID, ids=lambda p: p.name)
    def test_invalid_sample_fails_at_its_field(self, sample: Path) -> None:
        errors = crd_validator(load_yaml(VSC))(load_yaml(sample))
        assert errors, f"{sample.name} was accepted"
        assert set(errors) == {expected_error(sample)}


# Go's regexp and ECMA agree with these expectations; _go_pattern makes Python agree too.
CIDRS_OK = [
    "0.0.0.0/0",
    "10.244.0.0/16",
    "255.255.255.255/32",
    "192.168.1.0/24",
    "100.64.0.0/10",
    "1.2.3.4/9",
]
CIDRS_BAD = [
    "10.244.0.0/33",
    "10.244.0.0/-1",
    "10.244.0.0/",
    "10.244.0.0",
    "256.0.0.0/8",
    "10.244.0/16",
    "10.244.0.0.0/16",
    "010.0.0.0/8",
    "10.00.0.0/16",
    "10.244.0.0/016",
    " 10.0.0.0/8",
    "10.0.0.0/8 ",
    "10.0.0.0/8\n",
    "fd00::/64",
    "10.0.0.0/8/8",
    "a.b.c.d/8",
    "",
]
IPS_OK = ["0.0.0.0", "10.0.0.1", "255.255.255.255", "192.168.10.11", "9.99.199.249"]
IPS_BAD = [
    "256.1.1.1",
    "1.1.1",
    "1.1.1.1.1",
    "01.1.1.1",
    "1.1.1.1/32",
    "1.1.1.1\n",
    "::1",
    "1.1.1.-1",
    "1..1.1",
]


class TestPatterns:
    @staticmethod
    def _check(field: str, value: str) -> list[str]:
        base = load_yaml(VALID[0])
        base.pop("status", None)
        base["spec"][field] = value
        return crd_validator(load_yaml(VSC))(base)

    @pytest.mark.parametrize("value", CIDRS_OK)
    def test_cidr_accepted(self, value: str) -> None:
        assert self._check("podCIDR", value) == []

    @pytest.mark.parametrize("value", CIDRS_BAD)
    def test_cidr_rejected(self, value: str) -> None:
        assert self._check("clusterCIDR", value) == ["spec.clusterCIDR"]

    @pytest.mark.parametrize("value", IPS_OK)
    def test_ip_accepted(self, value: str) -> None:
        assert self._check("overlayIP", value) == []

    @pytest.mark.parametrize("value", IPS_BAD)
    def test_ip_rejected(self, value: str) -> None:
        assert self._check("overlayIP", value) == ["spec.overlayIP"]

    def test_chart_values_use_the_same_cidr_pattern(self) -> None:
        import json

        values_schema = json.loads((CHART / "values.schema.json").read_text())
        crd_pattern = spec_schema()["properties"]["clusterCIDR"]["pattern"]
        for key in ("clusterCIDR", "serviceCIDR"):
            assert values_schema["properties"][key]["pattern"] == crd_pattern


def _invalid_specs() -> list[Any]:
    params: list[Any] = []
    for sample in INVALID:
        if not expected_error(sample).startswith("spec"):
            continue  # status and root-level samples: not the model's business
        params.append(pytest.param(sample, id=sample.name))
    return params


INVALID_SPECS = _invalid_specs()


class TestAgentModelAgrees:
    """kvswitch/config.py re-checks specs; it must refuse at least what the API server refuses."""

    @pytest.mark.parametrize("sample", INVALID_SPECS)
    def test_model_rejects_what_the_crd_rejects(self, sample: Path) -> None:
        with pytest.raises(InvalidConfig):
            parse_spec(load_yaml(sample)["spec"])

    @pytest.mark.parametrize("sample", ["node-a-full.yaml", "node-b-minimal.yaml"])
    def test_model_accepts_realistic_samples(self, sample: str) -> None:
        spec = load_yaml(CRDS / "samples" / "valid" / sample)["spec"]
        assert parse_spec(spec).to_api() == spec
