"""Soak: CNI ADD/DEL cycles through the node agents' CNI servers, with faults at random moments.

``make soak`` (not part of the default test run). A local cluster (fake API server, controller and
one k-vswitchd process per node, each node its own ovsdb-server + ovs-vswitchd) runs pods the way a
kubelet and its runtime do: the pod appears in the API, a sandbox (network namespace) is made, the
installed conflist (k-vswitch-cni, then portmap) is run for ADD by exec'ing the real plugins. A
failed ADD is torn down (DEL until it succeeds, sandbox removed) and retried in a new sandbox, as
containerd and the kubelet do; DEL is retried until it succeeds.

One cycle = one pod started and one pod stopped (a random one of the live pods, so lifetimes vary);
a few pods per node stay alive throughout. Every fourth pod is isolated by a default-deny ingress
NetworkPolicy: right after its ADD returns, one ICMP echo from another pod must go unanswered (ADD
returns only once the pod's policy flows are in OVS, faults or not).

Several workers run cycles concurrently while a fault thread, at random moments, restarts a node's
ovsdb-server or ovs-vswitchd (SIGKILL or SIGTERM), kills a node agent with SIGKILL and starts it
again, or makes IPAM fail (host-local's range filled by another owner, or the plugin's failpoint
right after the IPAM allocation).

At the end (after the agents converge, bounded): counts of leaked host veths, OVS ports of gone
pods, IPAM reservations without a live pod, POD-owned flows whose port is gone, pod namespaces and
processes; every surviving pod is pinged from another pod (isolated ones must not answer). Then the
survivors are deleted and everything is counted again, the cluster is stopped and the test kit's
leak checker runs. Exit status 1 on any leak, unreachable (or open isolated) pod, or ADD/DEL that
never succeeded.

Bounded to ``--budget`` seconds (default 600) in total: when the machine is too slow for
``--cycles`` the run stops early, prints how many cycles it achieved and says so.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import fcntl
import ipaddress
import json
import os
import random
import re
import select
import signal
import socket
import struct
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvswitch_testbed import Node, find_leaks
from kvswitch_testbed.cluster import Cluster
from kvswitch_testbed.cni_runner import Attachment, PluginFailed, netns_path
from kvswitch_testbed.kubeclient import ApiError, pods_path
from kvswitch_testbed.netns import create_netns, delete_netns, list_netns, netns_socket, run

from kvswitch.cni.contract import (
    DEFAULT_BRIDGE,
    HOST_IF_PREFIX,
    ID_OWNER,
    LINK_ALIAS_PREFIX,
    NETWORK_NAME,
    PLUGIN_NAME,
    host_ifname,
)
from kvswitch.cni.netlink import Netns, open_rtnl
from kvswitch.cni.spec import FAILPOINT_ENV
from kvswitch.ovs.pipeline import GATEWAY_PORT, OWNER_MASK, TUNNEL_PORT, Category, cookie_category, owner_hash

NAMESPACE = "soak"
EXHAUST_OWNER = "soak-ipam-exhaustion"  # container id of the placeholder reservations
FAULTS = ("ovsdb-restart", "vswitchd-restart", "agent-kill", "ipam-exhausted", "ipam-failpoint")
ADD_GIVE_UP = 90.0  # seconds a pod may take to start through faults before the soak calls it a failure
DEL_GIVE_UP = 90.0
LOCKED = {"role": "locked"}  # pods the soak's NetworkPolicy isolates (default-deny ingress)
LOCKED_EVERY = 4
RESERVE = 100.0  # seconds of the budget kept for convergence, checks and teardown


def say(msg: str) -> None:
    print(msg, flush=True)


# --- the kubelet's part ------------------------------------------------------------------------


@dataclass
class Sandbox:
    pod: str
    node: Node
    netns: str
    container_id: str
    result: Any = None
    ip: str = ""
    locked: bool = False

    @property
    def host_if(self) -> str:
        return host_ifname(NETWORK_NAME, self.container_id, "eth0")

    def attachment(self) -> Attachment:
        args = f"IgnoreUnknown=1;K8S_POD_NAMESPACE={NAMESPACE};K8S_POD_NAME={self.pod};K8S_POD_UID={self.pod}"
        return Attachment(container_id=self.container_id, netns=netns_path(self.netns), args=args)


@dataclass
class Stats:
    lock: threading.Lock = field(default_factory=threading.Lock)
    add_calls: int = 0
    add_failed: collections.Counter[str] = field(default_factory=collections.Counter)
    del_calls: int = 0
    del_failed: collections.Counter[str] = field(default_factory=collections.Counter)
    pods_started: int = 0
    pods_stopped: int = 0
    add_gave_up: list[str] = field(default_factory=list)
    del_gave_up: list[str] = field(default_factory=list)
    longest_add: float = 0.0
    longest_del: float = 0.0
    locked_probed: int = 0
    locked_open: list[str] = field(default_factory=list)

    def failed(self, counter: collections.Counter[str], exc: BaseException) -> None:
        with self.lock:
            counter[reason(exc)] += 1


def reason(exc: BaseException) -> str:
    """A short key for a failure: the CNI error code and message."""
    if isinstance(exc, PluginFailed):
        try:
            err = exc.run.json()
            return f"{exc.args[0].split(':')[0]}: {err.get('code')} {err.get('msg', '')}"[:90]
        except ValueError:
            return str(exc)[:90]
    return f"{type(exc).__name__}: {exc}"[:90]


def api_call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """An API request, retried as the kubelet's client does when the server is slow or away (a
    create that timed out may have been done: its retry's 409 counts as done)."""
    deadline = time.monotonic() + 120
    tried = False
    while True:
        try:
            return fn(*args, **kwargs)
        except (OSError, ApiError) as exc:  # timeouts and connection errors are OSErrors
            if isinstance(exc, ApiError) and exc.status == 409 and tried:
                return None
            tried = True
            if isinstance(exc, ApiError) and exc.status < 500 and exc.status != 429:
                raise
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


