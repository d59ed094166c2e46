"""A local cluster without Kubernetes: fake API server, real controller and agent processes,
real OVS nodes, and pods wired through ``k-vswitch-cni`` as a container runtime would.

The API server listens inside the underlay namespace (10.250.0.1:6443, where the node agents reach
it over the simulated network, as hostNetwork pods do) and on loopback (for the harness and for
kubectl). The controller runs in the underlay namespace ("the control plane"), each agent inside
its node's namespace. This is both the sandbox (``kvswitchctl sandbox``) and the end-to-end harness.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvswitch.cni.contract import CONFLIST_NAME
from kvswitch_testbed.apiserver import ApiServerThread, write_kubeconfig
from kvswitch_testbed.bed import UNDERLAY, UNDERLAY_BRIDGE, Node, Pod, TestBed
from kvswitch_testbed.cni_runner import Attachment, ConfList, Plugins, netns_path
from kvswitch_testbed.endpointslices import EndpointSliceController
from kvswitch_testbed.kubeclient import VSC, KubeClient, pods_path
from kvswitch_testbed.kubeproxy import KubeProxy
from kvswitch_testbed.netns import netns_socket, run

API_IP = str(UNDERLAY.network_address + 1)
API_PORT = 6443
EXTERNAL_INDEX = 200
EXTERNAL_IP = str(UNDERLAY.network_address + EXTERNAL_INDEX)
CRD_DIR = Path(__file__).resolve().parent / "crds"  # the chart's CRDs, shipped as package data
CRD_FILE = CRD_DIR / "kvswitch.io_vswitchconfigs.yaml"
SYSTEM_CNI_DIR = "/usr/lib/cni"
SERVICE_PROXIES = ("openflow", "kube-proxy")  # the VSwitchConfig's serviceProxy values
KUBELET_FINALIZER = "testbed.kvswitch.io/kubelet"  # holds a pod Terminating until delete_pod()
# asyncio's debug-mode warning for a callback that held the event loop too long
SLOW_CALLBACK = re.compile(r"Executing .* took \d+(?:\.\d+)? seconds")
# ...except kopf's first API request, once per process: it builds its aiohttp session and an SSL
# context from the system CA store on the loop (~20 ms idle, 100-140 ms while three agents start on
# two cores). No code of ours runs in that step: the report names kopf's API scan at its first await.
KOPF_FIRST_REQUEST = re.compile(
    r"coro=<_read_(?:new_apis|old_api)\(\) running at \S*/kopf/_cogs/clients/scanning\.py:\d+>"
)


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


@dataclass
class ClusterPod:
    name: str
    namespace: str
    node: Node
    pod: Pod
    uid: str
    ip: str = ""
    result: Any = None

    @property
    def netns(self) -> str:
        return self.pod.netns

    @property
    def container_id(self) -> str:
        return self.uid.replace("-", "")


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()


@dataclass
class Cluster:
    nodes: int = 3
    overlay: str = "vxlan"
    cluster_cidr: str = "10.244.0.0/16"
    service_cidr: str = "10.96.0.0/12"
    # who balances Services: k-vswitch's OpenFlow proxy, or kube-proxy's nftables on every node
    # (the controller writes it into every VSwitchConfig; KubeProxy plays kube-proxy here)
    service_proxy: str = "openflow"
    say: Callable[[str], None] = lambda msg: None
    bed: TestBed = field(default_factory=TestBed)
    processes: dict[str, Process] = field(default_factory=dict)
    pods: dict[tuple[str, str], ClusterPod] = field(default_factory=dict)
    api: ApiServerThread | None = None
    endpointslices: EndpointSliceController | None = None
    kube: KubeClient | None = None
    kube_proxy: KubeProxy | None = None
    external_ns: str = ""
    # agents log every event-loop callback that takes this long (asyncio debug mode on their loop)
    asyncio_slow_ms: int | None = None
    _log_offsets: dict[str, int] = field(default_factory=dict)

    @property
    def workdir(self) -> Path:
        return self.bed.workdir

    @property
    def client(self) -> KubeClient:
        assert self.kube is not None, "cluster not started"
        return self.kube

    # --- start ----------------------------------------------------------------------------

    def start(self) -> Cluster:
        if self.service_proxy not in SERVICE_PROXIES:
            raise ValueError(f"service_proxy must be one of {SERVICE_PROXIES}, not {self.service_proxy!r}")
        t0 = time.monotonic()
        self.say(f"run {self.bed.run_id}: {self.nodes} nodes, each its own ovsdb-server + ovs-vswitchd")
        for node in self.bed.add_nodes(self.nodes):
            self.say(f"  {node.name}: netns {node.netns}, underlay {node.underlay_ip}")
        self.bed.seed_tunnel_neighbours()
        run(
            ["ip", "addr", "add", f"{API_IP}/{UNDERLAY.prefixlen}", "dev", UNDERLAY_BRIDGE],
            self.bed.underlay_ns,
        )
        self._add_external_host()
        self._start_api()
        self.say(f"API server on http://{API_IP}:{API_PORT} (underlay) and {self.client.base_url} (loopback)")
        self.start_controller()
        for node in self.bed.nodes.values():
            self._create_node_object(node)
            self.start_agent(node)
        for node in self.bed.nodes.values():
            self.wait_ready(node.name)
        if self.service_proxy == "kube-proxy":
            self._start_kube_proxy()
        self.say(f"all {self.nodes} VSwitchConfigs Ready in {time.monotonic() - t0:.1f}s")
        return self

    def _start_kube_proxy(self) -> None:
        """kube-proxy on every node: its nftables table in the node's namespace (gone with it)."""
        client = self.client

        def objects() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
            return client.list("/api/v1/services"), client.list("/apis/discovery.k8s.io/v1/endpointslices")

        self.kube_proxy = KubeProxy(
            objects, lambda: {n.name: n.netns for n in self.bed.nodes.values()}, self.cluster_cidr
        )
        self.kube_proxy.sync()  # the first sync in the caller: a broken ruleset fails start()
        self.kube_proxy.start()
        self.say("kube-proxy (nftables) on every node")

    def _add_external_host(self) -> None:
        self.external_ns, ip = self.bed.add_external_host("ext", EXTERNAL_INDEX)
        assert ip == EXTERNAL_IP

    def _start_api(self) -> None:
        self.api = ApiServerThread(crds=[CRD_FILE], service_cidr=self.service_cidr)
        local_url = self.api.start()  # loopback, for the harness and kubectl
        # kube-controller-manager's part: EndpointSlices of Services, in the API server's loop.
        self.endpointslices = EndpointSliceController(self.api.server)
        self.api.run(self.endpointslices.start())
        # for the agents, over the underlay; the factory lets the API server stop and start again
        # on this address (ApiServerThread.pause/resume: outage tests)
        underlay = functools.partial(netns_socket, self.bed.underlay_ns, socket.AF_INET, socket.SOCK_STREAM)
        self.api.listen(host=API_IP, port=API_PORT, sock_factory=underlay)
        self.kube = KubeClient(local_url)
        write_kubeconfig(self.workdir / "kubeconfig", f"http://{API_IP}:{API_PORT}")
        write_kubeconfig(self.workdir / "kubeconfig.local", local_url)

    def _start_process(self, name: str, netns: str, binary: str, env: dict[str, str]) -> Process:
        log = self.workdir / f"{name}.log"
        full_env = {
            **os.environ,
            "KUBECONFIG": str(self.workdir / "kubeconfig"),
            "KVSWITCH_RUN_DIR": str(self.workdir),  # lets the leak check find our processes
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                ["ip", "netns", "exec", netns, binary],
                env=full_env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        proc = Process(name, popen, log)
        self.processes[name] = proc
        return proc

    def node_dir(self, node: Node) -> Path:
        return self.workdir / node.name

    def audit_log(self, node: Node) -> Path:
        """Where ``node``'s agent writes the NetworkPolicy audit log (KVSWITCH_AUDIT_LOG)."""
        return self.node_dir(node) / "np.log"

    def agent_env(self, node: Node) -> dict[str, str]:
        d = self.node_dir(node)
        return {
            "NODE_NAME": node.name,
            "KVSWITCH_OVSDB": node.ovs.db_remote,
            "KVSWITCH_OVS_RUNDIR": str(node.ovs.workdir),
            "KVSWITCH_DATAPATH_TYPE": "netdev",
            "KVSWITCH_CNI_CONF_DIR": str(d / "net.d"),
            "KVSWITCH_CNI_BIN_DIR": str(d / "cni-bin"),
            "KVSWITCH_CNI_SOCKET": str(d / "cni.sock"),
            "KVSWITCH_IPAM_DATA_DIR": str(d / "ipam"),
            "KVSWITCH_AUDIT_LOG": str(self.audit_log(node)),
            "KVSWITCH_INPUTS_CACHE": str(d / "policy-inputs.cache"),
            "KVSWITCH_INPUTS_CACHE_SPACING": "1",  # tests restart agents right after changes
            "KVSWITCH_RESYNC_INTERVAL": "30",
            **(
                {"KVSWITCH_ASYNCIO_DEBUG_SLOW_MS": str(self.asyncio_slow_ms)}
                if self.asyncio_slow_ms is not None
                else {}
            ),
        }

    def start_controller(self) -> Process:
        """The controller, in the underlay namespace ("the control plane"); chartrun.ChartCluster
        runs the chart's Deployment instead."""
        return self._start_process(
            "controller",
            self.bed.underlay_ns,
            _bin("k-vswitch-controller"),
            {
                "KVSWITCH_STANDALONE": "1",
                "KVSWITCH_CLUSTER_CIDR": self.cluster_cidr,
                "KVSWITCH_SERVICE_CIDR": self.service_cidr,
                "KVSWITCH_OVERLAY_TYPE": self.overlay,
                "KVSWITCH_SERVICE_PROXY": self.service_proxy,
            },
        )

    def start_agent(self, node: Node) -> Process:
        return self._start_process(f"agent-{node.name}", node.netns, _bin("k-vswitchd"), self.agent_env(node))

    def _create_node_object(self, node: Node) -> None:
        self.client.create(
            "/api/v1/nodes",
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": node.name, "labels": {"kubernetes.io/hostname": node.name}},
                "spec": {"podCIDR": self.pod_cidr(node)},
                "status": {
                    "addresses": [
                        {"type": "InternalIP", "address": node.underlay_ip},
                        {"type": "Hostname", "address": node.name},
                    ]
                },
            },
        )

    def pod_cidr(self, node: Node) -> str:
        base = self.cluster_cidr.split(".")
        return f"{base[0]}.{base[1]}.{node.index}.0/24"

    # --- observing ------------------------------------------------------------------------

    def vswitchconfig(self, name: str) -> dict[str, Any] | None:
        obj: dict[str, Any] | None = self.client.get(f"{VSC}/{name}")
        return obj

    def ready(self, name: str, generation: int | None = None) -> bool:
        obj = self.vswitchconfig(name)
        if obj is None:
            return False
        status = obj.get("status") or {}
        gen = generation if generation is not None else obj["metadata"].get("generation")
        return any(
            c.get("type") == "Ready" and c.get("status") == "True" and c.get("observedGeneration") == gen
            for c in status.get("conditions") or []
        )

    def wait_ready(self, name: str, timeout: float = 60.0) -> None:
        try:
            self.client.wait_for(f"VSwitchConfig {name} Ready", lambda: self.ready(name), timeout)
        except TimeoutError:
            raise TimeoutError(f"{name} not Ready; logs:\n{self.tail_logs()}") from None

    def tail_logs(self, lines: int = 30) -> str:
        out = []
        for p in self.processes.values():
            text = p.log.read_text(errors="replace").splitlines()[-lines:] if p.log.exists() else []
            out.append(f"--- {p.name} (exit {p.popen.poll()}) ---\n" + "\n".join(text))
        if self.kube_proxy is not None:
            out.append(f"--- kube-proxy: {self.kube_proxy.syncs} syncs, last error: {self.kube_proxy.error}")
        return "\n".join(out)

    def slow_callbacks(self) -> list[str]:
        """asyncio's slow-callback warnings (see ``asyncio_slow_ms``) the agents logged since the
        previous call: each one is a moment an agent's event loop, which also serves CNI, was blocked."""
        found = []
        for name, proc in self.processes.items():
            if not name.startswith("agent-") or not proc.log.exists():
                continue
            start = self._log_offsets.get(name, 0)
            with open(proc.log, "rb") as f:
                f.seek(start)
                data = f.read()
            complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next call
            self._log_offsets[name] = start + len(complete)
            found += [
                f"{name}: {line}"
                for line in complete.decode(errors="replace").splitlines()
                if SLOW_CALLBACK.search(line) and not KOPF_FIRST_REQUEST.search(line)
            ]
        return found

    def edit_vswitchconfig(self, name: str, spec: dict[str, Any]) -> int:
        """Patch a VSwitchConfig spec as a user would; returns the new generation."""
        obj = self.client.patch(f"{VSC}/{name}", {"spec": spec})
        return int(obj["metadata"]["generation"])

    # --- pods: the kubelet's part ---------------------------------------------------------

    def conflist(self, node: Node) -> ConfList:
        path = self.node_dir(node) / "net.d" / CONFLIST_NAME
        plugins = Plugins([str(self.node_dir(node) / "cni-bin"), SYSTEM_CNI_DIR], netns=node.netns)
        return ConfList(json.loads(path.read_text()), plugins)

    def add_pod(
        self,
        node: Node,
        name: str,
        namespace: str = "default",
        labels: dict[str, str] | None = None,
        containers: list[dict[str, Any]] | None = None,
    ) -> ClusterPod:
        obj = self.create_pod_object(node, name, namespace, labels, containers)
        cp = self.attach_pod(node, obj)
        self._patch_pod_status(cp, self._running_status(cp, obj, ready=True))
        return cp

    def create_pod_object(
        self,
        node: Node,
        name: str,
        namespace: str = "default",
        labels: dict[str, str] | None = None,
        containers: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """The API part of :meth:`add_pod` before the kubelet acts: the pod, scheduled to ``node``
        (and its namespace if missing)."""
        if self.client.get(f"/api/v1/namespaces/{namespace}") is None:
            self.client.create(
                "/api/v1/namespaces",
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
            )
        obj: dict[str, Any] = self.client.create(
            pods_path(namespace),
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
                "spec": {
                    "nodeName": node.name,
                    "containers": containers or [{"name": "main", "image": "sandbox"}],
                },
            },
        )
        return obj

    def attach_pod(self, node: Node, obj: Mapping[str, Any]) -> ClusterPod:
        """The runtime's part of :meth:`add_pod` for the pod object ``obj``: the sandbox and CNI ADD,
        no API call (a kubelet that already has the pod does this while the API is away too)."""
        meta = obj["metadata"]
        name, namespace = meta["name"], meta.get("namespace", "default")
        uid = meta.get("uid") or str(uuid.uuid4())
        pod = self.bed.add_pod(node, f"{namespace}-{name}"[:40])
        cp = ClusterPod(name, namespace, node, pod, uid)
        att = self._attachment(cp)
        cp.result = self.conflist(node).add(att)
        cp.ip = next(ip["address"].split("/")[0] for ip in cp.result["ips"] if ":" not in ip["address"])
        pod.ip = cp.ip
        self.pods[(namespace, name)] = cp
        return cp

    def report_pod_running(self, cp: ClusterPod) -> dict[str, Any]:
        """The kubelet's status write once the sandbox runs (what :meth:`add_pod` does last)."""
        patched: dict[str, Any] = self._patch_pod_status(
            cp, self._running_status(cp, self._pod_object(cp), ready=True)
        )
        return patched

    def _running_status(self, cp: ClusterPod, pod: Mapping[str, Any], *, ready: bool) -> dict[str, Any]:
        """What a kubelet reports once the sandbox is wired and the containers run."""
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        is_ready = "True" if ready else "False"
        conditions = [
            {"type": kind, "status": status, "lastProbeTime": None, "lastTransitionTime": now}
            for kind, status in (
                ("PodReadyToStartContainers", "True"),
                ("Initialized", "True"),
                ("Ready", is_ready),
                ("ContainersReady", is_ready),
                ("PodScheduled", "True"),
            )
        ]
        containers = (pod.get("spec") or {}).get("containers") or []
        statuses = [
            {
                "name": c.get("name"),
                "image": c.get("image", ""),
                "imageID": "",
                "ready": ready,
                "started": True,
                "restartCount": 0,
                "state": {"running": {"startedAt": now}},
            }
            for c in containers
        ]
        return {
            "phase": "Running",
            "conditions": conditions,
            "hostIP": cp.node.underlay_ip,
            "hostIPs": [{"ip": cp.node.underlay_ip}],
            "podIP": cp.ip,
            "podIPs": [{"ip": cp.ip}],
            "startTime": now,
            "containerStatuses": statuses,
        }

    def _patch_pod_status(self, cp: ClusterPod, status: dict[str, Any]) -> Any:
        return self.client.request(
            "PATCH",
            f"{pods_path(cp.namespace)}/{cp.name}/status",
            {"status": status},
            content_type="application/merge-patch+json",
        )

    def _pod_object(self, cp: ClusterPod) -> dict[str, Any]:
        obj: dict[str, Any] | None = self.client.get(f"{pods_path(cp.namespace)}/{cp.name}")
        if obj is None:
            raise LookupError(f"pod {cp.namespace}/{cp.name} is gone")
        return obj

    def set_pod_ready(self, cp: ClusterPod, ready: bool = True) -> dict[str, Any]:
        """A readiness probe's verdict: the Ready and ContainersReady conditions (and containers' ready)."""
        pod = self._pod_object(cp)
        status = pod.get("status") or {}
        flag = "True" if ready else "False"
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        conditions = [
            {**c, "status": flag, "lastTransitionTime": now}
            if c.get("type") in ("Ready", "ContainersReady") and c.get("status") != flag
            else c
            for c in status.get("conditions") or []
        ]
        statuses = [{**c, "ready": ready} for c in status.get("containerStatuses") or []]
        patched: dict[str, Any] = self._patch_pod_status(
            cp, {"conditions": conditions, "containerStatuses": statuses}
        )
        return patched

    def terminate_pod(self, cp: ClusterPod) -> dict[str, Any]:
        """Start deleting a pod the way a graceful deletion looks to everyone else: the API object gets
        its deletionTimestamp and stays (a kubelet finalizer holds it), the sandbox keeps running.
        :meth:`delete_pod` finishes the job."""
        path = f"{pods_path(cp.namespace)}/{cp.name}"
        finalizers = list((self._pod_object(cp)["metadata"]).get("finalizers") or [])
        if KUBELET_FINALIZER not in finalizers:
            self.client.patch(path, {"metadata": {"finalizers": [*finalizers, KUBELET_FINALIZER]}})
        self.client.delete(path)
        return self._pod_object(cp)

    def _attachment(self, cp: ClusterPod) -> Attachment:
        args = f"IgnoreUnknown=1;K8S_POD_NAMESPACE={cp.namespace};K8S_POD_NAME={cp.name};K8S_POD_UID={cp.uid}"
        return Attachment(container_id=cp.container_id, netns=netns_path(cp.netns), ifname="eth0", args=args)

    def delete_pod(self, cp: ClusterPod) -> None:
        """What the kubelet does: CNI DEL, remove the sandbox, then the API object goes."""
        self.detach_pod(cp)
        self.remove_pod_object(cp.namespace, cp.name)

    def detach_pod(self, cp: ClusterPod) -> None:
        """The runtime's part of :meth:`delete_pod`: CNI DEL and the sandbox gone, no API call."""
        with contextlib.suppress(Exception):
            self.conflist(cp.node).delete(self._attachment(cp), cp.result)
        self.bed.remove_pod(cp.pod)
        self.pods.pop((cp.namespace, cp.name), None)

    def remove_pod_object(self, namespace: str, name: str) -> None:
        """The API part of :meth:`delete_pod`: the kubelet's finalizer (if any) released, the pod gone."""
        path = f"{pods_path(namespace)}/{name}"
        pod = self.client.get(path)
        finalizers = list(((pod or {}).get("metadata") or {}).get("finalizers") or [])
        if KUBELET_FINALIZER in finalizers:  # terminate_pod() held it
            finalizers.remove(KUBELET_FINALIZER)
            self.client.patch(path, {"metadata": {"finalizers": finalizers or None}})
        self.client.delete(path)
        self.pods.pop((namespace, name), None)

    # --- services: kube-apiserver allocates, the EndpointSlice controller follows the pods ------

    def add_service(
        self,
        name: str,
        selector: Mapping[str, str] | None,
        ports: Iterable[int | Mapping[str, Any]],
        type: str = "ClusterIP",
        namespace: str = "default",
        **spec: Any,
    ) -> dict[str, Any]:
        """Create a Service; returns it as stored, with its ClusterIP (and nodePorts) allocated.

        ``ports``: numbers (TCP, named ``tcp-N`` when there are several) or ServicePort dicts; ``spec``:
        any other ServiceSpec field (``clusterIP="None"``, ``sessionAffinity="ClientIP"``...).
        """
        entries = list(ports)
        port_list = [
            dict(p)
            if isinstance(p, Mapping)
            else ({"name": f"tcp-{p}", "port": p} if len(entries) > 1 else {"port": p})
            for p in entries
        ]
        body_spec: dict[str, Any] = {"type": type, "ports": port_list, **spec}
        if selector is not None:
            body_spec["selector"] = dict(selector)
        body = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}, "spec": body_spec}
        created: dict[str, Any] = self.client.create(f"/api/v1/namespaces/{namespace}/services", body)
        return created

    def delete_service(self, name: str, namespace: str = "default") -> None:
        """Delete a Service: its IP and ports are released, its EndpointSlices garbage-collected."""
        self.client.delete(f"/api/v1/namespaces/{namespace}/services/{name}")

    def endpoint_slices(self, service: str, namespace: str = "default") -> list[dict[str, Any]]:
        path = f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices"
        return self.client.list(path, labelSelector=f"kubernetes.io/service-name={service}")

    def delete_node(self, node: Node) -> None:
        self.delete_node_named(node.name)

    def delete_node_named(self, name: str) -> None:
        self.client.delete(f"/api/v1/nodes/{name}")

    # --- stop -----------------------------------------------------------------------------

    def stop(self) -> None:
        for cp in list(self.pods.values()):
            with contextlib.suppress(Exception):
                self.conflist(cp.node).delete(self._attachment(cp), cp.result)
        if self.kube_proxy is not None:
            self.kube_proxy.stop()  # its tables go with the node namespaces
        for proc in self.processes.values():
            proc.stop()
        if self.api is not None:
            if self.endpointslices is not None:
                with contextlib.suppress(Exception):
                    self.api.run(self.endpointslices.stop())
            self.api.stop()
        self.bed.teardown()

    def __enter__(self) -> Cluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
