"""What ships, and that the test kit stays out of it.

Both wheels are built from a snapshot of the checkout (what git tracks or would track, so the
checkout itself gets no ``build/``) and installed into fresh virtualenvs; third-party packages
come from this venv, linked in per distribution, only the closure each environment asks for:

- the product wheel holds ``kvswitch`` and nothing of the test kit, and requires none of it;
- the kit wheel holds ``kvswitch_testbed`` with the chart's CRDs as package data and registers its
  ``kvswitchctl`` commands through entry points;
- the product's dependency closure, computed as ``scripts/build-cni-bundle.py`` computes it but
  from the installed wheel (next to the kit), has no kit package;
- the CNI bundle built from that installation carries exactly that closure, and its plugin runs;
- the image's Dockerfile copies and installs only the product;
- the sandbox finds its CRDs in an installed kit, run from outside the checkout, and the product
  alone imports and runs with no kit package installed at all.
"""

from __future__ import annotations

import configparser
import email
import email.message
import importlib.metadata as md
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

from tests.test_chart_image import docker_context_includes, stages

ROOT = Path(__file__).resolve().parent.parent
BUNDLE_SCRIPT = ROOT / "scripts" / "build-cni-bundle.py"
CHART_CRDS = ROOT / "charts" / "k-vswitch" / "crds"
CNI_PLUGINS = Path("/usr/lib/cni")  # Debian's containernetworking-plugins, as in the image

# Distributions (normalised names) and top-level modules of the test kit and the development
# tools: none may be required by the product, sit in its closure, its bundle or its image.
KIT_DISTS = {"kvswitch-testbed", "kmock", "jsonschema", "pyroute2", "pytest"}
KIT_MODULES = {"kvswitch_testbed", "kmock", "jsonschema", "pyroute2", "pytest", "tests"}
# What the product's `testbed` extra must bring for the kit (the fake API server on KMock
# validating CRD schemas read from YAML).
TESTBED_EXTRA = {"kmock", "jsonschema", "pyyaml"}
# Build-context paths the image may use: the package, its metadata and the scripts it runs.
IMAGE_SOURCES = {
    "pyproject.toml",
    "README.md",
    "kvswitch",
    "scripts/build-cni-bundle.py",
    "scripts/install-cni.sh",
    "scripts/uninstall-cni.sh",
    "scripts/wait-for-cleanup.py",
}
SETUPTOOLS_NEEDED = (77,)  # pyproject.toml's build-system (SPDX `license` string)
# The agent's and the controller's handler modules read their settings at import.
IMPORT_ENV = {"NODE_NAME": "node-a", "KVSWITCH_CLUSTER_CIDR": "10.244.0.0/16"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def req_name(spec: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", spec)
    assert match, spec
    return norm(match.group(0))


def req_extra(spec: str) -> str | None:
    match = re.search(r"""extra\s*==\s*["']([^"']+)["']""", spec)
    return match.group(1) if match else None


def bundle_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_cni_bundle", BUNDLE_SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Wheel:
    path: Path

    @property
    def names(self) -> list[str]:
        with zipfile.ZipFile(self.path) as zf:
            return zf.namelist()

    def read(self, suffix: str) -> bytes:
        with zipfile.ZipFile(self.path) as zf:
            (name,) = [n for n in zf.namelist() if n.endswith(suffix) and ".dist-info/" in n]
            return zf.read(name)

    @property
    def metadata(self) -> email.message.Message:
        return email.message_from_bytes(self.read(".dist-info/METADATA"))

    def requires(self, extra: str | None = None) -> set[str]:
        """Requirement names, of the extra given or (None) the unconditional ones."""
        return {req_name(r) for r in self.metadata.get_all("Requires-Dist") or [] if req_extra(r) == extra}

    @property
    def requirements(self) -> list[str]:
        return list(self.metadata.get_all("Requires-Dist") or [])


@dataclass
class Env:
    """A fresh venv: our wheels installed by pip, third-party distributions linked from this venv."""

    root: Path
    cwd: Path  # outside the checkout

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    @property
    def site_packages(self) -> Path:
        return Path(sysconfig.get_path("purelib", vars={"base": str(self.root), "platbase": str(self.root)}))

    def run(
        self, *argv: str | Path, check: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(a) for a in argv],
            cwd=self.cwd,
            env={"PATH": f"{self.root / 'bin'}:/usr/bin:/bin", **(env or {})},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if check:
            assert proc.returncode == 0, f"{argv}: {proc.stdout}{proc.stderr}"
        return proc

    def py(self, code: str, env: dict[str, str] | None = None) -> str:
        return self.run(self.python, "-I", "-c", code, env=env).stdout


def snapshot(dest: Path) -> Path:
    """The checkout's files as git sees them (tracked or not ignored), symlinks kept as symlinks."""
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
        timeout=30,
    ).stdout.decode()
    for rel in filter(None, listed.split("\0")):
        src = ROOT / rel
        if not src.is_symlink() and not src.is_file():
            continue  # deleted meanwhile by someone working in the checkout
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel, follow_symlinks=False)
    return dest