class Kubelet:
    """Starts and stops pods as the kubelet and its runtime do, with their retries."""

    def __init__(self, cluster: Cluster, stats: Stats) -> None:
        self.cluster = cluster
        self.stats = stats
        self.conflists = {name: cluster.conflist(node) for name, node in cluster.bed.nodes.items()}
        self._sandboxes = 0
        self._lock = threading.Lock()

    def _new_sandbox(self, pod: str, node: Node) -> Sandbox:
        with self._lock:
            self._sandboxes += 1
            n = self._sandboxes
        netns = f"{self.cluster.bed.prefix}-p-s{n}"
        create_netns(netns)
        return Sandbox(pod, node, netns, uuid.uuid4().hex)

    def start(self, pod: str, node: Node, locked: bool = False) -> Sandbox | None:
        """The pod in the API, then sandboxes until one's ADD succeeds (None: gave up)."""
        client = self.cluster.client
        api_call(
            client.create,
            pods_path(NAMESPACE),
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": pod,
                    "namespace": NAMESPACE,
                    "labels": {"app": "soak", **(LOCKED if locked else {})},
                },
                "spec": {"nodeName": node.name, "containers": [{"name": "main", "image": "sandbox"}]},
            },
        )
        t0 = time.monotonic()
        backoff = 0.1
        while True:
            sb = self._new_sandbox(pod, node)
            with self.stats.lock:
                self.stats.add_calls += 1
            try:
                sb.result = self.conflists[node.name].add(sb.attachment())
            except Exception as exc:  # PluginFailed, or a plugin that hung past the runtime's timeout
                self.stats.failed(self.stats.add_failed, exc)
                self.teardown(sb)  # the runtime tears a failed sandbox down before trying again
                if time.monotonic() - t0 > ADD_GIVE_UP:
                    with self.stats.lock:
                        self.stats.add_gave_up.append(f"{pod}: {reason(exc)}")
                    api_call(client.delete, f"{pods_path(NAMESPACE)}/{pod}")
                    return None
                time.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            sb.ip = next(ip["address"].split("/")[0] for ip in sb.result["ips"] if ":" not in ip["address"])
            sb.locked = locked
            api_call(  # the kubelet reports the pod's IP
                client.request,
                "PATCH",
                f"{pods_path(NAMESPACE)}/{pod}/status",
                {"status": {"phase": "Running", "podIP": sb.ip, "podIPs": [{"ip": sb.ip}]}},
                content_type="application/merge-patch+json",
            )
            with self.stats.lock:
                self.stats.pods_started += 1
                self.stats.longest_add = max(self.stats.longest_add, time.monotonic() - t0)
            return sb

    def teardown(self, sb: Sandbox) -> bool:
        """CNI DEL until it succeeds, then the sandbox goes; False when DEL never succeeded."""
        t0 = time.monotonic()
        backoff = 0.1
        ok = True
        while True:
            with self.stats.lock:
                self.stats.del_calls += 1
            try:
                self.conflists[sb.node.name].delete(sb.attachment(), sb.result)
                break
            except Exception as exc:
                self.stats.failed(self.stats.del_failed, exc)
                if time.monotonic() - t0 > DEL_GIVE_UP:
                    with self.stats.lock:
                        self.stats.del_gave_up.append(f"{sb.pod}/{sb.container_id}: {reason(exc)}")
                    ok = False
                    break
                time.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
        with self.stats.lock:
            self.stats.longest_del = max(self.stats.longest_del, time.monotonic() - t0)
        delete_netns(sb.netns)
        return ok

    def stop(self, sb: Sandbox) -> None:
        self.teardown(sb)
        api_call(self.cluster.client.delete, f"{pods_path(NAMESPACE)}/{sb.pod}")
        with self.stats.lock:
            self.stats.pods_stopped += 1


