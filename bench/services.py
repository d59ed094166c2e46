"""The OpenFlow service proxy at scale, in one run, on one real-OVS node with a real agent.

The agent (NodeAgent, in-process) owns the node's bridge; pods are wired by k-vswitch-cni; Services
and EndpointSlices are handed to it as the API would send them. Raw figures run ``ovs-ofctl`` on the
same bridge with exactly the bundle text the agent sent (recorded), so ratios compare like with like.

(a) full sync of 10,000 ClusterIP Services x 10 endpoints: NodeAgent.apply_services (translate all +
    one reconciler bundle of groups and flows)  vs  ``ovs-ofctl bundle`` of the same file (<= 1.5x)
(b) one endpoint gained/lost by one Service among them, API object -> in OVS (set_endpoint_slice +
    apply_services)  vs  the raw bundle of that change; p50/p99 (<= 2x)
(c) TCP connect time from a client pod to a ClusterIP backed by real listening sockets, with 1k vs
    10k Services installed: p50/p99, ratio of the p99s (within 10 %)
(d) one Service with 5,000 endpoints: 5 real backend pods x 1,000 target ports each (one process per
    pod listens on all its ports), so every endpoint answers. Install time, balance over the pods
    and endpoints, connect p50/p99 against the 10-endpoint Service (<= 2x)
(e) select groups above 256 buckets: what OVS chose for groups of 10 / 256 / 257 / 5,000 buckets
    (its own debug log) and datapath upcalls per new connection

Backends and probes run as separate processes inside the pods (this file with --serve/--probe).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import ipaddress
import json
import logging
import math
import os
import pstats
import random
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvswitch_testbed import Node, TestBed, find_leaks
from kvswitch_testbed.bed import agent_settings
from kvswitch_testbed.cni_runner import Attachment, ConfList, Plugins, netns_path

from kvswitch.cni.contract import CONFLIST_NAME
from kvswitch.config import parse_spec
from kvswitch.node.agent import NodeAgent
from kvswitch.ovs.openflow import Ofctl, OfctlError
from kvswitch.ovs.pipeline import Category, Owner, cookie_category, make_cookie
from kvswitch.services.flows import service_flows
from kvswitch.services.model import Endpoint, parse_service, parse_slice

NS = "bench"
SERVICE_PORT = 80
WEB_IP = "10.96.0.10"  # 10 endpoints: the 5 backends x ports 8080, 8081
BIG_IP = "10.96.0.20"  # 5,000 endpoints: the 5 backends x ports 20000..20999
BUDDY_IP = "10.96.0.22"  # a small Service batched with the 5,000-endpoint one
MID_IP = "10.96.0.21"  # 1,000 endpoints: the 5 backends x ports 20000..20199
RAW_GID = 0xF00000  # the 5,000-bucket group the bench installs itself
CHUNK = 500  # buckets per group mod when the bench installs a big group
EDGE_IPS = {256: "10.96.0.31", 257: "10.96.0.32"}
WEB_PORTS = (8080, 8081)
BIG_BASE_PORT = 20000
BACKENDS = 5


# --- the processes inside pods ---------------------------------------------------------------


def serve(name: str, ports: list[int]) -> None:
    """A backend pod: one listener per port on 0.0.0.0; every connection gets ``name port``."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    async def main() -> None:
        def handler(port: int) -> Any:
            async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                writer.write(f"{name} {port}\n".encode())
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
                writer.close()

            return answer

        servers = [await asyncio.start_server(handler(p), "0.0.0.0", p, backlog=512) for p in ports]
        print("ready", flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        for s in servers:
            s.close()

    asyncio.run(main())


def thread_cpu_ns(pid: int) -> int:
    """CPU time of every thread of ``pid`` so far, in ns (schedstat: finer than /proc/pid/stat)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            total += int((task / "schedstat").read_text().split()[0])
    return total


def probe(ip: str, port: int, count: int, warmup: int, vswitchd: int) -> None:
    """A client pod: ``count`` new TCP connections one after another; prints their connect times
    (SYN out to SYN-ACK in, through OVS both ways) and who answered, as JSON. Each connection
    binds the next client port of a random run, so every one is a new 5-tuple (the kernel's own
    choice reuses ports: 2,000 connections got ~1,800 distinct ones)."""
    out: list[tuple[float, str, int]] = []
    errors = 0
    base = random.randrange(10_000, 60_000 - warmup - count)
    cpu0 = thread_cpu_ns(vswitchd) if not warmup else 0
    for i in range(warmup + count):
        if i == warmup and warmup:
            cpu0 = thread_cpu_ns(vswitchd)
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(3.0)
        try:
            s.bind(("0.0.0.0", base + i))
            t0 = time.perf_counter()
            s.connect((ip, port))
            t1 = time.perf_counter()
            local_port = s.getsockname()[1]
            data = b""
            while chunk := s.recv(256):
                data += chunk
        except OSError:
            errors += i >= warmup
            continue
        finally:
            s.close()
        if i >= warmup:
            out.append((t1 - t0, data.decode().strip(), local_port))
    cpu = thread_cpu_ns(vswitchd) - cpu0  # ovs-vswitchd's CPU during the measured connections
    json.dump({"samples": out, "errors": errors, "vswitchd_ns": cpu}, sys.stdout)


# --- figures ---------------------------------------------------------------------------------


def pct(values: list[float], q: int) -> float:
    """The q-th percentile (nearest rank)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def svc_obj(name: str, ip: str) -> dict[str, Any]:
    return {
        "metadata": {"namespace": NS, "name": name},
        "spec": {
            "clusterIP": ip,
            "ports": [{"name": "http", "port": SERVICE_PORT, "targetPort": 8080, "protocol": "TCP"}],
        },
    }


def slice_obj(service: str, suffix: str, port: int, addresses: list[tuple[str, str]]) -> dict[str, Any]:
    """One EndpointSlice of ``service``: the given (address, node) endpoints on target ``port``."""
    return {
        "metadata": {
            "namespace": NS,
            "name": f"{service}-{suffix}",
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": [a], "nodeName": n, "conditions": {"ready": True}} for a, n in addresses],
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
    }


def key(obj: dict[str, Any]) -> str:
    return f"{obj['metadata']['namespace']}/{obj['metadata']['name']}"


def bulk_ip(i: int) -> str:
    return str(ipaddress.IPv4Address("10.100.0.0") + i)  # ClusterIPs of the bulk Services


def fake_endpoint(j: int) -> str:
    return str(ipaddress.IPv4Address("10.200.0.0") + j)  # endpoints that nobody connects to


@dataclass(frozen=True)
class RecordingOfctl(Ofctl):
    """The agent's ovs-ofctl, keeping what each bundle sent so the raw baseline sends the same."""

    sent: list[tuple[tuple[str, ...], str]] = field(default_factory=list, compare=False)

    async def _run(self, *args: str, input: str | None = None) -> str:
        if input is not None and args and args[0] in ("bundle", "--bundle"):
            self.sent.append((args, input))
        return await super()._run(*args, input=input)

    @contextlib.asynccontextmanager
    async def streamed_bundle(self) -> AsyncIterator[Callable[[list[str]], Awaitable[None]]]:
        lines: list[str] = []
        async with super().streamed_bundle() as send:

            async def tee(chunk: list[str]) -> None:
                lines.extend(chunk)
                await send(chunk)

            yield tee
        if lines:
            self.sent.append((("bundle", self.target, "-"), "\n".join(lines) + "\n"))

    def take(self) -> list[tuple[tuple[str, ...], str]]:
        out = list(self.sent)
        self.sent.clear()
        return out


def is_service_bundle(text: str) -> bool:
    """Whether a bundle carries groups or flows of the service proxy (by their cookies)."""
    cookies = re.findall(r"cookie=(0x[0-9a-f]+)", text)
    return "group " in text or any(cookie_category(int(c, 16)) == Category.SERVICE for c in cookies)


def inverse(text: str) -> str:
    """A bundle undoing an ``ovs-ofctl bundle`` text of group adds and flow adds."""
    lines = []
    for line in text.splitlines():
        if line.startswith("flow add "):
            spec = line[len("flow add ") :].split(" actions=", 1)[0]
            spec = re.sub(r"^cookie=0x[0-9a-f]+,", "", spec)
            lines.append(f"flow delete_strict {spec}")
        elif line.startswith("group add"):
            gid = re.search(r"group_id=(\d+)", line)
            assert gid is not None
            lines.append(f"group delete group_id={gid.group(1)}")
    groups = [x for x in lines if x.startswith("group")]
    return "\n".join([x for x in lines if x.startswith("flow")] + groups) + "\n"


class Bench:
    def __init__(self, bed: TestBed, args: argparse.Namespace) -> None:
        self.bed, self.args = bed, args
        self.node: Node | None = None
        self.agent: NodeAgent | None = None
        self.ofctl: RecordingOfctl | None = None
        self.procs: list[subprocess.Popen[bytes]] = []
        self.pods: dict[str, tuple[str, str]] = {}  # name -> (netns, ip)
        self.scratch = Path()
        self.summary: list[str] = []
        self.client_ports = 0  # distinct client ports (so distinct 5-tuples) of the last connect()
        self.vswitchd_ns = 0  # ovs-vswitchd's CPU (all threads) during the last connect()

    # --- set-up ------------------------------------------------------------------------------

    async def start(self) -> None:
        node = self.node = self.bed.add_node()
        d = self.bed.workdir / node.name
        self.scratch = d / "bench"
        self.scratch.mkdir(parents=True, exist_ok=True)
        agent = self.agent = NodeAgent(
            # no periodic full resync in the middle of a figure
            agent_settings(node, d, resync_interval=3600.0)
        )
        await agent.start()
        spec = parse_spec(
            {
                "clusterCIDR": "10.244.0.0/16",
                "podCIDR": f"10.244.{node.index}.0/24",
                "serviceCIDR": "10.96.0.0/12",
                "overlayType": "vxlan",
                "overlayIP": node.underlay_ip,
            }
        )
        await agent.apply_local(spec)
        await agent.finish_startup()
        self.ofctl = RecordingOfctl(agent.datapath.ofctl.target, agent.datapath.ofctl.rundir)
        agent.datapath.reconciler.ofctl = self.ofctl
        conf = json.loads((d / "net.d" / CONFLIST_NAME).read_text())
        conflist = ConfList(conf, Plugins([str(d / "cni-bin"), "/usr/lib/cni"], netns=node.netns))
        for name in ["client", *(f"b{i}" for i in range(BACKENDS))]:
            pod = self.bed.add_pod(node, name)
            args = f"IgnoreUnknown=1;K8S_POD_NAMESPACE={NS};K8S_POD_NAME={name}"
            att = Attachment(container_id=pod.netns.replace("-", ""), netns=netns_path(pod.netns), args=args)
            result = await asyncio.to_thread(conflist.add, att)
            self.pods[name] = (pod.netns, str(ipaddress.IPv4Interface(result["ips"][0]["address"]).ip))
        await agent.sync_ports()
        ports = [*WEB_PORTS, *range(BIG_BASE_PORT, BIG_BASE_PORT + 1000)]
        for i in range(BACKENDS):
            netns, _ = self.pods[f"b{i}"]
            self.procs.append(self._spawn(netns, ["--serve", f"b{i}", ",".join(map(str, ports))]))
        for p in self.procs:
            assert p.stdout is not None
            if p.stdout.readline().strip() != b"ready":
                raise RuntimeError("a backend did not start")

    def _spawn(self, netns: str, argv: list[str]) -> subprocess.Popen[bytes]:
        cmd = ["ip", "netns", "exec", netns, sys.executable, __file__, *argv]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, start_new_session=True)

    async def stop(self) -> None:
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        if self.agent is not None:
            await self.agent.stop()

    # --- helpers -----------------------------------------------------------------------------

    @property
    def a(self) -> NodeAgent:
        assert self.agent is not None
        return self.agent

    @property
    def rec(self) -> RecordingOfctl:
        assert self.ofctl is not None
        return self.ofctl

    def backend_endpoints(
        self, ports: list[int], limit: int | None = None
    ) -> Iterator[tuple[int, list[str]]]:
        """(target port, backend IPs) for every port, stopping after ``limit`` endpoints in all."""
        left = limit if limit is not None else len(ports) * BACKENDS
        for port in ports:
            ips = [self.pods[f"b{i}"][1] for i in range(BACKENDS)][: max(0, left)]
            left -= len(ips)
            if ips:
                yield port, ips

    def backed_service(self, name: str, ip: str, ports: list[int], limit: int | None = None) -> None:
        self.a.set_service(f"{NS}/{name}", svc_obj(name, ip))
        assert self.node is not None
        for port, ips in self.backend_endpoints(ports, limit):
            obj = slice_obj(name, str(port), port, [(x, self.node.name) for x in ips])
            self.a.set_endpoint_slice(key(obj), obj)

    def drop_backed_service(self, name: str, ports: list[int]) -> None:
        self.a.set_service(f"{NS}/{name}", None)
        for port in ports:
            self.a.set_endpoint_slice(f"{NS}/{name}-{port}", None)

    def bulk_objects(self, i: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """Bulk Service ``i`` and its slice, made afresh each time: a cache of 10k API objects would
        add ~400k objects to every garbage collection of the agent's process."""
        eps = [(fake_endpoint(i * self.args.endpoints + k), "node-x") for k in range(self.args.endpoints)]
        return svc_obj(f"s{i}", bulk_ip(i)), slice_obj(f"s{i}", "a", 8080, eps)

    def feed_bulk(self, indices: range, present: bool = True) -> float:
        """Hand the agent bulk Services and their slices (or their deletions); seconds it took."""
        if not present:
            t0 = time.perf_counter()
            for i in indices:
                self.a.set_service(f"{NS}/s{i}", None)
                self.a.set_endpoint_slice(f"{NS}/s{i}-a", None)
            return time.perf_counter() - t0
        objs = [self.bulk_objects(i) for i in indices]
        t0 = time.perf_counter()
        for svc, sl in objs:
            self.a.set_service(key(svc), svc)
            self.a.set_endpoint_slice(key(sl), sl)
        return time.perf_counter() - t0

    async def apply(self) -> tuple[float, list[tuple[tuple[str, ...], str]]]:
        """apply_services, timed; the bundles it sent to ovs-ofctl (not those of the agent's other
        loops that ran meanwhile: pods, policy)."""
        self.rec.take()
        t0 = time.perf_counter()
        await self.a.apply_services()
        return time.perf_counter() - t0, [s for s in self.rec.take() if is_service_bundle(s[1])]

    def raw(self, sent: list[tuple[tuple[str, ...], str]], name: str) -> float:
        """The same bundles from files, ovs-ofctl alone, timed."""
        files = []
        for n, (args, text) in enumerate(sent):
            path = self.scratch / f"{name}-{n}.txt"
            path.write_text(text)
            files.append([str(path) if a == "-" else a for a in args])
        env = {**os.environ, "OVS_RUNDIR": self.rec.rundir or ""}
        t0 = time.perf_counter()
        for argv in files:
            done = subprocess.run(
                ["ovs-ofctl", "-O", "OpenFlow15", *argv], env=env, capture_output=True, text=True
            )
            if done.returncode:
                raise RuntimeError(f"raw ovs-ofctl {argv[0]}: {done.stderr.strip()[-400:]}")
        return time.perf_counter() - t0

    def raw_undo(self, sent: list[tuple[tuple[str, ...], str]]) -> None:
        for args, text in sent:
            assert args[0] == "bundle", args
            self.raw([(args, inverse(text))], "undo")

    def appctl(self, *args: str) -> str:
        assert self.node is not None
        return self.node.ovs.appctl(*args).stdout

    def upcalls(self) -> int:
        text = self.appctl("dpif-netdev/pmd-stats-show")
        return sum(int(n) for n in re.findall(r"miss with success upcall:\s*(\d+)", text))

    async def connect(self, ip: str, count: int, warmup: int = 10) -> tuple[list[float], list[str], int, int]:
        """(connect times, answers, errors, upcalls) of ``count`` new connections from the client."""
        netns, _ = self.pods["client"]
        assert self.node is not None
        self.appctl("dpif-netdev/pmd-stats-clear")
        before = self.upcalls()
        proc = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", netns, sys.executable, __file__,
            "--probe", ip, str(SERVICE_PORT), str(count), str(warmup), str(self.node.ovs.vswitchd_pid),
            stdout=asyncio.subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        try:
            out, _ = await proc.communicate()
        finally:
            if proc.returncode is None:
                os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        got = json.loads(out)
        upcalls = self.upcalls() - before
        self.vswitchd_ns = got["vswitchd_ns"]
        self.client_ports = len({s[2] for s in got["samples"]})
        return [s[0] for s in got["samples"]], [s[1] for s in got["samples"]], got["errors"], upcalls

    def group_choice(self, gid: int) -> str:
        """What ovs-vswitchd's debug log says about the selection method of group ``gid``
        (ofproto-dpif.c, group_set_selection_method), at its latest construction."""
        assert self.node is not None
        log = (self.node.ovs.workdir / "ovs-vswitchd.log").read_text().splitlines()
        starts = [n for n, line in enumerate(log) if line.endswith(f"Constructing select group {gid}")]
        if not starts:
            return "not logged"
        too_many = ""
        for line in log[starts[-1] + 1 :]:
            if "Constructing select group" in line:
                break
            if "Too many hash values required" in line:
                too_many = line.split("|")[-1].strip()
            if "Use dp_hash with" in line:
                return "dp_hash, " + line.split("Use dp_hash with ")[1].split(" using")[0]
            if "Falling back to default hash method" in line:
                return f"default: hash of the 5-tuple in the slow path ({too_many})"
        return "unknown"

    def group_id(self, service: str) -> int:
        return self.a.services.group_ids(f"{NS}/{service}/TCP/{SERVICE_PORT}/cluster")

    # --- figures -----------------------------------------------------------------------------

    def cpu(self) -> tuple[float, float, float]:
        """CPU seconds so far of this process (the agent), its waited-for children (ovs-ofctl) and
        ovs-vswitchd: figures the other engineers' load on this machine hardly moves."""
        assert self.node is not None
        own = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        stat = Path(f"/proc/{self.node.ovs.vswitchd_pid}/stat").read_text().rsplit(")", 1)[1].split()
        vswitchd = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
        return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime, vswitchd

    def cpu_since(self, before: tuple[float, float, float]) -> tuple[float, float, float]:
        now = self.cpu()
        return now[0] - before[0], now[1] - before[1], now[2] - before[2]

    async def full_sync(self) -> None:
        n, repeat = self.args.services, self.args.repeat
        print(f"(a) full sync: {n} ClusterIP Services x {self.args.endpoints} endpoints (TCP, one port)")
        t_feed = self.feed_bulk(range(n))
        prof = cProfile.Profile() if self.args.profile else None
        if prof is not None:
            prof.enable()
        c0 = self.cpu()
        ours, sent = await self.apply()
        ours_cpu = [self.cpu_since(c0)]
        if prof is not None:
            prof.disable()
            print("    cProfile of the first apply_services, by cumulative time (ovs-ofctl shows as epoll):")
            stats = io.StringIO()
            pstats.Stats(prof, stream=stats).sort_stats("cumulative").print_stats(25)
            print("\n".join("      " + line for line in stats.getvalue().splitlines()[6:] if line.strip()))
        ours_runs, raw_runs, raw_cpu = [ours], [], []
        n_groups = sum(t.count("\ngroup add") + t.startswith("group add") for _, t in sent)
        n_flows = sum(t.count("\nflow add") for _, t in sent)
        size = sum(len(t) for _, t in sent) / 1e6
        print(f"    API objects parsed into the agent: {t_feed:.2f} s ({2 * n} events; not in the ratio)")
        print(f"    one bundle: {n_groups} groups + {n_flows} flows, {size:.1f} MB")
        for _ in range(repeat):
            self.feed_bulk(range(n), present=False)
            await self.apply()  # remove them all through the agent
            c0 = self.cpu()
            raw_runs.append(self.raw(sent, "full"))
            raw_cpu.append(self.cpu_since(c0))
            self.raw_undo(sent)
            self.feed_bulk(range(n))
            c0 = self.cpu()
            t, sent = await self.apply()
            ours_cpu.append(self.cpu_since(c0))
            ours_runs.append(t)
        t0 = time.perf_counter()
        for i in range(n):
            self.a.services.translate(f"{NS}/s{i}")
        t_translate = time.perf_counter() - t0
        o, r = statistics.median(ours_runs), statistics.median(raw_runs)
        oc, rc = (statistics.median(map(sum, x)) for x in (ours_cpu, raw_cpu))
        for label, wall, cpu, runs, cpus in (
            ("ours (apply_services: translate + diff + bundle)", o, oc, ours_runs, ours_cpu),
            ("raw ovs-ofctl bundle of the same file", r, rc, raw_runs, raw_cpu),
        ):
            walls = ", ".join(f"{x:.2f}" for x in runs)
            parts = ", ".join(f"{a:.2f}+{k:.2f}+{v:.2f}" for a, k, v in cpus)
            print(f"    {label:<49} {wall:.2f} s wall, {cpu:.2f} s CPU")
            print(f"        each run: wall {walls}; CPU python+ovs-ofctl+ovs-vswitchd {parts}")
        print(f"    ratio {o / r:.2f} wall, {oc / rc:.2f} CPU  (goal <= 1.5)")
        self.summary.append(f"(a) full sync of {n} Services: {o:.2f} s vs raw {r:.2f} s, ratio {o / r:.2f} "
                            f"wall / {oc / rc:.2f} CPU (goal <= 1.5)")  # fmt: skip
        print(f"    translation alone (ServiceState.translate x {n}, no OVS): {t_translate:.2f} s")

    async def endpoint_change(self) -> None:
        rng = random.Random(11)
        ours: list[float] = []
        raw: list[float] = []
        sizes: list[int] = []
        for c in range(self.args.changes // 2):
            i = rng.randrange(self.args.services)
            sl = self.bulk_objects(i)[1]
            grown = json.loads(json.dumps(sl))
            grown["endpoints"].append(
                {
                    "addresses": [fake_endpoint(10_000_000 + c)],
                    "nodeName": "node-x",
                    "conditions": {"ready": True},
                }
            )
            pair = []
            for obj in (grown, sl):  # gains one, then loses it again
                self.rec.take()
                t0 = time.perf_counter()
                self.a.set_endpoint_slice(key(obj), obj)
                await self.a.apply_services()
                ours.append(time.perf_counter() - t0)
                pair.append([s for s in self.rec.take() if is_service_bundle(s[1])])
            for sent in pair:  # the same two changes, raw
                raw.append(self.raw(sent, "change"))
                sizes.append(sum(t.count("\n") for _, t in sent))
        print(
            f"\n(b) one endpoint gained or lost by one of {self.args.services} Services ({len(ours)} "
            f"changes, {statistics.median(sizes):.0f} lines a bundle: group modify + flow add/delete)"
        )
        for label, t in (
            ("ours (set_endpoint_slice + apply_services)", ours),
            ("raw bundle of the same lines", raw),
        ):
            print(f"    {label:<43} p50 {ms(pct(t, 50))}  p99 {ms(pct(t, 99))}")
        p50, p99 = pct(ours, 50) / pct(raw, 50), pct(ours, 99) / pct(raw, 99)
        print(f"    ratio p50 {p50:.2f}  p99 {p99:.2f}  (goal <= 2)")
        self.summary.append(f"(b) one endpoint change: p50 {ms(pct(ours, 50))} vs raw {ms(pct(raw, 50))}, "
                            f"ratio p50 {p50:.2f} / p99 {p99:.2f} (goal <= 2)")  # fmt: skip

    async def connect_rounds(
        self, targets: dict[str, str], count: int, rounds: int, between: Any = None
    ) -> Any:
        """Interleaved rounds of new connections to each target, in two datapath modes: the warm
        megaflow cache (steady state after a warm-up), and megaflows disabled
        (upcall/disable-megaflows: every connection's SYN and SYN-ACK are classified in the slow
        path). ``between(name)`` runs before each target's turn (e.g. resizes the Service set)."""
        res: dict[tuple[str, str], list[float]] = {(n, m): [] for n in targets for m in ("warm", "slow")}
        ups: dict[tuple[str, str], int] = dict.fromkeys(res, 0)
        cpu: dict[tuple[str, str], int] = dict.fromkeys(res, 0)
        errors = 0
        per = max(1, count // rounds)
        for _ in range(rounds):
            for name, ip in targets.items():
                if between is not None:
                    await between(name)
                self.appctl("revalidator/purge")  # every turn starts from an empty cache
                await self.connect(ip, self.args.warmup, warmup=0)
                for mode in ("warm", "slow"):
                    if mode == "slow":
                        self.appctl("upcall/disable-megaflows")
                    try:
                        times, _, err, up = await self.connect(ip, per, warmup=0)
                    finally:
                        if mode == "slow":
                            self.appctl("upcall/enable-megaflows")
                    res[name, mode] += times
                    ups[name, mode] += up
                    cpu[name, mode] += self.vswitchd_ns
                    errors += err
        return res, (ups, cpu), errors

    def print_rounds(self, res: Any, counters: Any, labels: dict[str, str]) -> None:
        ups, cpu = counters
        for mode, title in (("warm", "warm megaflow cache"), ("slow", "megaflows disabled (slow path)")):
            print(f"    {title}:")
            for name, label in labels.items():
                t = res[name, mode]
                up = ups[name, mode] / len(t)
                us = cpu[name, mode] / len(t) / 1000
                print(f"      {label:>16}: p50 {ms(pct(t, 50))}  p99 {ms(pct(t, 99))}  upcalls/connection "
                      f"{up:.2f}  ovs-vswitchd CPU/connection {us:.0f} us  ({len(t)} conns)")  # fmt: skip

    async def connect_scale(self) -> None:
        n, small = self.args.services, self.args.small
        self.backed_service("web", WEB_IP, list(WEB_PORTS))
        await self.a.apply_services()
        size = {"big": n}

        async def resize(name: str) -> None:
            want = n if name == "10k" else small
            if size["big"] != want:
                self.feed_bulk(range(small, n), present=want == n)
                await self.a.apply_services()
                size["big"] = want

        targets = {"10k": WEB_IP, "1k": WEB_IP}
        res, counters, errors = await self.connect_rounds(
            targets, self.args.connects, self.args.rounds, resize
        )
        print(f"\n(c) TCP connect to a ClusterIP (10 endpoints on 5 real pods), {self.args.connects} new "
              f"connections a size and mode, {self.args.rounds} interleaved rounds, {self.args.warmup} "
              f"warm-up connections a round; {errors} failed")  # fmt: skip
        labels = {"1k": f"{small + 1} Services", "10k": f"{n + 1} Services"}
        self.print_rounds(res, counters, labels)
        for mode in ("warm", "slow"):
            p99 = pct(res["10k", mode], 99) / pct(res["1k", mode], 99)
            p50 = pct(res["10k", mode], 50) / pct(res["1k", mode], 50)
            print(f"    ratio {n + 1}/{small + 1}, {mode}: p99 {p99:.2f}  p50 {p50:.2f}  "
                  "(goal: p99 within 10 %)")  # fmt: skip
            self.summary.append(f"(c) connect {n + 1} vs {small + 1} Services, {mode}: p99 ratio {p99:.2f}, "
                                f"p50 ratio {p50:.2f} (goal: p99 within 10 %)")  # fmt: skip
        await resize("1k")  # (d) runs with the small set

    def balance(self, answers: list[str], n_endpoints: int) -> None:
        pods = Counter(a.split()[0] for a in answers)
        endpoints = Counter(answers)
        n = len(answers)
        share = n / BACKENDS
        chi2 = sum((pods[f"b{i}"] - share) ** 2 / share for i in range(BACKENDS))
        expect = n_endpoints * (1 - (1 - 1 / n_endpoints) ** self.client_ports)  # one pick a 5-tuple
        print(f"      per pod: {'  '.join(f'{p} {pods[p]}' for p in sorted(pods))}  (max deviation "
              f"{max(abs(pods[f'b{i}'] - share) for i in range(BACKENDS)) / share:.1%} from {share:.0f}, "
              f"chi-square {chi2:.1f}, 4 d.o.f.: 9.5 is p=0.05)")  # fmt: skip
        print(f"      distinct endpoints reached {len(endpoints)} (a uniform choice over the "
              f"{self.client_ports} distinct client ports expects {expect:.0f}), "
              f"most connections on one endpoint {max(endpoints.values())}")  # fmt: skip
        per_pod = "/".join(str(pods[f"b{i}"]) for i in range(BACKENDS))
        reached = f"{len(endpoints)} endpoints reached (uniform: {expect:.0f})"
        self.summary.append(f"(d) balance over {n_endpoints} endpoints, {n} connections: pods {per_pod}, "
                            f"chi-square {chi2:.1f}; {reached}")  # fmt: skip

    def raw_service(self, name: str, ip: str, ports: list[int], limit: int, gid: int) -> tuple[str, str]:
        """The agent's translation of a Service, as a bundle that also carries groups over OpenFlow's
        64 KiB message limit: ``group add`` with the first buckets, then ``insert_bucket`` chunks."""
        assert self.node is not None
        svc = parse_service(svc_obj(name, ip))
        eps: list[tuple[str, str, Endpoint]] = []
        for port, ips in self.backend_endpoints(ports, limit):
            parsed = parse_slice(slice_obj(name, str(port), port, [(x, self.node.name) for x in ips]))
            assert parsed is not None
            eps += parsed.endpoints
        flows, groups = service_flows(svc, eps, self.a.services.node, lambda _: gid)
        (group,) = groups
        head = group.model_copy(update={"buckets": ()}).render()
        lines = [f"group add {head},{','.join(group.buckets[:CHUNK])}"]
        insert = f"group insert_bucket group_id={gid},command_bucket_id=last"
        lines += [
            f"{insert},{','.join(group.buckets[i : i + CHUNK])}"
            for i in range(CHUNK, len(group.buckets), CHUNK)
        ]
        cookie = make_cookie(1, Owner(Category.TEST, name))
        lines += [f"flow add {f.render(cookie)}" for f in flows]
        return "\n".join(
            lines
        ) + "\n", f"{len(group.buckets)} buckets in {1 + (len(group.buckets) - 1) // CHUNK} group mods"

    async def big_service(self) -> None:
        n_big, n_mid = self.args.big, self.args.mid
        ports = list(range(BIG_BASE_PORT, BIG_BASE_PORT + math.ceil(n_big / BACKENDS)))
        mid_ports = ports[: math.ceil(n_mid / BACKENDS)]
        print(f"\n(d) one Service with {n_big} endpoints = {BACKENDS} real backend pods x {len(ports)} "
              f"target ports each (one process a pod listens on all of them; one EndpointSlice a port); "
              f"{self.args.small + 1} other Services installed")  # fmt: skip
        self.appctl("vlog/set", "ofproto_dpif:file:dbg")
        # 1. through the agent, in one batch with a small Service ("buddy", one endpoint)
        self.backed_service("buddy", BUDDY_IP, [WEB_PORTS[0]], 1)
        self.backed_service("big", BIG_IP, ports, n_big)
        t_ok = False
        try:
            t, _ = await self.apply()
            t_ok = True
            print(f"    through the agent: installed in {ms(t)}")
        except OfctlError as exc:
            why = str(exc).split(": ovs-ofctl")[-1].split("(flow:")[0].strip()[:160]
            print(f"    through the agent: REJECTED, ovs-ofctl: {why}")
            for line in (
                "(one group_mod carries all buckets and OpenFlow lengths are 16 bits: at ~64 bytes a",
                "bucket about 1,000 fit; dump-groups cannot decode such a group either: OFPBPC_BAD_LEN)",
            ):
                print("      " + line)
        await self.a.apply_services()  # what the agent's service loop does after a failure: retry
        buddy = any(o.name == f"{NS}/buddy" for o in self.a.datapath.reconciler.owners)
        verdict = (
            "programmed" if buddy else "NOT programmed (the batch failed and its dirty keys were dropped)"
        )
        print(f"    a 1-endpoint Service in the same batch, after the agent's retry: {verdict}")
        outcome = "installed" if t_ok else "REJECTED"
        self.summary.append(f"(d) {n_big} endpoints through the agent: {outcome}; a Service batched with it: "
                            f"{verdict.split(' (')[0]}")  # fmt: skip
        self.drop_backed_service("big", ports)
        self.drop_backed_service("buddy", [WEB_PORTS[0]])
        await self.apply()
        # 2. the largest that fits one group_mod, through the agent; its raw bundle
        self.backed_service("mid", MID_IP, mid_ports, n_mid)
        ours, sent = await self.apply()
        self.drop_backed_service("mid", mid_ports)
        await self.apply()
        raw = self.raw(sent, "mid")
        self.raw_undo(sent)
        self.backed_service("mid", MID_IP, mid_ports, n_mid)
        again, _ = await self.apply()
        print(f"    {n_mid} endpoints (5 pods x {len(mid_ports)} ports) through the agent: install "
              f"{ms(statistics.median([ours, again]))}, raw bundle of the same lines {ms(raw)}")  # fmt: skip
        # 3. all of them, installed by the bench from the agent's translation, chunked
        text, how = self.raw_service("big", BIG_IP, ports, n_big, RAW_GID)
        t_big = self.raw([(("bundle", self.rec.target, "-"), text)], "big")
        print(f"    {n_big} endpoints: the agent's translation installed by the bench ({how}, "
              f"insert_bucket): raw bundle {ms(t_big)}")  # fmt: skip
        for edge, ip in EDGE_IPS.items():
            self.backed_service(f"edge{edge}", ip, ports, edge)
        await self.a.apply_services()
        self.a.set_service(f"{NS}/web", None)  # the 10-endpoint group, rebuilt once more while logging
        await self.a.apply_services()
        self.backed_service("web", WEB_IP, list(WEB_PORTS))
        await self.a.apply_services()
        self.appctl("vlog/set", "ofproto_dpif:file:info")

        targets = {"web": WEB_IP, "mid": MID_IP, "big": BIG_IP}
        labels = {"web": "10 endpoints", "mid": f"{n_mid} endpoints", "big": f"{n_big} endpoints"}
        res, counters, errors = await self.connect_rounds(targets, self.args.connects, 2)
        print(f"    connect, {self.args.connects} new connections a Service and mode, 2 interleaved rounds "
              f"({errors} failed):")  # fmt: skip
        self.print_rounds(res, counters, labels)
        for name in ("mid", "big"):
            for mode in ("warm", "slow"):
                p50 = pct(res[name, mode], 50) / pct(res["web", mode], 50)
                p99 = pct(res[name, mode], 99) / pct(res["web", mode], 99)
                print(f"    ratio {labels[name]} / 10 endpoints, {mode}: p50 {p50:.2f}  p99 {p99:.2f}  "
                      "(goal <= 2)")  # fmt: skip
                if mode == "warm":
                    self.summary.append(f"(d) connect, {labels[name]} / 10 endpoints (warm): p50 {p50:.2f}, "
                                        f"p99 {p99:.2f} (goal <= 2)")  # fmt: skip
        for name in ("big", "mid"):
            _, answers, errors, _ = await self.connect(targets[name], self.args.balance, warmup=0)
            print(f"    balance, {labels[name]}, {len(answers)} connections ({errors} failed):")
            self.balance(answers, n_big if name == "big" else n_mid)
        await self.select_groups()

    async def select_groups(self) -> None:
        print("\n(e) select groups (selection_method=dp_hash requested, equal weights), as ovs-vswitchd "
              "built them")  # fmt: skip
        print("    (its debug log; ofproto-dpif.c caps dp_hash at 256 hash values, buckets get >= 1 each):")
        n_big, n_mid = self.args.big, self.args.mid
        cases = [
            ("10", WEB_IP, self.group_id("web")),
            ("256", EDGE_IPS[256], self.group_id("edge256")),
            ("257", EDGE_IPS[257], self.group_id("edge257")),
            (str(n_mid), MID_IP, self.group_id("mid")),
            (str(n_big), BIG_IP, RAW_GID),
        ]
        for label, _, gid in cases:
            print(f"    {label:>5} buckets: {self.group_choice(gid)}")
        print(f"          (the {n_big}-bucket group as built at its last insert_bucket: ofproto-dpif")
        print(
            f"          picks the method from the {CHUNK} inserted buckets alone, then copies the others in)"
        )
        count = 200
        print(f"    upcalls per new connection, {count} connections after a warm-up (1000 for 256 buckets,")
        print("    whose 256 hash values each need their own megaflow; 100 otherwise):")
        for label, ip, _ in cases:
            self.appctl("revalidator/purge")
            await self.connect(ip, 1000 if label == "256" else 100, warmup=0)
            times, _, _, up = await self.connect(ip, count, warmup=0)
            us = self.vswitchd_ns / count / 1000
            flows = self.appctl("dpctl/dump-flows").splitlines()
            hashed = sum("hash(" in line for line in flows)
            print(f"    {label:>5} buckets: {up / count:.2f} upcalls/connection, ovs-vswitchd CPU/connection "
                  f"{us:.0f} us, connect p50 {ms(pct(times, 50))} p99 {ms(pct(times, 99))}; datapath flows "
                  f"{len(flows)}, {hashed} with a hash() action")  # fmt: skip


async def run(bed: TestBed, args: argparse.Namespace) -> None:
    b = Bench(bed, args)
    try:
        t0 = time.perf_counter()
        await b.start()
        took = time.perf_counter() - t0
        print(f"one node, agent in-process, {BACKENDS} backend pods + 1 client pod ({took:.1f} s)\n")
        steps = (
            [b.full_sync] if args.only_a else [b.full_sync, b.endpoint_change, b.connect_scale, b.big_service]
        )
        for step in steps:
            t0 = time.perf_counter()
            await step()
            print(f"    [{time.perf_counter() - t0:.0f} s]")
        print("\nsummary:")
        for line in b.summary:
            print("  " + line)
    finally:
        await b.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--services", type=int, default=10_000)
    ap.add_argument("--endpoints", type=int, default=10, help="endpoints of each bulk Service")
    ap.add_argument("--small", type=int, default=1_000, help="the smaller size of (c)")
    ap.add_argument("--repeat", type=int, default=2, help="extra rounds of (a)")
    ap.add_argument("--changes", type=int, default=50)
    ap.add_argument("--connects", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of (c)")
    ap.add_argument("--warmup", type=int, default=100, help="connections before each measured batch")
    ap.add_argument("--big", type=int, default=5_000)
    ap.add_argument(
        "--mid", type=int, default=1_000, help="endpoints of the largest Service one group_mod holds"
    )
    ap.add_argument("--balance", type=int, default=2_000)
    ap.add_argument("--profile", action="store_true", help="cProfile the first full sync of (a)")
    ap.add_argument("--only-a", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--serve", nargs=2, metavar=("NAME", "PORTS"), help=argparse.SUPPRESS)
    ap.add_argument(
        "--probe", nargs=5, metavar=("IP", "PORT", "N", "WARMUP", "VSWITCHD"), help=argparse.SUPPRESS
    )
    args = ap.parse_args()
    if args.serve:
        serve(args.serve[0], [int(p) for p in args.serve[1].split(",")])
        return
    if args.probe:
        probe(args.probe[0], int(args.probe[1]), int(args.probe[2]), int(args.probe[3]), int(args.probe[4]))
        return

    def terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # unwinds through the clean-up below

    signal.signal(signal.SIGTERM, terminate)
    logging.basicConfig(level=logging.ERROR)  # the agent's warnings (pods not in an API) are noise here
    t0 = time.perf_counter()
    bed = TestBed()
    print(f"test bed run {bed.prefix}")
    try:
        with bed:
            asyncio.run(run(bed, args))
    except KeyboardInterrupt:
        print("\ninterrupted")
        sys.exit(130)
    finally:
        leaks = find_leaks(bed.run_id)
        if leaks:
            print(f"left behind: {leaks}")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
