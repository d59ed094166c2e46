"""What the chart's containers do on a node, run here against temporary directories:

- scripts/build-cni-bundle.py (image build) packs Python, the package, host-local/portmap and
  every library they link, with the loader: wrappers must run with nothing from the host;
- scripts/install-cni.sh (agent init container) installs it, keeps the node's own plugins,
  upgrades by swapping wrappers;
- scripts/uninstall-cni.sh (uninstall hook) removes exactly what is ours;
- scripts/wait-for-cleanup.py (uninstall hook Job) waits on a fake API until all nodes are clean.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.test_chart import ROOT

SCRIPTS = ROOT / "scripts"
CNI_PLUGINS = Path("/usr/lib/cni")  # Debian's containernetworking-plugins, as in the image
MARK = "# k-vswitch-wrapper"


def sh(script: str, *args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(SCRIPTS / script), *args],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=check,
    )


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundle as the Dockerfile builds it, from this venv (kvswitchctl too: a second entry point)."""
    out = tmp_path_factory.mktemp("bundle") / "cni-bundle"
    subprocess.run(
        [
            sys.executable,
            str(SCRIPTS / "build-cni-bundle.py"),
            str(out),
            "--dist",
            "kvswitch",
            "--entry",
            "k-vswitch-cni",
            "--entry",
            "kvswitchctl",
            "--binary",
            str(CNI_PLUGINS / "host-local"),
            "--binary",
            str(CNI_PLUGINS / "portmap"),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return out


def make_node(root: Path) -> dict[str, Path]:
    """A node's CNI dirs, with the runtime's own portmap and another plugin's conflist already there."""
    dirs = {"bin": root / "opt-cni-bin", "conf": root / "etc-cni-net.d"}
    for d in dirs.values():
        d.mkdir(parents=True)
    (dirs["bin"] / "portmap").write_text("#!/bin/sh\necho node portmap\n")
    (dirs["bin"] / "portmap").chmod(0o755)
    (dirs["conf"] / "99-other.conflist").write_text("{}")
    return dirs


def install(bundle: Path, node: dict[str, Path]) -> subprocess.CompletedProcess[str]:
    return sh("install-cni.sh", env={"KVSWITCH_BUNDLE": str(bundle), "CNI_BIN_DIR": str(node["bin"])})


def uninstall(node: dict[str, Path], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {"CNI_BIN_DIR": str(node["bin"]), "CNI_CONF_DIR": str(node["conf"])}
    return sh("uninstall-cni.sh", *args, env=env, check=check)


def build_id(bundle: Path) -> str:
    return (bundle / "BUILD_ID").read_text().strip()


@pytest.fixture(scope="module")
def installed(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Path], str]:
    """The real bundle installed once on a fake node (copying it is the slow part)."""
    node = make_node(tmp_path_factory.mktemp("node"))
    return node, install(bundle, node).stdout


@pytest.fixture
def node(tmp_path: Path) -> dict[str, Path]:
    return make_node(tmp_path / "node")


@pytest.fixture
def tiny(tmp_path: Path) -> Any:
    """Makes small bundles shaped like the real one, for the install logic: each wrapper prints its id."""

    def make(build: str, names: tuple[str, ...] = ("k-vswitch-cni", "host-local", "portmap")) -> Path:
        root = tmp_path / f"bundle-{build}"
        (root / "wrappers").mkdir(parents=True)
        (root / "BUILD_ID").write_text(build + "\n")
        (root / "payload").write_text(build)
        for name in names:
            w = root / "wrappers" / name
            w.write_text(f'#!/bin/sh\n{MARK}: test\nb="${{0%/*}}/k-vswitch.d/{build}"\ncat "$b/payload"\n')
            w.chmod(0o755)
        return root

    return make


def run(path: Path) -> str:
    return subprocess.run([str(path)], env={}, capture_output=True, text=True, timeout=30, check=True).stdout


class TestBundle:
    def test_bundle_has_interpreter_loader_package_and_plugins(self, bundle: Path) -> None:
        assert (bundle / "lib" / "ld-linux-x86-64.so.2").exists()
        assert (bundle / "lib" / "libc.so.6").exists()
        assert (bundle / "bin" / "python3").exists()
        assert (bundle / "libexec" / "host-local").exists() and (bundle / "libexec" / "portmap").exists()
        assert sorted(p.name for p in (bundle / "wrappers").iterdir()) == [
            "host-local",
            "k-vswitch-cni",
            "kvswitchctl",
            "portmap",
        ]
        assert not (bundle / "MISSING-LIBRARIES").exists()

    def test_bundled_python_maps_no_library_of_the_host(self, bundle: Path) -> None:
        # Every shared object in the process comes from the bundle: the host's glibc never matters.
        code = (
            f"import site; site.addsitedir({str(bundle / 'site-packages')!r})\n"
            "import ssl, ctypes, json, sqlite3, pydantic_core, kvswitch.config\n"
            "print('\\n'.join(sorted({l.split()[-1] for l in open('/proc/self/maps') if '.so' in l})))"
        )
        loader = bundle / "lib" / "ld-linux-x86-64.so.2"
        proc = subprocess.run(
            [
                str(loader),
                "--library-path",
                str(bundle / "lib"),
                str(bundle / "bin" / "python3"),
                "-I",
                "-c",
                code,
            ],
            env={},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd="/",
        )
        assert proc.returncode == 0, proc.stderr
        objects = proc.stdout.split()
        assert any("pydantic_core" in o for o in objects)
        outside = [o for o in objects if not o.startswith(str(bundle) + "/")]
        assert outside == []


class TestRealInstall:
    def test_installs_wrappers_and_keeps_the_nodes_own_plugins(
        self, bundle: Path, installed: tuple[dict[str, Path], str]
    ) -> None:
        node, out = installed
        assert "keeping the node's own portmap" in out
        assert (node["bin"] / "portmap").read_text() == "#!/bin/sh\necho node portmap\n"
        for name in ("kvswitchctl", "host-local"):
            assert (node["bin"] / name).read_text().splitlines()[1].startswith(MARK)
            assert os.access(node["bin"] / name, os.X_OK)
        assert sorted(p.name for p in (node["bin"] / "k-vswitch.d").iterdir()) == [build_id(bundle)]

    def test_wrappers_run_with_an_empty_environment_from_anywhere(
        self, installed: tuple[dict[str, Path], str]
    ) -> None:
        node, _ = installed
        # As a container runtime runs a plugin: by full path, its own environment only.
        proc = subprocess.run(
            [str(node["bin"] / "kvswitchctl"), "--help"],
            env={},
            cwd="/",
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        assert "usage: kvswitchctl" in proc.stdout
        version = subprocess.run(
            [str(node["bin"] / "host-local")],
            env={"CNI_COMMAND": "VERSION"},
            input='{"cniVersion": "0.4.0"}',
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert version.returncode == 0, version.stderr
        assert "0.4.0" in json.loads(version.stdout)["supportedVersions"]

    def test_the_cni_plugin_answers_as_a_runtime_calls_it(
        self, installed: tuple[dict[str, Path], str]
    ) -> None:
        node, _ = installed
        plugin = str(node["bin"] / "k-vswitch-cni")
        version = subprocess.run(
            [plugin], env={"CNI_COMMAND": "VERSION"}, input='{"cniVersion": "1.0.0"}',
            capture_output=True, text=True, timeout=60, cwd="/",
        )  # fmt: skip
        assert version.returncode == 0, version.stderr
        assert "1.0.0" in json.loads(version.stdout)["supportedVersions"]
        # No CNI server listening: the plugin loads its whole implementation from the bundle and
        # runs the call itself; a missing netns must come back as a CNI error, not an ImportError.
        conf = {
            "cniVersion": "1.1.0",
            "name": "k",
            "type": "k-vswitch-cni",
            "serverSocket": "/nonexistent/cni.sock",
            "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.1.0.0/24"}]]},
        }
        env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/var/run/netns/k-vswitch-absent",
               "CNI_IFNAME": "eth0", "CNI_PATH": str(node["bin"])}  # fmt: skip
        add = subprocess.run(
            [plugin], env=env, input=json.dumps(conf), capture_output=True, text=True, timeout=60, cwd="/"
        )
        assert add.returncode == 1
        error = json.loads(add.stdout)
        assert error["code"] == 3 and "network namespace does not exist" in error["msg"], error

    def test_wrapper_found_through_path_works_too(self, installed: tuple[dict[str, Path], str]) -> None:
        node, _ = installed
        proc = subprocess.run(
            ["kvswitchctl", "--help"],
            env={"PATH": f"{node['bin']}:/usr/bin:/bin"},
            cwd="/",
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr


class TestInstallLogic:
    def test_rerun_is_a_no_op(self, tiny: Any, node: dict[str, Path]) -> None:
        bundle = tiny("aaaa")
        install(bundle, node)
        before = {p: p.stat().st_mtime_ns for p in (node["bin"] / "k-vswitch.d").rglob("*")}
        install(bundle, node)
        after = {p: p.stat().st_mtime_ns for p in (node["bin"] / "k-vswitch.d").rglob("*")}
        assert before == after

    def test_upgrade_switches_wrappers_and_drops_the_old_bundle(
        self, tiny: Any, node: dict[str, Path]
    ) -> None:
        install(tiny("aaaa"), node)
        assert run(node["bin"] / "k-vswitch-cni") == "aaaa"
        install(tiny("bbbb"), node)
        assert run(node["bin"] / "k-vswitch-cni") == "bbbb"
        assert run(node["bin"] / "host-local") == "bbbb"
        assert sorted(p.name for p in (node["bin"] / "k-vswitch.d").iterdir()) == ["bbbb"]
        assert not list(node["bin"].glob(".*"))  # no temporary files left

    def test_an_interrupted_copy_is_redone(self, tiny: Any, node: dict[str, Path]) -> None:
        bundle = tiny("aaaa")
        partial = node["bin"] / "k-vswitch.d" / ".partial-aaaa"
        partial.mkdir(parents=True)
        (partial / "junk").write_text("x")
        install(bundle, node)
        assert run(node["bin"] / "k-vswitch-cni") == "aaaa"
        assert not partial.exists()

    def test_a_plugin_of_the_node_is_never_replaced(self, tiny: Any, node: dict[str, Path]) -> None:
        install(tiny("aaaa"), node)
        assert run(node["bin"] / "portmap") == "node portmap\n"
        assert run(node["bin"] / "host-local") == "aaaa"  # absent before: ours


class TestUninstall:
    def test_removes_ours_and_only_ours(self, tiny: Any, node: dict[str, Path]) -> None:
        install(tiny("aaaa"), node)
        (node["conf"] / "10-k-vswitch.conflist").write_text("{}")  # what the agent writes
        assert uninstall(node, "--check", check=False).returncode == 1
        uninstall(node)
        assert sorted(p.name for p in node["bin"].iterdir()) == ["portmap"]
        assert run(node["bin"] / "portmap") == "node portmap\n"
        assert sorted(p.name for p in node["conf"].iterdir()) == ["99-other.conflist"]
        assert uninstall(node, "--check").returncode == 0

    def test_check_names_what_is_left(self, node: dict[str, Path]) -> None:
        (node["conf"] / "10-k-vswitch.conflist").write_text("{}")
        proc = uninstall(node, "--check", check=False)
        assert proc.returncode == 1
        assert f"{node['conf']}/10-k-vswitch.conflist" in proc.stdout

    def test_clean_node_is_fine(self, node: dict[str, Path]) -> None:
        uninstall(node)
        assert uninstall(node, "--check").returncode == 0
        assert (node["bin"] / "portmap").exists()


# --- the uninstall hook's waiter -----------------------------------------------------------------


def load_waiter() -> ModuleType:
    spec = importlib.util.spec_from_file_location("wait_for_cleanup", SCRIPTS / "wait-for-cleanup.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def daemonset(generation: int, observed: int | None, desired: int, ready: int) -> dict[str, Any]:
    status: dict[str, Any] = {"desiredNumberScheduled": desired, "numberReady": ready}
    if observed is not None:
        status["observedGeneration"] = observed
    return {
        "metadata": {"name": "k-vswitch-cleanup", "generation": generation},
        "spec": {"selector": {"matchLabels": {"app.kubernetes.io/component": "cleanup"}}},
        "status": status,
    }


class TestWaiterLogic:
    @pytest.mark.parametrize(
        ("ds", "done"),
        [
            (daemonset(1, None, 0, 0), False),  # not seen by the controller yet: 0/0 means nothing
            (daemonset(1, 1, 3, 2), False),
            (daemonset(1, 1, 3, 3), True),
            (daemonset(1, 1, 0, 0), True),  # no node to clean
        ],
    )
    def test_cleanup_done(self, ds: dict[str, Any], done: bool) -> None:
        assert load_waiter().cleanup_done(ds) is done

    def test_pending_nodes(self) -> None:
        pods = [
            {"spec": {"nodeName": "b"}, "status": {"conditions": [{"type": "Ready", "status": "False"}]}},
            {"spec": {"nodeName": "a"}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}},
            {"spec": {}, "status": {}},
        ]
        assert load_waiter().pending_nodes(pods) == ["?", "b"]


class FakeApi:
    """Serves the cleanup DaemonSet (ready after `ready_after` reads, if ever) and its pods."""

    def __init__(self, ready_after: int | None) -> None:
        self.reads = 0
        self.queries: list[str] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                api.queries.append(self.path)
                assert self.headers["Authorization"] == "Bearer t0ken"
                if self.path == "/apis/apps/v1/namespaces/kube-system/daemonsets/k-vswitch-cleanup":
                    api.reads += 1
                    ready = 2 if ready_after is not None and api.reads > ready_after else 1
                    body: dict[str, Any] = daemonset(1, 1, 2, ready)
                elif self.path.startswith("/api/v1/namespaces/kube-system/pods?"):
                    body = {
                        "items": [
                            {
                                "spec": {"nodeName": "node-a"},
                                "status": {"conditions": [{"type": "Ready", "status": "True"}]},
                            },
                            {"spec": {"nodeName": "node-b"}, "status": {"conditions": []}},
                        ]
                    }
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)

    def __enter__(self) -> FakeApi:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def waiter_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    token = tmp_path / "token"
    token.write_text("t0ken\n")
    yield {
        "DAEMONSET": "k-vswitch-cleanup",
        "NAMESPACE": "kube-system",
        "KUBE_TOKEN_FILE": str(token),
        "POLL_SECONDS": "0.05",
        "PATH": "/usr/bin:/bin",
    }


def run_waiter(api: FakeApi, env: dict[str, str], timeout: str) -> subprocess.CompletedProcess[str]:
    env = {**env, "KUBE_API_URL": f"http://127.0.0.1:{api.server.server_port}", "TIMEOUT_SECONDS": timeout}
    return subprocess.run(
        [sys.executable, str(SCRIPTS / "wait-for-cleanup.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


class TestWaiter:
    def test_returns_once_every_node_is_clean(self, waiter_env: dict[str, str]) -> None:
        with FakeApi(ready_after=3) as api:
            proc = run_waiter(api, waiter_env, timeout="10")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines() == ["1/2 nodes clean", "k-vswitch removed from all 2 nodes"]
        assert api.reads == 4

    def test_times_out_naming_the_nodes_left(self, waiter_env: dict[str, str]) -> None:
        with FakeApi(ready_after=None) as api:
            proc = run_waiter(api, waiter_env, timeout="0.3")
        assert proc.returncode == 1
        assert "did not finish within 0s on: node-b." in proc.stderr
        # Only the cleanup DaemonSet's own pods are listed.
        assert (
            api.queries[-1]
            == "/api/v1/namespaces/kube-system/pods?labelSelector=app.kubernetes.io%2Fcomponent%3Dcleanup"
        )