# --- faults ------------------------------------------------------------------------------------


class Faults:
    """Injects one fault at a time, at random moments, until stopped; every fault heals itself."""

    def __init__(
        self, cluster: Cluster, kubelet: Kubelet, rng: random.Random, gap: tuple[float, float]
    ) -> None:
        self.cluster, self.kubelet, self.rng, self.gap = cluster, kubelet, rng, gap
        self.done = threading.Event()
        self.log: list[str] = []
        self.counts: collections.Counter[str] = collections.Counter()
        self.errors: list[str] = []
        self.t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="faults", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.done.set()
        self._thread.join(120)

    def _run(self) -> None:
        nodes = list(self.cluster.bed.nodes.values())
        while not self.done.wait(self.rng.uniform(*self.gap)):
            kind, node = self.rng.choice(FAULTS), self.rng.choice(nodes)
            try:
                detail = self.inject(kind, node)
            except Exception as exc:
                self.errors.append(f"{kind} on {node.name}: {exc!r}")
                detail = f"FAILED: {exc!r}"
            self.counts[kind] += 1
            self.log.append(f"{time.monotonic() - self.t0:7.1f}s {kind:<17} {node.name} {detail}")

    def inject(self, kind: str, node: Node) -> str:
        rng = self.rng
        down = round(rng.uniform(0.0, 1.5), 2)
        sig = rng.choice((signal.SIGKILL, signal.SIGTERM))
        if kind == "ovsdb-restart":
            node.ovs.restart_ovsdb(down, sig)
            return f"{sig.name}, down {down}s"
        if kind == "vswitchd-restart":
            node.ovs.restart_vswitchd(down, sig)
            return f"{sig.name}, down {down}s"
        if kind == "agent-kill":
            self.cluster.processes[f"agent-{node.name}"].stop(signal.SIGKILL)
            time.sleep(down)
            self.cluster.start_agent(node)
            return f"SIGKILL, restarted after {down}s"
        if kind == "ipam-exhausted":
            held = fill_range(self.cluster, node)
            time.sleep(down)
            release_range(held)
            return f"{len(held)} free addresses taken for {down}s"
        if kind == "ipam-failpoint":
            plugins = self.kubelet.conflists[node.name].plugins
            plugins.extra_env[FAILPOINT_ENV] = "ipam"
            time.sleep(down)
            plugins.extra_env.pop(FAILPOINT_ENV, None)
            return f"ADD fails after the IPAM allocation for {down}s"
        raise ValueError(kind)


def ipam_dir(cluster: Cluster, node: Node) -> Path:
    return cluster.node_dir(node) / "ipam" / NETWORK_NAME