def snapshot_files(tree: Path) -> list[str]:
    return sorted(str(p.relative_to(tree)) for p in tree.rglob("*") if p.is_file() or p.is_symlink())


def build_wheels(src: Path, out: Path) -> tuple[Wheel, Wheel]:
    # The venv's own setuptools when it is new enough (offline); otherwise pip's isolated build
    # environment, which fetches setuptools from PyPI (its cache after the first time).
    setuptools = tuple(int(p) for p in re.findall(r"\d+", md.version("setuptools"))[:1])
    no_isolation = ["--no-build-isolation"] if setuptools >= SETUPTOOLS_NEEDED else []
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *no_isolation, "-w", str(out)]
    proc = subprocess.run(
        [*pip, str(src), str(src / "testbed")],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (product,) = out.glob("kvswitch-*.whl")
    (kit,) = out.glob("kvswitch_testbed-*.whl")
    return Wheel(product), Wheel(kit)


def make_env(root: Path, cwd: Path, wheels: list[Wheel], requirements: set[str]) -> Env:
    env = Env(root, cwd)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=60)
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(env.python), "install", "-q", "--no-deps", "--no-index"]
        + [str(w.path) for w in wheels],
        check=True,
        capture_output=True,
        timeout=120,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    # Each distribution of the requirements' closure, linked by its top-level entries (packages,
    # modules, dist-info) into one directory on the new venv's path: nothing else of this venv.
    deps = root / "deps"
    deps.mkdir()
    closure = bundle_script()._dist_closure
    for name in sorted(requirements):
        for dist in closure(name):
            for top in {f.parts[0] for f in dist.files or [] if f.parts and f.parts[0] != ".."}:
                src = Path(str(dist.locate_file(top)))
                if src.exists() and not (deps / top).exists():
                    (deps / top).symlink_to(src)
    (env.site_packages / "_deps.pth").write_text(f"{deps}\n")
    return env


@dataclass
class Built:
    src: Path  # the snapshot the wheels were built from
    product: Wheel
    kit: Wheel
    full: Env  # product + kit + the product's `testbed` extra
    alone: Env  # the product and its own requirements only
    work: Path


@pytest.fixture(scope="module")
def built() -> Iterator[Built]:
    with tempfile.TemporaryDirectory(prefix="kvs-packaging-") as tmp:
        work = Path(tmp)
        src = snapshot(work / "src")
        (work / "wheels").mkdir()
        product, kit = build_wheels(src, work / "wheels")
        cwd = work / "elsewhere"
        cwd.mkdir()
        full = make_env(work / "full", cwd, [product, kit], product.requires() | product.requires("testbed"))
        alone = make_env(work / "alone", cwd, [product], product.requires())
        yield Built(src, product, kit, full, alone, work)


CLOSURE_CODE = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("b", sys.argv[1])
b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b)
dists = b._dist_closure("kvswitch")
print(json.dumps({
    "located": str(dists[0].locate_file("")),
    "requires": {d.metadata["Name"]: [r for r in d.requires or [] if "extra ==" not in r] for d in dists},
}))
"""


@pytest.fixture(scope="module")
def closure(built: Built) -> dict[str, list[str]]:
    """The product's closure as the bundle script computes it, in the venv that also holds the kit."""
    out = built.full.run(built.full.python, "-I", "-c", CLOSURE_CODE, BUNDLE_SCRIPT).stdout
    data = json.loads(out)
    assert Path(data["located"]) == built.full.site_packages, "kvswitch must be the installed wheel"
    return {norm(name): sorted({req_name(r) for r in reqs}) for name, reqs in data["requires"].items()}


@pytest.fixture(scope="module")
def bundle(built: Built) -> Path:
    """The CNI bundle as the Dockerfile builds it, from the wheel installed next to the kit."""
    out = built.work / "cni-bundle"
    built.full.run(
        built.full.python,
        "-I",
        BUNDLE_SCRIPT,
        out,
        "--dist",
        "kvswitch",
        "--entry",
        "k-vswitch-cni",
        "--binary",
        CNI_PLUGINS / "host-local",
        "--binary",
        CNI_PLUGINS / "portmap",
    )
    return out


def top_levels(names: list[str]) -> set[str]:
    return {n.split("/")[0] for n in names}


