"""The chart-driven sandbox: the Helm chart's own pod specs, run as a kubelet would, with podman.

``helm template`` renders the chart for the sandbox's values; the objects go into the fake API
server; then, where a kubelet would start containers, podman starts them from the built image
(``make image``):

- every node runs the agent DaemonSet's pod: its init containers one after the other, then the
  agent container; the controller Deployment's pod runs on the first node its nodeSelector allows;
- each container gets the rendered command, args and env (``fieldRef`` and ConfigMap values
  resolved), its volume mounts (a ``hostPath`` becomes that node's own directory, an ``emptyDir``
  a tmpfs, the service account's token a projected directory), the pod's network (hostNetwork:
  the node's namespace, ``--network ns:/run/netns/<node>``) and its security context (user, read-only
  root, capabilities, no-new-privileges, seccomp);
- ``helm uninstall``: the release's objects and pods go, then the post-delete hooks run the same
  way (the cleanup DaemonSet on every node, the Job that waits for it) and are deleted.

Pods of the sandbox are wired by the CNI plugin and conflist that the init container and the agent
put on the node, exec'd with the node's filesystem view (:mod:`kvswitch_testbed.nodeview`).

The API server answers plain HTTP; the pods reach it the way pods do, in-cluster: a TLS front on
``API_TLS_IP:6443`` (the chart's ``apiServer.host``/``port``) with its own CA, and the service
account's ``token``, ``ca.crt`` and ``namespace`` mounted at the usual path. No kubeconfig enters
a container.

:data:`LIMITS` names every rendered field that does not run as on a cluster, and why; a field the
translation neither handles nor lists fails the run (:class:`Untranslatable`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kvswitch.kernel.netns import in_netns
from kvswitch_testbed.bed import RUN_PREFIX, UNDERLAY, UNDERLAY_BRIDGE, Node
from kvswitch_testbed.cluster import SYSTEM_CNI_DIR, Cluster, Process
from kvswitch_testbed.cni_runner import ConfList, Plugins
from kvswitch_testbed.kubeclient import ApiError
from kvswitch_testbed.netns import netns_socket, run

RELEASE = "k-vswitch"
NAMESPACE = "kube-system"
API_TLS_IP = str(UNDERLAY.network_address + 2)
API_TLS_PORT = 6443
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager=cgroupfs"]
RUN_LABEL = "io.kvswitch.testbed.run"  # every container carries its run id: clean-runs finds them
NODEVIEW = Path(__file__).resolve().parent / "nodeview.py"
WRAPPER_MARK = "# k-vswitch-wrapper"  # scripts/build-cni-bundle.py's mark on the files it installs

# Rendered fields that do not run here as on a cluster, and why (docs/install.md repeats them).
LIMITS: dict[str, str] = {
    "imagePullPolicy": "the image is local (podman --pull=never); there is no registry to pull from",
    "imagePullSecrets": "no registry",
    "priorityClassName": "no scheduler or eviction: every pod fits on its node",
    "tolerations": "the sandbox's nodes carry no taints, so every toleration holds trivially",
    "livenessProbe": "probed like a readiness probe, but a failure restarts nothing: no kubelet restart loop",
    "resources.requests.memory": "a scheduling input only; there is no scheduler",
    "updateStrategy": "no rollouts: one install, one uninstall",
    "strategy": "no rollouts: one install, one uninstall",
    "ValidatingAdmissionPolicy": (
        "the sandbox's API server does not evaluate admission policies "
        "(tests/test_chart_rbac.py evaluates its CEL)"
    ),
    "ValidatingAdmissionPolicyBinding": "as ValidatingAdmissionPolicy",
    "serviceAccountName": (
        "the token is mounted, but the API server checks no authentication or RBAC "
        "(tests/test_chart_rbac.py checks the rules)"
    ),
}

# Keys the translation below handles; anything else in a rendered pod is Untranslatable.
POD_KEYS = {
    "serviceAccountName", "automountServiceAccountToken", "hostNetwork", "dnsPolicy", "priorityClassName",
    "terminationGracePeriodSeconds", "imagePullSecrets", "nodeSelector", "tolerations", "securityContext",
    "initContainers", "containers", "volumes", "restartPolicy",
}  # fmt: skip
CONTAINER_KEYS = {
    "name", "image", "imagePullPolicy", "command", "args", "env", "envFrom", "ports", "livenessProbe",
    "readinessProbe", "resources", "securityContext", "volumeMounts",
}  # fmt: skip
SECURITY_KEYS = {
    "runAsUser", "runAsGroup", "runAsNonRoot", "readOnlyRootFilesystem", "privileged",
    "allowPrivilegeEscalation", "capabilities", "seccompProfile",
}  # fmt: skip
NAMESPACED = {"ServiceAccount", "ConfigMap", "Role", "RoleBinding", "DaemonSet", "Deployment", "Job", "Pod"}
WORKLOADS = {"DaemonSet", "Deployment", "Job"}


class Untranslatable(ValueError):
    """A rendered field that this kubelet stand-in cannot honour and that LIMITS does not name."""


class PodFailed(RuntimeError):
    """An init container, or a Job's container, exited non-zero (or timed out)."""


# --- finding things -------------------------------------------------------------------------


def repo_root() -> Path:
    """The checkout holding the chart: from the working directory up, then from this file up."""
    for start in (Path.cwd(), Path(__file__).resolve().parent):
        for d in (start, *start.parents):
            if (d / "charts" / "k-vswitch" / "Chart.yaml").is_file():
                return d
    raise FileNotFoundError("no charts/k-vswitch above the working directory: run from the checkout")


def helm_binary(root: Path) -> str:
    local = root / ".tools" / "bin" / "helm"
    if local.is_file():
        return str(local)
    found = shutil.which("helm")
    if found is None:
        raise FileNotFoundError("helm not found: `make tools` puts it into .tools/bin")
    return found


def podman_env(root: Path | None = None) -> dict[str, str]:
    conf = os.environ.get("CONTAINERS_CONF") or str((root or repo_root()) / "scripts" / "containers.conf")
    return {**os.environ, "CONTAINERS_CONF": conf}


def podman(
    *args: str, env: Mapping[str, str] | None = None, check: bool = True, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [*PODMAN, *args],
        capture_output=True,
        text=True,
        env=dict(env or podman_env()),
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args[:3])} ... exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def image_exists(image: str, env: Mapping[str, str] | None = None) -> bool:
    return podman("image", "exists", image, env=env, check=False).returncode == 0