@contextlib.contextmanager
def host_local_lock(directory: Path) -> Iterator[None]:
    """host-local's own lock (flock on <dataDir>/<network>/lock): its allocations wait meanwhile."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def fill_range(cluster: Cluster, node: Node) -> list[Path]:
    """Reserve every free address of the node's range as host-local would for another owner."""
    d = ipam_dir(cluster, node)
    net = ipaddress.IPv4Network(cluster.pod_cidr(node))
    held = []
    with host_local_lock(d):
        for ip in list(net.hosts())[1:]:  # .1 is the gateway
            path = d / str(ip)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{EXHAUST_OWNER}\r\neth0")
            held.append(path)
    return held


def release_range(held: list[Path]) -> None:
    if held:
        with host_local_lock(held[0].parent):
            for path in held:
                path.unlink(missing_ok=True)


# --- what exists ---------------------------------------------------------------------------------


@dataclass
class Inventory:
    """What a node holds of pod attachments that it should not (leaks) or lacks (missing)."""

    leaks: dict[str, list[str]] = field(default_factory=dict)
    missing: dict[str, list[str]] = field(default_factory=dict)

    def leak_count(self, kind: str) -> int:
        return len(self.leaks.get(kind, []))


COOKIE = re.compile(r"cookie=(0x[0-9a-f]+)")
HOST_IF = re.compile(HOST_IF_PREFIX + "[0-9a-f]{12}")  # contract.host_ifname
LEAK_KINDS = ("veths", "ovs ports", "ipam addresses", "pod flows", "namespaces", "processes")


def node_inventory(cluster: Cluster, node: Node, live: list[Sandbox]) -> Inventory:
    inv = Inventory()
    mine = {sb.host_if: sb for sb in live if sb.node is node}
    # host ends of veths (by the plugin's name prefix or its alias)
    with Netns(netns_path(node.netns)) as ns, open_rtnl(ns.fd) as rtnl:
        links = {
            link.name
            for link in rtnl.links()
            if HOST_IF.fullmatch(link.name) or link.alias.startswith(LINK_ALIAS_PREFIX)
        }
    inv.leaks["veths"] = sorted(links - mine.keys())
    inv.missing["veths"] = sorted(mine.keys() - links)
    # OVS ports: those the plugin made, and anything else on the bridge that is no node port
    out = node.ovs.vsctl("--format=json", "--columns=name,external_ids", "list", "port").stdout
    owned, others = set(), set()
    for name, ids in json.loads(out)["data"]:
        if dict(ids[1]).get(ID_OWNER) == PLUGIN_NAME:
            owned.add(name)
        else:
            others.add(name)
    on_bridge = set(node.ovs.vsctl("list-ports", DEFAULT_BRIDGE).stdout.split())
    stray = (on_bridge & others) - {DEFAULT_BRIDGE, GATEWAY_PORT, TUNNEL_PORT}
    inv.leaks["ovs ports"] = sorted((owned - mine.keys()) | stray)
    inv.missing["ovs ports"] = sorted(mine.keys() - owned)
    # host-local's reservations
    ids = {sb.container_id for sb in mine.values()}
    reserved: dict[str, str] = {}
    d = ipam_dir(cluster, node)
    if d.is_dir():
        for f in d.iterdir():
            if f.name[0].isdigit():
                with contextlib.suppress(FileNotFoundError):
                    reserved[f.name] = f.read_text().strip().partition("\n")[0].strip()
    inv.leaks["ipam addresses"] = sorted(
        f"{ip} ({cid[:12]})" for ip, cid in reserved.items() if cid not in ids
    )
    held = {cid for cid in reserved.values()}
    inv.missing["ipam addresses"] = sorted(sb.pod for sb in mine.values() if sb.container_id not in held)
    # flows of the POD category whose owner (the port) is not a live pod's
    expected = {owner_hash(port): port for port in mine}
    dump = node.ovs.ofctl("dump-flows", DEFAULT_BRIDGE).stdout
    owners: collections.Counter[int] = collections.Counter()
    for m in COOKIE.finditer(dump):
        cookie = int(m.group(1), 16)
        if cookie_category(cookie) == Category.POD:
            owners[cookie & OWNER_MASK] += 1
    inv.leaks["pod flows"] = sorted(
        f"owner {h:010x}: {n} flows" for h, n in owners.items() if h not in expected
    )
    inv.missing["pod flows"] = sorted(port for h, port in expected.items() if h not in owners)
    return inv