class TestProductWheel:
    def test_holds_the_whole_product_and_nothing_else(self, built: Built) -> None:
        names = built.product.names
        assert top_levels(names) == {"kvswitch", "kvswitch-0.1.0.dist-info"}
        sources = {f for f in snapshot_files(built.src) if f.startswith("kvswitch/") and f.endswith(".py")}
        assert {n for n in names if n.endswith(".py")} == sources  # a subpackage left out shows here
        for name in names:
            parts = name.split("/")
            assert not set(parts) & (KIT_MODULES | {"testbed", "bench"}), name
            assert not parts[-1].startswith("test_") and parts[-1] != "conftest.py", name

    def test_requires_nothing_of_the_test_kit(self, built: Built) -> None:
        runtime = built.product.requires()
        assert {"kopf", "kubernetes-asyncio", "ovs", "pydantic"} <= runtime
        assert not runtime & (KIT_DISTS | TESTBED_EXTRA), built.product.requirements
        assert built.product.requires("testbed") >= TESTBED_EXTRA
        assert "pyroute2" in built.product.requires("dev")  # the benchmark's comparison only


class TestKitWheel:
    def test_holds_the_kit_and_the_charts_crds(self, built: Built) -> None:
        names = built.kit.names
        assert top_levels(names) == {"kvswitch_testbed", "kvswitch_testbed-0.1.0.dist-info"}
        crds = sorted(n for n in names if n.startswith("kvswitch_testbed/crds/"))
        charts = sorted(CHART_CRDS.glob("*.yaml"))
        assert [Path(n).name for n in crds] == [p.name for p in charts] and charts
        with zipfile.ZipFile(built.kit.path) as zf:
            for name, chart in zip(crds, charts, strict=True):
                assert zf.read(name) == chart.read_bytes(), name

    def test_requires_the_product_and_registers_kvswitchctl_commands(self, built: Built) -> None:
        assert [r.replace(" ", "") for r in built.kit.requirements] == ["kvswitch[testbed]"]
        entry_points = configparser.ConfigParser()
        entry_points.read_string(built.kit.read(".dist-info/entry_points.txt").decode())
        assert set(entry_points["kvswitchctl.commands"]) == {"sandbox", "clean-runs"}
        assert "console_scripts" not in entry_points  # kvswitchctl itself is the product's


class TestDependencyClosure:
    def test_product_closure_has_no_test_kit(self, closure: dict[str, list[str]]) -> None:
        assert "kvswitch" in closure and {"kopf", "kubernetes-asyncio", "ovs", "pydantic"} <= set(closure)
        assert not set(closure) & KIT_DISTS, sorted(closure)

    def test_pyyaml_comes_only_through_kopf_and_the_kubernetes_client(
        self, closure: dict[str, list[str]]
    ) -> None:
        # Both read kubeconfigs with it, so the closure cannot drop it; the product itself never
        # asks for it (nor for jsonschema or kmock), which is what keeps the kit's extra apart.
        assert "pyyaml" in closure
        assert {name for name, reqs in closure.items() if "pyyaml" in reqs} <= {
            "kopf",
            "kubernetes-asyncio",
        }
        assert not set(closure["kvswitch"]) & (KIT_DISTS | TESTBED_EXTRA)