def build_image(root: Path) -> None:
    """``make image``: installs podman and friends if missing, builds the base once, then the image."""
    subprocess.run(["make", "-C", str(root), "image"], check=True)


def remove_run_containers(run_id: str) -> int:
    """Remove every container of one run (clean-runs after a killed sandbox); returns how many."""
    if shutil.which("podman") is None:
        return 0
    with contextlib.suppress(FileNotFoundError):
        env = podman_env()
        ids = podman(
            "ps", "-aq", "--filter", f"label={RUN_LABEL}={run_id}", env=env, check=False
        ).stdout.split()
        if ids:
            podman("rm", "-f", "-t", "2", *ids, env=env, check=False)
        return len(ids)
    return 0


# --- quantities and small helpers -----------------------------------------------------------

_BINARY = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}
_DECIMAL = {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def memory_bytes(quantity: str | int) -> int:
    q = str(quantity)
    for suffix, mult in {**_BINARY, **_DECIMAL}.items():
        if q.endswith(suffix):
            return int(float(q[: -len(suffix)]) * mult)
    return int(q)


def millicpu(quantity: str | int) -> int:
    q = str(quantity)
    return int(q[:-1]) if q.endswith("m") else int(float(q) * 1000)


def plural(kind: str) -> str:
    k = kind.lower()
    return k[:-1] + "ies" if k.endswith("y") else k + "s"


def api_path(obj: Mapping[str, Any], with_name: bool = False) -> str:
    group_version = obj["apiVersion"]
    base = f"/api/{group_version}" if "/" not in group_version else f"/apis/{group_version}"
    ns = obj["metadata"].get("namespace") or NAMESPACE
    scope = f"/namespaces/{ns}" if obj["kind"] in NAMESPACED else ""
    path = f"{base}{scope}/{plural(obj['kind'])}"
    return f"{path}/{obj['metadata']['name']}" if with_name else path


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _suffix(n: int = 5) -> str:
    alphabet = "bcdfghjklmnpqrstvwxz2456789"  # the API server's generateName alphabet
    return "".join(secrets.choice(alphabet) for _ in range(n))


def normalise(path: str) -> str:
    """Host paths compare as the machine resolves them: /var/run is /run."""
    p = "/" + path.strip("/")
    return "/run" + p[len("/var/run") :] if p == "/var/run" or p.startswith("/var/run/") else p


def hooks_of(obj: Mapping[str, Any]) -> list[str]:
    ann = (obj.get("metadata") or {}).get("annotations") or {}
    return [h.strip() for h in str(ann.get("helm.sh/hook", "")).split(",") if h.strip()]


def hook_weight(obj: Mapping[str, Any]) -> int:
    ann = (obj.get("metadata") or {}).get("annotations") or {}
    return int(ann.get("helm.sh/hook-weight", "0"))


# --- the chart ------------------------------------------------------------------------------


@dataclass
class Rendered:
    crds: list[dict[str, Any]]
    objects: list[dict[str, Any]]  # the release's objects, in helm's install order
    hooks: dict[str, list[dict[str, Any]]]  # hook name -> objects, by weight

    def find(self, kind: str, component: str | None = None) -> list[dict[str, Any]]:
        every = self.objects + [o for objs in self.hooks.values() for o in objs]
        return [
            o
            for o in every
            if o["kind"] == kind
            and (
                component is None
                or o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component
            )
        ]


def render(
    root: Path, values: Mapping[str, Any], release: str = RELEASE, namespace: str = NAMESPACE
) -> Rendered:
    """``helm template --include-crds`` of the chart with ``values`` (a values file, as a user's)."""
    with _values_file(values) as vf:
        proc = subprocess.run(
            [helm_binary(root), "template", release, str(root / "charts" / "k-vswitch"), "-n", namespace,
             "--include-crds", "-f", str(vf)],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"helm template failed: {proc.stderr.strip()}")
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    crds = [d for d in docs if d["kind"] == "CustomResourceDefinition"]
    plain = [d for d in docs if d["kind"] != "CustomResourceDefinition" and not hooks_of(d)]
    hooks: dict[str, list[dict[str, Any]]] = {}
    for d in docs:
        for h in hooks_of(d):
            hooks.setdefault(h, []).append(d)
    for objs in hooks.values():
        objs.sort(key=hook_weight)
    return Rendered(crds, plain, hooks)


@contextlib.contextmanager
def _values_file(values: Mapping[str, Any]) -> Any:
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="kvs-values-") as f:
        yaml.safe_dump(dict(values), f)
        f.flush()
        yield Path(f.name)


def check_translatable(rendered: Rendered) -> list[str]:
    """Every field of every rendered pod either handled or named in LIMITS; returns the LIMITS keys
    the chart uses (raises :class:`Untranslatable` for anything else)."""
    used: set[str] = set()
    for kind in ("ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"):
        if rendered.find(kind):
            used.add(kind)
    for w in [
        o
        for o in [*rendered.objects, *(o for objs in rendered.hooks.values() for o in objs)]
        if o["kind"] in WORKLOADS
    ]:
        name = f"{w['kind']}/{w['metadata']['name']}"
        spec = w["spec"]
        for key in ("updateStrategy", "strategy"):
            if key in spec:
                used.add(key)
        pod = spec["template"]["spec"]
        unknown = set(pod) - POD_KEYS
        if unknown:
            raise Untranslatable(f"{name}: pod fields {sorted(unknown)}")
        if pod.get("hostNetwork") is not True:
            raise Untranslatable(
                f"{name}: only hostNetwork pods run here (no pod network for the chart's own pods)"
            )
        if pod.get("dnsPolicy", "Default") != "Default":
            raise Untranslatable(f"{name}: dnsPolicy {pod['dnsPolicy']} (cluster DNS) is not served here")
        used |= {
            k
            for k in ("priorityClassName", "tolerations", "imagePullSecrets", "serviceAccountName")
            if k in pod
        }
        if set(pod.get("securityContext") or {}) - SECURITY_KEYS:
            raise Untranslatable(
                f"{name}: pod securityContext {sorted(set(pod['securityContext']) - SECURITY_KEYS)}"
            )
        for v in pod.get("volumes") or []:
            if not ({"hostPath", "emptyDir"} & set(v)):
                raise Untranslatable(f"{name}: volume {v['name']} of a kind other than hostPath/emptyDir")
        for c in (pod.get("initContainers") or []) + pod["containers"]:
            where = f"{name} container {c['name']}"
            if set(c) - CONTAINER_KEYS:
                raise Untranslatable(f"{where}: fields {sorted(set(c) - CONTAINER_KEYS)}")
            if set(c.get("securityContext") or {}) - SECURITY_KEYS:
                raise Untranslatable(
                    f"{where}: securityContext {sorted(set(c['securityContext']) - SECURITY_KEYS)}"
                )
            if "imagePullPolicy" in c:
                used.add("imagePullPolicy")
                if c["imagePullPolicy"] == "Always":
                    raise Untranslatable(f"{where}: imagePullPolicy Always needs a registry")
            if "livenessProbe" in c:
                used.add("livenessProbe")
            if "memory" in ((c.get("resources") or {}).get("requests") or {}):
                used.add("resources.requests.memory")
            for e in c.get("env") or []:
                ref = (e.get("valueFrom") or {}).keys() - {"fieldRef", "configMapKeyRef"}
                if ref:
                    raise Untranslatable(f"{where}: env {e['name']} from {sorted(ref)}")
            for p in (c.get("readinessProbe"), c.get("livenessProbe")):
                if p and not ({"httpGet", "exec"} & set(p)):
                    raise Untranslatable(f"{where}: probe of kind {sorted(p)}")
    return sorted(used)