def scan_processes(workdir: Path) -> dict[int, str]:
    """Processes of this run: named in their command line, or marked in their environment
    (KVSWITCH_RUN_DIR for the daemons, CNI_PATH of a node's bin dir for plugins)."""
    needle = str(workdir).encode()
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes()
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            continue
        if needle in cmdline or needle in environ:
            found[int(proc.name)] = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
    return found


def process_leaks(cluster: Cluster) -> list[str]:
    """Processes beyond one ovsdb-server, one ovs-vswitchd and one agent per node and the
    controller (anything else, e.g. a plugin still running; seen twice 1 s apart: the agents'
    short-lived ovs-ofctl children are not leaks)."""
    first = scan_processes(cluster.workdir)
    time.sleep(1.0)
    now = scan_processes(cluster.workdir)
    lasting = {pid: cmd for pid, cmd in now.items() if first.get(pid) == cmd}
    expected: dict[str, int] = collections.Counter()
    leaks = []
    for pid, cmd in sorted(lasting.items()):
        kind = None
        for node in cluster.bed.nodes.values():
            where = f"{node.ovs.workdir}/"
            if cmd.startswith("ovsdb-server") and where in cmd:
                kind = f"ovsdb-server {node.name}"
            elif cmd.startswith("ovs-vswitchd") and where in cmd:
                kind = f"ovs-vswitchd {node.name}"
            elif "k-vswitchd" in cmd and _environ_has(pid, f"NODE_NAME={node.name}"):
                kind = f"agent {node.name}"
        if "k-vswitch-controller" in cmd:
            kind = "controller"
        if kind is not None and expected[kind] == 0:
            expected[kind] += 1
        else:
            leaks.append(f"{pid}: {cmd[:100]}")
    return leaks


def _environ_has(pid: int, entry: str) -> bool:
    try:
        return entry.encode() in (Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
    except OSError:
        return False


def inventory(cluster: Cluster, live: list[Sandbox]) -> Inventory:
    total = Inventory()
    for node in cluster.bed.nodes.values():
        inv = node_inventory(cluster, node, live)
        for attr in ("leaks", "missing"):
            for kind, items in getattr(inv, attr).items():
                getattr(total, attr).setdefault(kind, []).extend(f"{node.name}: {i}" for i in items)
    live_ns = {sb.netns for sb in live}
    pod_ns = [ns for ns in list_netns() if ns.startswith(f"{cluster.bed.prefix}-p-")]
    total.leaks["namespaces"] = sorted(set(pod_ns) - live_ns)
    total.missing["namespaces"] = sorted(live_ns - set(pod_ns))
    total.leaks["processes"] = process_leaks(cluster)
    return total


def converge(cluster: Cluster, live: list[Sandbox], timeout: float) -> tuple[Inventory, float]:
    """Inventory until nothing is leaked or missing (the agents finish asynchronously), bounded."""
    t0 = time.monotonic()
    while True:
        inv = inventory(cluster, live)
        clean = not any(inv.leaks.values()) and not any(inv.missing.values())
        if clean or time.monotonic() - t0 > timeout:
            return inv, time.monotonic() - t0
        time.sleep(1.0)


def report_inventory(title: str, inv: Inventory, took: float) -> int:
    leaked = sum(inv.leak_count(k) for k in LEAK_KINDS)
    say(f"{title} (converged after {took:.1f}s):")
    say("  leaked: " + ", ".join(f"{k} {inv.leak_count(k)}" for k in LEAK_KINDS))
    for kind in LEAK_KINDS:
        for item in inv.leaks.get(kind, [])[:10]:
            say(f"    {kind}: {item}")
    missing = {k: v for k, v in inv.missing.items() if v}
    if missing:
        say(f"  live pods lacking pieces: { {k: v[:5] for k, v in missing.items()} }")
    return leaked + sum(len(v) for v in missing.values())


def _checksum(data: bytes) -> int:
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data + b"\0" * (len(data) % 2)))
    total = (total >> 16) + (total & 0xFFFF)
    return ~(total + (total >> 16)) & 0xFFFF