class TestCniBundle:
    def test_carries_exactly_the_product_closure(self, bundle: Path, closure: dict[str, list[str]]) -> None:
        site = bundle / "site-packages"
        dist_infos = {norm(p.name.split("-")[0]) for p in site.glob("*.dist-info")}
        assert dist_infos == set(closure)
        assert (site / "kvswitch" / "cni" / "main.py").is_file()
        assert not {p.name for p in site.iterdir()} & KIT_MODULES
        strays = [p for p in bundle.rglob("*") if {"kvswitch_testbed", "kmock", "jsonschema"} & set(p.parts)]
        assert strays == []

    def test_bundled_plugin_runs_from_the_bundle_alone(self, built: Built, bundle: Path) -> None:
        # As the wrapper runs it (loader, libraries and site-packages of the bundle); the checkout
        # and this venv are out of reach: no editable finder can answer for a missing file.
        loader = [str(bundle / "lib" / "ld-linux-x86-64.so.2"), "--library-path", str(bundle / "lib")]
        proc = subprocess.run(
            [*loader, str(bundle / "bin" / "python3"), "-I", str(bundle / "bin" / "k-vswitch-cni.py")],
            cwd=built.full.cwd,
            env={"CNI_COMMAND": "VERSION", "PATH": "/usr/bin:/bin"},
            input="{}",
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        assert "1.1.0" in json.loads(proc.stdout)["supportedVersions"]


class TestImage:
    def test_copies_only_the_product(self) -> None:
        sources = [
            src
            for stage in stages()
            for cmd in stage
            if cmd.cmd in ("COPY", "ADD") and not any(f.startswith("--from") for f in cmd.flags)
            for src in cmd.value[:-1]
        ]
        assert sources and set(sources) <= IMAGE_SOURCES, sorted(set(sources) - IMAGE_SOURCES)

    def test_installs_the_product_without_extras(self) -> None:
        commands: list[list[str]] = []
        for stage in stages():
            for cmd in stage:
                if cmd.cmd == "RUN":
                    words = shlex.split(cmd.value[0])
                    current: list[str] = []
                    for word in [*words, "&&"]:
                        if word in ("&&", "||", ";"):
                            commands.append(current)
                            current = []
                        else:
                            current.append(word)
        installs = [c for c in commands if c[:1] and c[0].endswith("pip") and "install" in c]
        assert len(installs) == 1, installs
        targets = [w for w in installs[0][installs[0].index("install") + 1 :] if not w.startswith("-")]
        assert targets == ["/src"]  # no `[extra]`, no second distribution
        assert not {"-e", "--editable", "-r", "--requirement"} & set(installs[0])
        bundle = next(c for c in commands if any(w.endswith("build-cni-bundle.py") for w in c))
        assert bundle[bundle.index("--dist") + 1] == "kvswitch"

    def test_build_context_excludes_the_kit_tests_and_benchmarks(self, built: Built) -> None:
        files = snapshot_files(built.src)
        context = {f for f in files if docker_context_includes(f)}
        assert {"pyproject.toml", "kvswitch/cni/main.py"} <= context
        assert all(f in IMAGE_SOURCES or f.startswith("kvswitch/") for f in context), sorted(context)
        for path in ("testbed/pyproject.toml", "testbed/kvswitch_testbed/cluster.py", "tests/conftest.py"):
            assert path in files and path not in context


# kvswitchctl's own operator commands (the product's entry points); the kit adds sandbox, clean-runs.
PRODUCT_COMMANDS = {"trace", "flows", "policy", "policy-stats", "check-datapath"}


def commands(helptext: str) -> set[str]:
    """The sub-commands ``kvswitchctl --help`` lists (its positional arguments section)."""
    section = helptext.split("positional arguments:")[1].split("options:")[0]
    return {m.group(1) for m in re.finditer(r"^    (\S+)", section, re.M)}


class TestInstalledWheels:
    def test_sandbox_finds_its_crds_in_the_installed_kit(self, built: Built) -> None:
        out = built.full.py(
            "import kvswitch_testbed, json\n"
            "from kvswitch_testbed.cluster import CRD_FILE\n"
            "print(json.dumps([kvswitch_testbed.__file__, str(CRD_FILE), CRD_FILE.read_text()]))"
        )
        module, crd_file, text = json.loads(out)
        assert Path(module).is_relative_to(built.full.site_packages)
        assert Path(crd_file).is_relative_to(built.full.site_packages / "kvswitch_testbed" / "crds")
        assert text == (CHART_CRDS / Path(crd_file).name).read_text()

    def test_kvswitchctl_offers_the_kits_commands(self, built: Built) -> None:
        kvswitchctl = built.full.root / "bin" / "kvswitchctl"
        assert (
            commands(built.full.run(kvswitchctl, "--help").stdout)
            == {"sandbox", "clean-runs"} | PRODUCT_COMMANDS
        )
        assert "--nodes" in built.full.run(kvswitchctl, "sandbox", "--help").stdout

    def test_product_alone_imports_and_runs_without_the_kit(self, built: Built) -> None:
        out = built.alone.py(
            "import importlib, importlib.util, json, pkgutil, kvswitch\n"
            "names = [m.name for m in pkgutil.walk_packages(kvswitch.__path__, 'kvswitch.')]\n"
            "for name in names: importlib.import_module(name)\n"
            f"absent = [m for m in {sorted(KIT_MODULES)!r} if importlib.util.find_spec(m) is None]\n"
            "print(json.dumps([names, absent]))",
            env=IMPORT_ENV,
        )
        names, absent = json.loads(out)
        assert {"kvswitch.ctl", "kvswitch.cni.server", "kvswitch.handlers.agent"} <= set(names)
        assert absent == sorted(KIT_MODULES)  # not installed: every import above did without them
        kvswitchctl = built.alone.root / "bin" / "kvswitchctl"
        assert commands(built.alone.run(kvswitchctl, "--help").stdout) == PRODUCT_COMMANDS
        refused = built.alone.run(kvswitchctl, "sandbox", check=False)
        assert refused.returncode == 2 and "invalid choice: 'sandbox'" in refused.stderr