# --- the API server's TLS front -------------------------------------------------------------


def make_pki(directory: Path, ip: str) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for ``ip`` (as kubeadm's apiserver.crt); returns ca, crt, key."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / "ca.crt", directory / "ca.key"
    crt, key, csr, ext = (
        directory / "apiserver.crt",
        directory / "apiserver.key",
        directory / "apiserver.csr",
        directory / "ext.cnf",
    )
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run(["openssl", "req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca), "-days", "7",
         "-subj", "/CN=kvswitch-testbed-ca"])  # fmt: skip
    run(["openssl", "req", *ec, "-keyout", str(key), "-out", str(csr), "-subj", "/CN=kube-apiserver"])
    ext.write_text(
        f"subjectAltName=IP:{ip},DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc\n"
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
    )
    run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
         "-out", str(crt), "-days", "7", "-extfile", str(ext)])  # fmt: skip
    return ca, crt, key


# --- the kubelet's part ---------------------------------------------------------------------


@dataclass
class PodRun:
    """One pod of a workload on one node, as podman containers."""

    name: str
    namespace: str
    node: Node
    workload: dict[str, Any]
    spec: dict[str, Any]
    containers: dict[str, str] = field(default_factory=dict)  # container name -> podman name
    processes: dict[str, Process] = field(default_factory=dict)  # long-running containers
    ready: bool = False
    exit_codes: dict[str, int] = field(default_factory=dict)
    next_probe: dict[str, float] = field(default_factory=dict)  # container -> when its probe is due
    probe_ok: dict[str, bool] = field(default_factory=dict)

    @property
    def labels(self) -> dict[str, str]:
        labels: dict[str, str] = self.workload["spec"]["template"]["metadata"].get("labels") or {}
        return labels