def echo(netns: str, dst: str, timeout: float) -> bool:
    """One ICMP echo from ``netns`` to ``dst`` (raw socket, no retry): answered within ``timeout``?"""
    ident, seq = random.getrandbits(16), random.getrandbits(16)
    body = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"soak"
    packet = struct.pack("!BBHHH", 8, 0, _checksum(body), ident, seq) + b"soak"
    with netns_socket(netns, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as sock:
        sock.sendto(packet, (dst, 0))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0 and select.select([sock], [], [], left)[0]:
            data = sock.recv(2048)
            ihl = (data[0] & 0x0F) * 4
            if len(data) < ihl + 8:
                continue
            kind, _, _, rid, rseq = struct.unpack("!BBHHH", data[ihl : ihl + 8])
            if (kind, rid, rseq) == (0, ident, seq):
                return True
    return False


def ping(src: Sandbox, dst: Sandbox, attempts: int = 3) -> bool:
    for _ in range(attempts):
        if run(["ping", "-c", "1", "-W", "1", dst.ip], src.netns, check=False).returncode == 0:
            return True
    return False


def reachability(live: list[Sandbox]) -> tuple[list[str], list[str]]:
    """Every surviving pod pinged from another one (on another node when there is one): the
    unreachable ones, and the isolated ones that answered."""
    failed, open_ = [], []
    for i, dst in enumerate(live):
        others = [sb for sb in live if sb is not dst and not sb.locked]
        if not others:
            break
        remote = [sb for sb in others if sb.node is not dst.node]
        pool = remote or others
        src = pool[i % len(pool)]
        what = f"{src.pod}@{src.node.name} -> {dst.pod}@{dst.node.name} ({dst.ip})"
        if dst.locked:
            if echo(src.netns, dst.ip, timeout=1.0):
                open_.append(what)
        elif not ping(src, dst):
            failed.append(what)
    return failed, open_


# --- the run -----------------------------------------------------------------------------------


class Soak:
    def __init__(self, args: argparse.Namespace, cluster: Cluster) -> None:
        self.args = args
        self.cluster = cluster
        self.stats = Stats()
        self.kubelet = Kubelet(cluster, self.stats)
        self.rng = random.Random(args.seed)
        self.live: list[Sandbox] = []
        self.busy: set[str] = set()
        self.lock = threading.Lock()
        self.started = 0
        self.cycles = 0
        self.deadline = 0.0
        self.faults: Faults | None = None
        self.finished = threading.Event()

    def node_for(self, rng: random.Random) -> Node:
        return rng.choice(list(self.cluster.bed.nodes.values()))

    def warm_up(self) -> None:
        n = 0
        for node in self.cluster.bed.nodes.values():
            for _ in range(self.args.live_per_node):
                n += 1
                sb = self.kubelet.start(f"keep{n}", node)
                if sb is None:
                    raise RuntimeError("a pod could not start before any fault")
                self.live.append(sb)

    def worker(self, wid: int) -> None:
        rng = random.Random(f"{self.args.seed}-{wid}")
        while True:
            with self.lock:
                if self.started >= self.args.cycles or time.monotonic() > self.deadline:
                    return
                self.started += 1
                i = self.started
            locked = i % LOCKED_EVERY == 0
            sb = self.kubelet.start(f"p{i}", self.node_for(rng), locked)
            if sb is not None and locked:
                self.probe_locked(sb, rng)
            with self.lock:
                idle = [s for s in self.live if s.pod not in self.busy]
                victim = rng.choice(idle) if idle else None
                if victim is not None:
                    self.live.remove(victim)
                    self.busy.add(victim.pod)
                if sb is not None:
                    self.live.append(sb)
            if victim is not None:
                self.kubelet.stop(victim)
                with self.lock:
                    self.busy.discard(victim.pod)
                    self.cycles += 1

    def probe_locked(self, sb: Sandbox, rng: random.Random) -> None:
        """Right after ADD returned: one echo from another pod to the isolated pod goes unanswered."""
        with self.lock:
            probers = [s for s in self.live if not s.locked and s.pod not in self.busy]
            prober = rng.choice(probers) if probers else None
            if prober is not None:
                self.busy.add(prober.pod)
        if prober is None:
            return
        try:
            answered = echo(prober.netns, sb.ip, timeout=0.3)
        finally:
            with self.lock:
                self.busy.discard(prober.pod)
        evidence = ""
        if answered:  # what the pod's node holds for it right now (flow ages tell the order)
            dump = sb.node.ovs.ofctl("dump-flows", DEFAULT_BRIDGE, f"ip,nw_dst={sb.ip}", check=False).stdout
            evidence = "; ".join(
                re.sub(r" (n_packets|n_bytes|idle_age)=[^,]*,", "", line.strip())
                for line in dump.splitlines()[1:]
            )
        with self.stats.lock:
            self.stats.locked_probed += 1
            if answered:
                self.stats.locked_open.append(
                    f"{sb.pod}@{sb.node.name} ({sb.ip}) answered {prober.pod}; flows: {evidence}"
                )

    def run(self, t_begin: float) -> tuple[int, float]:
        self.deadline = t_begin + self.args.budget - RESERVE
        faults = Faults(
            self.cluster, self.kubelet, self.rng, (self.args.fault_gap_min, self.args.fault_gap_max)
        )
        workers = [
            threading.Thread(target=self.worker, args=(w,), name=f"kubelet-{w}")
            for w in range(self.args.workers)
        ]
        t0 = time.monotonic()
        faults.start()
        progress = threading.Thread(target=self._progress, args=(t0,), daemon=True)
        for w in workers:
            w.start()
        progress.start()
        for w in workers:
            w.join()
        self.finished.set()
        faults.stop()
        self.faults = faults
        return self.cycles, time.monotonic() - t0

    def _progress(self, t0: float) -> None:
        while not self.finished.wait(30):
            st = self.stats
            with st.lock:
                say(
                    f"  {time.monotonic() - t0:5.0f}s: {self.cycles} cycles, {st.add_calls} ADD calls "
                    f"({sum(st.add_failed.values())} failed), {st.del_calls} DEL calls "
                    f"({sum(st.del_failed.values())} failed), {len(self.live)} live pods"
                )

    def heal(self) -> None:
        """Every daemon running again (each fault restarts what it stopped; this checks it)."""
        for node in self.cluster.bed.nodes.values():
            if node.ovs.ovsdb_pid is None or node.ovs.vswitchd_pid is None:
                raise RuntimeError(f"{node.name}: OVS not running after the faults")
            proc = self.cluster.processes[f"agent-{node.name}"]
            if proc.popen.poll() is not None:
                raise RuntimeError(f"{node.name}: agent exited ({proc.popen.returncode})")
            sock = self.cluster.node_dir(node) / "cni.sock"
            t0 = time.monotonic()
            while not _answers(sock) and time.monotonic() - t0 < 60:
                time.sleep(0.2)


def _answers(path: Path) -> bool:
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def keep_logs(cluster: Cluster, dest: Path) -> None:
    """Copy the agents', controller's and OVS daemons' logs before the run directory goes."""
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    for log in [*cluster.workdir.glob("*.log"), *cluster.workdir.glob("*/*.log")]:
        name = log.name if log.parent == cluster.workdir else f"{log.parent.name}-{log.name}"
        with contextlib.suppress(OSError):
            shutil.copy(log, dest / name)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cycles", type=int, default=1000)
    parser.add_argument("--budget", type=float, default=600.0, help="seconds for the whole run")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--workers", type=int, default=4, help="pod starts/stops in flight")
    parser.add_argument("--live-per-node", type=int, default=4, help="pods alive throughout")
    parser.add_argument("--fault-gap-min", type=float, default=2.0)
    parser.add_argument("--fault-gap-max", type=float, default=6.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--logs", type=Path, default=None, help="keep the daemons' logs here")
    args = parser.parse_args()
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 31)

    t_begin = time.monotonic()
    cluster = Cluster(nodes=args.nodes, say=lambda m: None)
    problems: list[str] = []
    leaked = 0
    soak: Soak | None = None
    try:
        cluster.start()
        cluster.client.create(
            "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
        )
        api_call(
            cluster.client.create,
            f"/apis/networking.k8s.io/v1/namespaces/{NAMESPACE}/networkpolicies",
            {
                "apiVersion": "networking.k8s.io/v1",
                "kind": "NetworkPolicy",
                "metadata": {"name": "deny-locked", "namespace": NAMESPACE},
                "spec": {"podSelector": {"matchLabels": LOCKED}, "policyTypes": ["Ingress"]},
            },
        )
        say(
            f"soak run {cluster.bed.run_id}: seed {args.seed}, {args.nodes} nodes, {args.workers} workers, "
            f"target {args.cycles} cycles within {args.budget:.0f}s "
            f"(cluster up in {time.monotonic() - t_begin:.1f}s)"
        )
        soak = Soak(args, cluster)
        soak.warm_up()
        cycles, took = soak.run(t_begin)
        st, faults = soak.stats, soak.faults
        assert faults is not None
        short = "" if cycles >= args.cycles else f"  -- SHORT of the {args.cycles} asked: the budget ran out"
        say(f"cycles: {cycles} ADD/DEL cycles in {took:.0f}s{short}")
        say(f"faults: {sum(faults.counts.values())} injected: " +
            ", ".join(f"{k} {faults.counts[k]}" for k in FAULTS))  # fmt: skip
        for line in faults.log:
            say(f"  {line}")
        say(f"ADD calls {st.add_calls}, failed {sum(st.add_failed.values())} (retried in a new sandbox); "
            f"slowest pod start {st.longest_add:.1f}s")  # fmt: skip
        for why, n in st.add_failed.most_common():
            say(f"  {n:4d} x {why}")
        say(f"DEL calls {st.del_calls}, failed {sum(st.del_failed.values())} (retried); "
            f"longest DEL retry {st.longest_del:.1f}s")  # fmt: skip
        for why, n in st.del_failed.most_common():
            say(f"  {n:4d} x {why}")
        say(f"isolated pods probed right after ADD: {st.locked_probed}, answered: {len(st.locked_open)}")
        for x in st.locked_open:
            say(f"  OPEN: {x}")
        problems += [f"isolated pod open after ADD: {x}" for x in st.locked_open]
        problems += [f"fault injection failed: {x}" for x in faults.errors]

        soak.heal()
        inv, conv = converge(cluster, soak.live, timeout=45.0)
        leaked += report_inventory(f"with {len(soak.live)} pods alive", inv, conv)
        unreachable, isolated_open = reachability(soak.live)
        alive = len(soak.live)
        locked = sum(sb.locked for sb in soak.live)
        say(
            f"surviving pods: {alive}, reachable {alive - locked - len(unreachable)}/{alive - locked}; "
            f"isolated {locked}, answering {len(isolated_open)}"
        )
        for u in unreachable:
            say(f"  unreachable: {u}")
        problems += [f"unreachable: {u}" for u in unreachable]
        problems += [f"isolated pod answered: {u}" for u in isolated_open]

        for sb in list(soak.live):
            soak.kubelet.stop(sb)
            soak.live.remove(sb)
        inv, conv = converge(cluster, [], timeout=30.0)
        leaked += report_inventory("after deleting every pod", inv, conv)
        problems += [f"ADD never succeeded: {x}" for x in st.add_gave_up]
        problems += [f"DEL never succeeded: {x}" for x in st.del_gave_up]
    except Exception as exc:
        problems.append(f"soak aborted: {exc!r}")
        if soak is not None:
            soak.deadline = 0
        say(cluster.tail_logs(20))
        raise
    finally:
        if args.logs is not None:
            keep_logs(cluster, args.logs)
        cluster.stop()
        report = find_leaks(cluster.bed.run_id)
        say(f"test-bed leak check after teardown: {report}")
        if report:
            leaked += 1
        elapsed = time.monotonic() - t_begin
        say(f"total {elapsed:.0f}s")
    if leaked or problems:
        for p in problems:
            say(f"FAIL: {p}")
        say(f"RESULT: FAIL ({leaked} leaked or missing, {len(problems)} other problems)")
        return 1
    say("RESULT: PASS (0 leaks, every surviving pod reachable)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