@dataclass
class ChartCluster(Cluster):
    """:class:`Cluster` whose controller and agents are the chart's pods, run by podman."""

    release: str = RELEASE
    namespace: str = NAMESPACE
    extra_values: dict[str, Any] = field(default_factory=dict)
    root: Path = field(default_factory=repo_root)
    rendered: Rendered | None = None
    limits_used: list[str] = field(default_factory=list)
    not_served: list[str] = field(default_factory=list)  # rendered kinds the API server refused
    pod_runs: dict[str, PodRun] = field(default_factory=dict)
    uninstall_log: list[str] = field(default_factory=list)
    logs: dict[str, str] = field(default_factory=dict)  # "<pod>-<container>" -> its output, kept at stop()
    commands: dict[str, list[str]] = field(default_factory=dict)  # "<pod>/<container>" -> podman run args
    appctl_check: tuple[int, str] | None = None  # ovs-appctl from the agent's pod, as the agent runs it
    _tls: Any = None
    _pki: tuple[Path, Path, Path] | None = None
    _prober: threading.Thread | None = None
    _probing: threading.Event = field(default_factory=threading.Event)
    _probe_stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.RLock = field(default_factory=threading.RLock)

    # --- values and image ---------------------------------------------------------------

    @property
    def values(self) -> dict[str, Any]:
        """What a user of this sandbox would pass to ``helm install``: the bed's CIDRs and overlay, the
        API server's address (no kube-proxy for hostNetwork pods here) and the userspace datapath."""
        base: dict[str, Any] = {
            "clusterCIDR": self.cluster_cidr,
            "serviceCIDR": self.service_cidr,
            "overlayType": self.overlay,
            "serviceProxy": self.service_proxy,
            "apiServer": {"host": API_TLS_IP, "port": API_TLS_PORT},
            "agent": {"datapathType": "netdev"},
        }
        return _merge(base, self.extra_values)

    @property
    def env(self) -> dict[str, str]:
        return podman_env(self.root)

    @property
    def image(self) -> str:
        assert self.rendered is not None
        ds = self.rendered.find("DaemonSet", "agent")[0]
        image: str = ds["spec"]["template"]["spec"]["containers"][0]["image"]
        return image

    # --- start: hooks of Cluster.start ---------------------------------------------------

    def start(self) -> ChartCluster:
        self.rendered = render(self.root, self.values, self.release, self.namespace)
        self.limits_used = check_translatable(self.rendered)
        if not image_exists(self.image, self.env):
            raise RuntimeError(f"image {self.image} is not built: run `make image`")
        super().start()
        # What the agent does for conntrack flushes and megaflow purges: ovs-appctl -t ovs-vswitchd,
        # from its pod (no hostPID). Kept for the report and tests/test_chart_sandbox.py.
        agent = next(p for p in self.pod_runs.values() if p.workload["kind"] == "DaemonSet")
        # what the agent runs (kvswitch.ovs.appctl finds vswitchd's control socket itself)
        probe = (
            "import subprocess, sys; from kvswitch.ovs.appctl import vswitchd_target; "
            "sys.exit(subprocess.run(['ovs-appctl', '-t', vswitchd_target(), 'version']).returncode)"
        )
        res = podman("exec", agent.containers[agent.spec["containers"][0]["name"]],
                     "python3", "-c", probe, env=self.env, check=False)  # fmt: skip
        self.appctl_check = (res.returncode, (res.stdout + res.stderr).strip())
        return self

    def start_controller(self) -> Process:
        """Called by Cluster.start once the API server runs: install the chart, run the controller."""
        self._start_tls_front()
        self._install()
        self._start_prober()
        deploy = self._rendered().find("Deployment", "controller")[0]
        pod = self._run_pod(deploy, self._schedule(deploy)[0])
        return next(iter(pod.processes.values()))

    def start_agent(self, node: Node) -> Process:
        ds = self._rendered().find("DaemonSet", "agent")[0]
        old = [p for p in self.pod_runs.values() if p.workload is ds and p.node is node]
        for p in old:
            self._stop_pod(p)
        pod = self._run_pod(ds, node)
        return pod.processes[ds["spec"]["template"]["spec"]["containers"][0]["name"]]

    def _create_node_object(self, node: Node) -> None:
        super()._create_node_object(node)
        # The labels a kubelet puts on its Node: the chart's nodeSelectors match on them.
        labels = {
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "kubernetes.io/hostname": node.name,
        }
        self.client.patch(f"/api/v1/nodes/{node.name}", {"metadata": {"labels": labels}})

    def _path(self, obj: Mapping[str, Any]) -> str:
        """The API path of a rendered object, in the release's namespace when it names none."""
        meta = {**obj["metadata"], "namespace": obj["metadata"].get("namespace") or self.namespace}
        return api_path({**obj, "metadata": meta}, with_name=True)

    def _rendered(self) -> Rendered:
        assert self.rendered is not None, "not started"
        return self.rendered

    # --- TLS front: what the pods reach ----------------------------------------------------

    def _start_tls_front(self) -> None:
        import asyncio
        import ssl

        assert self.api is not None
        run(
            ["ip", "addr", "add", f"{API_TLS_IP}/{UNDERLAY.prefixlen}", "dev", UNDERLAY_BRIDGE],
            self.bed.underlay_ns,
        )
        self._pki = make_pki(self.workdir / "pki", API_TLS_IP)
        ca, crt, key = self._pki
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(crt), str(key))
        upstream = self.client.base_url.removeprefix("http://").rsplit(":", 1)
        up_host, up_port = upstream[0], int(upstream[1])
        sock = netns_socket(self.bed.underlay_ns, socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((API_TLS_IP, API_TLS_PORT))
        sock.listen(128)
        sock.setblocking(False)

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, OSError, asyncio.CancelledError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    writer.close()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                up_reader, up_writer = await asyncio.open_connection(up_host, up_port)
            except OSError:
                writer.close()
                return
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

        async def serve() -> Any:
            return await asyncio.start_server(handle, sock=sock, ssl=ctx)

        self._tls = self.api.run(serve())
        self.say(f"API server for the pods: https://{API_TLS_IP}:{API_TLS_PORT} (TLS, CA {ca})")

    def _stop_tls_front(self) -> None:
        if self._tls is None or self.api is None:
            return
        server = self._tls
        self._tls = None

        async def close() -> None:
            server.close()

        with contextlib.suppress(Exception):
            self.api.run(close())

    # --- install: what helm creates ----------------------------------------------------------

    def _install(self) -> None:
        rendered = self._rendered()
        self._ensure_namespace()
        for crd in rendered.crds:
            self._create(crd)
        for obj in rendered.objects:
            self._create(obj)
        served = [o["kind"] for o in rendered.objects if o["kind"] not in self.not_served]
        refused = sorted(set(self.not_served)) or "none"
        self.say(
            f"helm template: {len(rendered.objects)} objects + {len(rendered.crds)} CRDs created "
            f"({len(served)} served; not served by the sandbox's API server: {refused})"
        )

    def _ensure_namespace(self) -> None:
        if self.client.get(f"/api/v1/namespaces/{self.namespace}") is None:
            self.client.create(
                "/api/v1/namespaces",
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": self.namespace}},
            )

    def _create(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        body = copy.deepcopy(obj)
        if body["kind"] in NAMESPACED:
            body["metadata"].setdefault("namespace", self.namespace)
        try:
            created: dict[str, Any] = self.client.create(api_path(body), body)
            return created
        except ApiError as exc:
            if exc.status == 409:  # helm skips CRDs that exist
                return None
            if exc.status == 404:
                self.not_served.append(body["kind"])
                return None
            raise

    def _delete(self, obj: Mapping[str, Any]) -> None:
        with contextlib.suppress(ApiError):
            self.client.delete(self._path(obj))

    # --- scheduling --------------------------------------------------------------------------

    def _schedule(self, workload: Mapping[str, Any]) -> list[Node]:
        """Nodes whose labels match the pod's nodeSelector (no taints here: tolerations hold)."""
        selector = workload["spec"]["template"]["spec"].get("nodeSelector") or {}
        fits = []
        for node in sorted(self.bed.nodes.values(), key=lambda n: n.name):
            obj = self.client.get(f"/api/v1/nodes/{node.name}") or {}
            labels = (obj.get("metadata") or {}).get("labels") or {
                "kubernetes.io/os": "linux", "kubernetes.io/hostname": node.name,
            }  # fmt: skip
            if all(labels.get(k) == v for k, v in selector.items()):
                fits.append(node)
        if not fits:
            raise RuntimeError(
                f"no node fits {workload['kind']}/{workload['metadata']['name']}'s nodeSelector {selector}"
            )
        return fits

    # --- a node's directories ----------------------------------------------------------------

    def host_dir(self, node: Node, path: str) -> Path:
        """The directory that stands for host path ``path`` on ``node``."""
        hp = self.values_host_paths()
        p = normalise(path)
        if p == normalise(hp["ovsRunDir"]):
            return node.ovs.workdir
        if p == normalise(hp["netnsDir"]):
            return Path("/run/netns")  # pods' namespaces live where `ip netns` puts them
        d = self.node_dir(node)
        named = {
            normalise(hp["cniConfDir"]): "net.d",
            normalise(hp["cniBinDir"]): "cni-bin",
            normalise(hp["ipamDataDir"]): "ipam",
        }
        if p in named:
            return d / named[p]  # where Cluster looks for them
        return d / "host" / p.lstrip("/")

    def audit_log(self, node: Node) -> Path:
        """The chart's agent writes it under ``hostPaths.auditLogDir`` (mounted from the node)."""
        return self.host_dir(node, self.values_host_paths()["auditLogDir"]) / "np.log"

    def values_host_paths(self) -> dict[str, str]:
        defaults = yaml.safe_load((self.root / "charts" / "k-vswitch" / "values.yaml").read_text())[
            "hostPaths"
        ]
        paths: dict[str, str] = {**defaults, **(self.values.get("hostPaths") or {})}
        return paths

    def node_mounts(self, node: Node) -> list[tuple[str, str]]:
        """(host path, node directory) for every hostPath the agent's pod mounts, but /run/netns."""
        ds = self._rendered().find("DaemonSet", "agent")[0]
        out = []
        for v in ds["spec"]["template"]["spec"].get("volumes") or []:
            if "hostPath" in v:
                path = v["hostPath"]["path"]
                real = self.host_dir(node, path)
                if str(real) != normalise(path):
                    real.mkdir(parents=True, exist_ok=True)
                    out.append((path, str(real)))
        return out

    def conflist(self, node: Node) -> ConfList:
        """The conflist the agent wrote, run as the node's runtime would: plugins from the node's CNI
        bin dir and the runtime's own, with the node's filesystem view."""
        hp = self.values_host_paths()
        path = self.host_dir(node, hp["cniConfDir"]) / "10-k-vswitch.conflist"
        launchers = self.node_dir(node) / "kubelet-cni"
        spec = launchers / "view.json"
        if not spec.exists():
            launchers.mkdir(parents=True, exist_ok=True)
            spec.write_text(json.dumps({"mounts": self.node_mounts(node)}))
        plugins = NodeViewPlugins(
            [normalise(hp["cniBinDir"]), SYSTEM_CNI_DIR], netns=node.netns, launchers=launchers
        )
        return ConfList(json.loads(path.read_text()), plugins)

    # --- running pods ------------------------------------------------------------------------

    def _run_pod(self, workload: dict[str, Any], node: Node) -> PodRun:
        kind, wname = workload["kind"], workload["metadata"]["name"]
        name = f"{wname}-{_suffix(10)}-{_suffix()}" if kind == "Deployment" else f"{wname}-{_suffix()}"
        spec = copy.deepcopy(workload["spec"]["template"]["spec"])
        pod = PodRun(name, workload["metadata"].get("namespace") or self.namespace, node, workload, spec)
        with self._lock:
            self.pod_runs[name] = pod
        self._create_pod_object(pod)
        pod_dir = self.workdir / "pods" / name
        pod_dir.mkdir(parents=True, exist_ok=True)
        for c in spec.get("initContainers") or []:
            code, out = self._run_to_completion(pod, c, pod_dir, timeout=120)
            if code != 0:
                raise PodFailed(f"init container {c['name']} of {name} on {node.name} exited {code}:\n{out}")
            last = out.strip().splitlines()[-1] if out.strip() else "no output"
            self.say(f"  {name} on {node.name}: init container {c['name']} done ({last})")
        for c in spec["containers"]:
            pod.processes[c["name"]] = self._start_container(pod, c, pod_dir)
        self._report_pod_status(pod)
        started = ", ".join(c["name"] for c in spec["containers"])
        self.say(f"  {name} on {node.name}: {started} started ({kind} {wname})")
        return pod

    def _create_pod_object(self, pod: PodRun) -> None:
        w = pod.workload
        spec = {**copy.deepcopy(pod.spec), "nodeName": pod.node.name}
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": pod.name,
                "namespace": pod.namespace,
                "labels": pod.labels,
                "annotations": w["spec"]["template"]["metadata"].get("annotations") or {},
                "ownerReferences": [
                    {
                        "apiVersion": w["apiVersion"],
                        "kind": w["kind"],
                        "name": w["metadata"]["name"],
                        "uid": self._uid_of(w),
                        "controller": True,
                    }
                ],
            },
            "spec": spec,
        }
        self.client.create(f"/api/v1/namespaces/{pod.namespace}/pods", body)

    def _uid_of(self, obj: Mapping[str, Any]) -> str:
        live = self.client.get(self._path(obj))
        uid: str = ((live or {}).get("metadata") or {}).get("uid") or "00000000-0000-0000-0000-000000000000"
        return uid

    def _container_name(self, pod: PodRun, c: Mapping[str, Any]) -> str:
        return f"{RUN_PREFIX}{self.bed.run_id}-{pod.name}-{c['name']}"

    def podman_args(self, pod: PodRun, c: Mapping[str, Any], pod_dir: Path) -> list[str]:
        """``podman run`` arguments for container ``c`` of ``pod``: the kubelet's translation."""
        spec, node = pod.spec, pod.node
        args = [
            "run", "--name", self._container_name(pod, c), "--label", f"{RUN_LABEL}={self.bed.run_id}",
            "--label", f"io.kubernetes.pod.name={pod.name}",
            "--label", f"io.kubernetes.container.name={c['name']}",
            "--pull=never", "--log-driver=none",
        ]  # fmt: skip
        # network: hostNetwork pods share the node's namespace (and its name as hostname, as its UTS)
        args += ["--network", f"ns:/run/netns/{node.netns}", "--hostname", node.name]
        # command and args: command replaces the image's entrypoint (and drops its CMD), args its CMD
        if c.get("command"):
            args += ["--entrypoint", json.dumps(c["command"])]
        # security context: the container's over the pod's
        sc = {**(spec.get("securityContext") or {}), **(c.get("securityContext") or {})}
        user = sc.get("runAsUser")
        if user is not None:
            args += ["--user", f"{user}:{sc['runAsGroup']}" if "runAsGroup" in sc else str(user)]
        if sc.get("runAsNonRoot") and user in (0, None):
            image_user = podman(
                "image", "inspect", "--format", "{{.Config.User}}", str(c["image"]), env=self.env
            ).stdout.strip()
            if user == 0 or image_user.split(":")[0] in ("", "0", "root"):
                raise PodFailed(f"{pod.name}/{c['name']}: runAsNonRoot, but it would run as root")
        if sc.get("readOnlyRootFilesystem"):
            args += ["--read-only", "--read-only-tmpfs=false"]
        if sc.get("privileged"):
            args.append("--privileged")
        caps = sc.get("capabilities") or {}
        args += [f"--cap-drop={cap}" for cap in caps.get("drop") or []]
        args += [f"--cap-add={cap}" for cap in caps.get("add") or []]
        if sc.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        seccomp = (sc.get("seccompProfile") or {}).get("type", "RuntimeDefault")
        if seccomp == "Unconfined":
            args += ["--security-opt", "seccomp=unconfined"]
        elif seccomp != "RuntimeDefault":
            raise Untranslatable(f"{pod.name}/{c['name']}: seccompProfile {seccomp}")
        # resources: memory limits are enforced, cpu requests become shares (as the kubelet sets them)
        res = c.get("resources") or {}
        if "memory" in (res.get("limits") or {}):
            args += ["--memory", str(memory_bytes(res["limits"]["memory"]))]
        if "cpu" in (res.get("limits") or {}):
            args += ["--cpus", str(millicpu(res["limits"]["cpu"]) / 1000)]
        if "cpu" in (res.get("requests") or {}):
            args += ["--cpu-shares", str(max(2, millicpu(res["requests"]["cpu"]) * 1024 // 1000))]
        args += ["--stop-timeout", str(spec.get("terminationGracePeriodSeconds", 30))]
        # environment
        for k, v in self._env(pod, c).items():
            args += ["--env", f"{k}={v}"]
        # volumes
        args += self._mounts(pod, c, pod_dir)
        args.append(str(c["image"]))
        args += [str(a) for a in c.get("args") or []]
        self.commands[f"{pod.name}/{c['name']}"] = list(args)
        return args

    def _env(self, pod: PodRun, c: Mapping[str, Any]) -> dict[str, str]:
        env: dict[str, str] = {}
        # The kubelet's own: the API server's Service (the chart's explicit env wins over it).
        svc = self.client.get("/api/v1/namespaces/default/services/kubernetes")
        if svc and (svc.get("spec") or {}).get("clusterIP"):
            port = str(svc["spec"]["ports"][0]["port"])
            env |= {"KUBERNETES_SERVICE_HOST": svc["spec"]["clusterIP"], "KUBERNETES_SERVICE_PORT": port,
                    "KUBERNETES_SERVICE_PORT_HTTPS": port}  # fmt: skip
        for src in c.get("envFrom") or []:
            ref = src.get("configMapRef")
            if ref is None:
                raise Untranslatable(f"{pod.name}/{c['name']}: envFrom {sorted(src)}")
            cm = self.client.get(f"/api/v1/namespaces/{pod.namespace}/configmaps/{ref['name']}")
            if cm is None:
                raise PodFailed(f"{pod.name}/{c['name']}: ConfigMap {ref['name']} not found")
            env |= {src.get("prefix", "") + k: str(v) for k, v in (cm.get("data") or {}).items()}
        for e in c.get("env") or []:
            if "value" in e or "valueFrom" not in e:
                env[e["name"]] = str(e.get("value", ""))
                continue
            vf = e["valueFrom"]
            if "fieldRef" in vf:
                env[e["name"]] = self._field(pod, vf["fieldRef"]["fieldPath"])
            else:
                ref = vf["configMapKeyRef"]
                cm = self.client.get(f"/api/v1/namespaces/{pod.namespace}/configmaps/{ref['name']}") or {}
                env[e["name"]] = str((cm.get("data") or {})[ref["key"]])
        return env

    def _field(self, pod: PodRun, path: str) -> str:
        fields = {
            "metadata.name": pod.name,
            "metadata.namespace": pod.namespace,
            "spec.nodeName": pod.node.name,
            "spec.serviceAccountName": pod.spec.get("serviceAccountName", "default"),
            "status.hostIP": pod.node.underlay_ip,
            "status.podIP": pod.node.underlay_ip,  # hostNetwork
        }
        value = fields.get(path)
        if value is None:
            raise Untranslatable(f"{pod.name}: fieldRef {path}")
        return str(value)

    def _mounts(self, pod: PodRun, c: Mapping[str, Any], pod_dir: Path) -> list[str]:
        volumes = {v["name"]: v for v in pod.spec.get("volumes") or []}
        args: list[str] = []
        propagation = {"HostToContainer": "rslave", "Bidirectional": "rshared", "None": "rprivate"}
        for m in c.get("volumeMounts") or []:
            v = volumes[m["name"]]
            opts = ["ro" if m.get("readOnly") else "rw", propagation[m.get("mountPropagation", "None")]]
            if "hostPath" in v:
                hp = v["hostPath"]
                src = self.host_dir(pod.node, hp["path"])
                kind = hp.get("type", "")
                if kind == "Directory" and not src.is_dir():
                    raise PodFailed(
                        f"{pod.name}: hostPath {hp['path']} (type Directory) is not on {pod.node.name}"
                    )
                if kind == "DirectoryOrCreate":
                    src.mkdir(parents=True, exist_ok=True)
                args += ["--volume", f"{src}:{m['mountPath']}:{','.join(opts)}"]
            elif "emptyDir" in v:
                ed = v["emptyDir"] or {}
                if ed.get("medium") == "Memory":
                    size = f",tmpfs-size={memory_bytes(ed['sizeLimit'])}" if "sizeLimit" in ed else ""
                    args += ["--mount", f"type=tmpfs,destination={m['mountPath']},tmpfs-mode=1777{size}"]
                else:
                    d = pod_dir / "volumes" / m["name"]
                    d.mkdir(parents=True, exist_ok=True)
                    d.chmod(0o777)
                    args += ["--volume", f"{d}:{m['mountPath']}:{','.join(opts)}"]
        if pod.spec.get("automountServiceAccountToken", True):
            args += ["--volume", f"{self._service_account_dir(pod, pod_dir)}:{SA_DIR}:ro,rprivate"]
        return args

    def _service_account_dir(self, pod: PodRun, pod_dir: Path) -> Path:
        """The projected kube-api-access volume: token, ca.crt and namespace, readable by any uid."""
        assert self._pki is not None
        d = pod_dir / "serviceaccount"
        d.mkdir(parents=True, exist_ok=True)
        sa = pod.spec.get("serviceAccountName", "default")
        (d / "token").write_text(f"kvswitch-testbed.{pod.namespace}.{sa}.{pod.node.name}")  # unchecked here
        (d / "ca.crt").write_bytes(self._pki[0].read_bytes())
        (d / "namespace").write_text(pod.namespace)
        for f in d.iterdir():
            f.chmod(0o644)
        d.chmod(0o755)
        return d

    def _run_to_completion(
        self, pod: PodRun, c: Mapping[str, Any], pod_dir: Path, timeout: float
    ) -> tuple[int, str]:
        name = self._container_name(pod, c)
        pod.containers[c["name"]] = name
        args = self.podman_args(pod, c, pod_dir)
        args.insert(1, "--rm")
        try:
            proc = subprocess.run(
                [*PODMAN, *args], capture_output=True, text=True, env=self.env, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            podman("rm", "-f", "-t", "0", name, env=self.env, check=False)
            return -1, f"timed out after {timeout:.0f}s"
        log = self.workdir / f"{pod.name}-{c['name']}.log"
        log.write_text(proc.stdout + proc.stderr)
        pod.exit_codes[c["name"]] = proc.returncode
        return proc.returncode, proc.stdout + proc.stderr

    def _start_container(self, pod: PodRun, c: Mapping[str, Any], pod_dir: Path) -> Process:
        name = self._container_name(pod, c)
        pod.containers[c["name"]] = name
        args = self.podman_args(pod, c, pod_dir)
        log = self.workdir / f"{pod.name}-{c['name']}.log"
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                [*PODMAN, *args], env=self.env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        proc = ContainerProcess(f"{pod.name}/{c['name']}", popen, log, container=name, env=self.env)
        self.processes[f"{pod.name}/{c['name']}"] = proc
        return proc

    def _stop_pod(self, pod: PodRun, delete_object: bool = True) -> None:
        for name, proc in pod.processes.items():
            proc.stop(timeout=float(pod.spec.get("terminationGracePeriodSeconds", 30)) + 5)
            self.processes.pop(f"{pod.name}/{name}", None)
        with self._lock:
            self.pod_runs.pop(pod.name, None)
        if delete_object:
            with contextlib.suppress(ApiError):
                self.client.delete(f"/api/v1/namespaces/{pod.namespace}/pods/{pod.name}")

    # --- probes and status: the kubelet's and the workload controllers' reports ---------------

    def _start_prober(self) -> None:
        self._probing.set()
        self._prober = threading.Thread(target=self._probe_loop, name="kubelet-prober", daemon=True)
        self._prober.start()

    def _probe_loop(self) -> None:
        while self._probing.is_set():
            with self._lock:
                pods = list(self.pod_runs.values())
            for pod in pods:
                with contextlib.suppress(Exception):
                    ready = self._probe(pod)
                    if ready != pod.ready:
                        pod.ready = ready
                        self._report_pod_status(pod)
            with contextlib.suppress(Exception):
                self._update_workload_status()
            self._probe_stop.wait(1.0)

    def _probe(self, pod: PodRun) -> bool:
        """The pod's readiness: every container running and its probe passing, each probe run at
        its own initialDelaySeconds and periodSeconds (a container without one is ready once up)."""
        ready = True
        for c in pod.spec["containers"]:
            proc = pod.processes.get(c["name"])
            if proc is None or proc.popen.poll() is not None:
                return False
            probe = c.get("readinessProbe") or c.get("livenessProbe")
            if probe is None:
                continue
            now = time.monotonic()
            due = pod.next_probe.setdefault(c["name"], now + float(probe.get("initialDelaySeconds", 0)))
            if now >= due:
                pod.probe_ok[c["name"]] = self._run_probe(pod, c, probe)
                pod.next_probe[c["name"]] = now + float(probe.get("periodSeconds", 10))
            ready &= pod.probe_ok.get(c["name"], False)
        return ready

    def _run_probe(self, pod: PodRun, c: Mapping[str, Any], probe: Mapping[str, Any]) -> bool:
        timeout = float(probe.get("timeoutSeconds", 1))
        if "exec" in probe:
            argv = probe["exec"]["command"]
            res = podman(
                "exec", pod.containers[c["name"]], *argv, env=self.env, check=False, timeout=timeout + 10
            )
            return res.returncode == 0
        get = probe["httpGet"]
        port = get["port"]
        if isinstance(port, str):
            port = next(p["containerPort"] for p in c.get("ports") or [] if p.get("name") == port)
        url = f"http://{pod.node.underlay_ip}:{port}{get.get('path', '/')}"  # hostNetwork: the node's IP
        return _http_ok(pod.node.netns, url, timeout)

    def _report_pod_status(self, pod: PodRun) -> None:
        flag = "True" if pod.ready else "False"
        now = _now()
        status = {
            "phase": "Running",
            "hostIP": pod.node.underlay_ip,
            "podIP": pod.node.underlay_ip,
            "podIPs": [{"ip": pod.node.underlay_ip}],
            "conditions": [
                {"type": t, "status": s, "lastTransitionTime": now}
                for t, s in (
                    ("Initialized", "True"),
                    ("Ready", flag),
                    ("ContainersReady", flag),
                    ("PodScheduled", "True"),
                )
            ],
            "containerStatuses": [
                {
                    "name": c["name"],
                    "image": c["image"],
                    "imageID": "",
                    "ready": pod.ready,
                    "restartCount": 0,
                    "started": True,
                    "state": {"running": {"startedAt": now}},
                }
                for c in pod.spec["containers"]
            ],
        }
        with contextlib.suppress(ApiError):
            self.client.request(
                "PATCH", f"/api/v1/namespaces/{pod.namespace}/pods/{pod.name}/status", {"status": status},
                content_type="application/merge-patch+json",
            )  # fmt: skip

    def _update_workload_status(self) -> None:
        rendered = self._rendered()
        with self._lock:
            pods = list(self.pod_runs.values())
        for kind in ("DaemonSet", "Deployment"):
            for w in rendered.find(kind):
                live = self.client.get(self._path(w))
                if live is None:
                    continue
                mine = [
                    p
                    for p in pods
                    if p.workload["metadata"]["name"] == w["metadata"]["name"] and p.workload["kind"] == kind
                ]
                ready = sum(p.ready for p in mine)
                gen = live["metadata"].get("generation", 1)
                if kind == "DaemonSet":
                    desired = len(self._schedule(w))
                    status = {"observedGeneration": gen, "desiredNumberScheduled": desired,
                              "currentNumberScheduled": len(mine), "updatedNumberScheduled": len(mine),
                              "numberReady": ready, "numberAvailable": ready, "numberMisscheduled": 0,
                              "numberUnavailable": max(0, desired - ready)}  # fmt: skip
                else:
                    status = {"observedGeneration": gen, "replicas": len(mine), "updatedReplicas": len(mine),
                              "readyReplicas": ready, "availableReplicas": ready}  # fmt: skip
                if all(live.get("status", {}).get(k) == v for k, v in status.items()):
                    continue
                with contextlib.suppress(ApiError):
                    self.client.request(
                        "PATCH",
                        f"{self._path(w)}/status",
                        {"status": status},
                        content_type="application/merge-patch+json",
                    )

    # --- helm uninstall ------------------------------------------------------------------------

    def helm_uninstall(self) -> list[str]:
        """What ``helm uninstall`` does, then what the cluster does about it: the release's objects
        are deleted (their pods stop), the post-delete hooks run by weight, helm waits for the hook
        Job, and hooks with hook-succeeded go. Returns what is left on the nodes (empty = clean)."""
        rendered = self._rendered()
        t0 = time.monotonic()
        for pod in [p for p in list(self.pod_runs.values()) if p.workload in rendered.objects]:
            self._stop_pod(pod)
        for obj in reversed(rendered.objects):
            self._delete(obj)
        self._log(
            f"helm uninstall: {len(rendered.objects)} release objects deleted, agents and controller stopped"
        )
        hooks = rendered.hooks.get("post-delete", [])
        failed = False
        for obj in hooks:  # by weight, as helm runs them
            self._create(obj)
            if obj["kind"] == "DaemonSet":
                for node in self._schedule(obj):
                    self._run_pod(obj, node)
                count = len(self._schedule(obj))
                self._log(
                    f"post-delete hook DaemonSet {obj['metadata']['name']}: a pod on each of {count} nodes"
                )
            elif obj["kind"] == "Job":
                ok = self._run_job(obj)
                failed |= not ok
        for obj in reversed(hooks):
            policy = (
                (obj["metadata"].get("annotations") or {}).get("helm.sh/hook-delete-policy") or ""
            ).split(",")
            if ("hook-failed" if failed else "hook-succeeded") in policy:
                for pod in [p for p in list(self.pod_runs.values()) if p.workload is obj]:
                    self._stop_pod(pod)
                self._delete(obj)
        left = self.node_leftovers()
        self._log(f"helm uninstall done in {time.monotonic() - t0:.1f}s; "
                  + ("every node clean" if not left else f"left behind: {left}"))  # fmt: skip
        return left + (["the cleanup Job failed"] if failed else [])

    def _run_job(self, job: dict[str, Any]) -> bool:
        spec = job["spec"]
        node = self._schedule(job)[0]
        deadline = float(spec.get("activeDeadlineSeconds", 600))
        attempts = int(spec.get("backoffLimit", 6)) + 1
        for attempt in range(attempts):
            pod = self._run_pod_to_completion(job, node, deadline)
            code = next(iter(pod.exit_codes.values()), -1)
            out = (self.workdir / f"{pod.name}-{pod.spec['containers'][0]['name']}.log").read_text(
                errors="replace"
            )
            what = f"post-delete hook Job {job['metadata']['name']} (attempt {attempt + 1}) on {node.name}"
            self._log(f"{what}: exit {code}: {out.strip()}")
            status = {"succeeded": 1} if code == 0 else {"failed": attempt + 1}
            with contextlib.suppress(ApiError):
                self.client.request(
                    "PATCH", f"{self._path(job)}/status", {"status": status},
                    content_type="application/merge-patch+json",
                )  # fmt: skip
            if code == 0:
                return True
        return False

    def _run_pod_to_completion(self, workload: dict[str, Any], node: Node, timeout: float) -> PodRun:
        name = f"{workload['metadata']['name']}-{_suffix()}"
        spec = copy.deepcopy(workload["spec"]["template"]["spec"])
        pod = PodRun(name, self.namespace, node, workload, spec)
        self._create_pod_object(pod)
        pod_dir = self.workdir / "pods" / name
        pod_dir.mkdir(parents=True, exist_ok=True)
        for c in spec.get("initContainers") or []:
            if self._run_to_completion(pod, c, pod_dir, timeout)[0] != 0:
                return pod
        for c in spec["containers"]:
            self._run_to_completion(pod, c, pod_dir, timeout)
        return pod

    def node_leftovers(self) -> list[str]:
        """k-vswitch's files still on the nodes: the conflist, marked wrappers, the bundle."""
        hp = self.values_host_paths()
        left = []
        for node in self.bed.nodes.values():
            conf = self.host_dir(node, hp["cniConfDir"])
            bin_dir = self.host_dir(node, hp["cniBinDir"])
            if (conf / "10-k-vswitch.conflist").exists():
                left.append(f"{node.name}:{hp['cniConfDir']}/10-k-vswitch.conflist")
            for f in sorted(bin_dir.iterdir()) if bin_dir.is_dir() else []:
                if f.name == "k-vswitch.d" or (
                    f.is_file() and WRAPPER_MARK in f.read_text(errors="replace")[:200]
                ):
                    left.append(f"{node.name}:{hp['cniBinDir']}/{f.name}")
        return left

    def _log(self, msg: str) -> None:
        self.uninstall_log.append(msg)
        self.say(msg)

    # --- stop -------------------------------------------------------------------------------

    def stop(self) -> None:
        self._probing.clear()
        self._probe_stop.set()
        if self._prober is not None:
            self._prober.join(5)
        # The containers' logs outlive the run's directory: a test reads them after the teardown.
        for log in sorted(self.workdir.glob(f"{self.release}-*.log")) if self.workdir.is_dir() else []:
            with contextlib.suppress(OSError):
                self.logs[log.stem] = log.read_text(errors="replace")
        try:
            self._stop_tls_front()
            super().stop()
        finally:
            remove_run_containers(self.bed.run_id)


@dataclass
class ContainerProcess(Process):
    """A container's ``podman run``: stopped with ``podman stop`` (SIGTERM, then the grace period)."""

    container: str = ""
    env: Mapping[str, str] = field(default_factory=dict)

    def stop(self, sig: int = 15, timeout: float = 10.0) -> None:
        if self.popen.poll() is None and self.container:
            with contextlib.suppress(Exception):
                podman(
                    "stop",
                    "-t",
                    str(int(max(1, timeout - 5))),
                    self.container,
                    env=self.env,
                    check=False,
                    timeout=timeout + 30,
                )
        super().stop(sig, timeout)


@dataclass
class NodeViewPlugins(Plugins):
    """Plugins exec'd with the node's filesystem view: ``find`` returns a launcher per plugin that
    enters the view (nodeview.py) and execs the plugin found along CNI_PATH there."""

    launchers: Path = Path("/nonexistent")

    def find(self, plugin_type: str) -> str:
        launcher = self.launchers / plugin_type
        if not launcher.exists():
            view = self.launchers / "view.json"
            launcher.write_text(f"#!/bin/sh\nexec {sys.executable} -I -S {NODEVIEW} {view} {plugin_type}\n")
            launcher.chmod(0o755)
        return str(launcher)


def _http_ok(netns: str, url: str, timeout: float = 3.0) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def get() -> bool:
        try:
            with opener.open(url, timeout=timeout) as rsp:
                status: int = rsp.status
                return 200 <= status < 400
        except OSError:
            return False

    return in_netns(netns, get)


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = (
            _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else copy.deepcopy(v)
        )
    return out


def describe_limits(keys: Iterable[str]) -> list[str]:
    return [f"{k}: {LIMITS[k]}" for k in keys]
