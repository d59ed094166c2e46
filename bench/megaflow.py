"""What purging the megaflow cache after every flow-table change costs (OVS < 3.2 userspace datapath).

The agent's remedy for stale megaflows on affected OVS versions (docs/networkpolicy.md, "Datapath
cache") is ``revalidator/purge`` after every bundle that changed the bridge. One node, the agent's
own NodeDatapath (its PurgingReconciler and purge), a bridge holding 100k flows, two pods, and a UDP
sender spraying 1,000 destination ports so that ~1,000 megaflows are live when each purge runs
(the worst case: each of them is re-translated after every purge; ``--no-spray`` measures the
typical case, where the measured ping and TCP stream hold a handful of coarse megaflows):

(a) a policy-sized edit (one owner, 10 flows) until it is installed, without and with the purge;
(b) live traffic: ping RTT and loss, and TCP throughput (iperf3), with no purges vs a purge every
    100 ms (a stress rate: ten policy edits a second, every second) and every second;
(c) the purge call itself vs the number of cached megaflows.

Prints medians and tails; the purge figures are only meaningful on a userspace datapath.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import socket
import statistics
import time
from collections.abc import Awaitable

from kvswitch_testbed import TestBed
from kvswitch_testbed.bed import Pod
from kvswitch_testbed.netns import arun, netns_socket, run

from kvswitch.config import AgentSettings
from kvswitch.node.datapath import NodeDatapath
from kvswitch.ovs.flows import Flow
from kvswitch.ovs.pipeline import Category, Owner

BR = "k-vswitch0"
FLOWS_PER_OWNER = 10
SPRAY_PORTS = range(20000, 21000)
SUBNET = "192.168.77"


def pipeline(filler: int) -> dict[Owner, list[Flow]]:
    """ARP and IP by NORMAL through conntrack; new connections meet table 2, which holds
    ``filler`` flows on other sources (the 100k) and one flow per sprayed port (exact megaflows)."""
    flows = [
        Flow(table=0, priority=10, match="arp", actions="NORMAL"),
        Flow(table=0, priority=10, match="ip", actions="ct(table=1,zone=1)"),
        Flow(table=1, priority=10, match="ct_state=-new+trk,ip", actions="NORMAL"),
        Flow(table=1, priority=5, match="ct_state=+new+trk,ip", actions="goto_table:2"),
        Flow(table=2, priority=0, match="ip", actions="ct(commit,zone=1),NORMAL"),
    ]
    flows += [
        Flow(table=2, priority=10, match=f"udp,tp_dst={p}", actions="ct(commit,zone=1),NORMAL")
        for p in SPRAY_PORTS
    ]
    owners: dict[Owner, list[Flow]] = {Owner(Category.TEST, "pipeline"): flows}
    for o in range(filler // FLOWS_PER_OWNER):
        owners[Owner(Category.TEST, f"filler-{o}")] = [
            Flow(
                table=2,
                priority=100,
                match=f"ip,nw_src=10.{(o >> 8) & 255}.{o & 255}.{i + 1}",
                actions="drop",
            )
            for i in range(FLOWS_PER_OWNER)
        ]
    return owners


def edit(variant: int) -> list[Flow]:
    """A policy-sized change: 10 flows in the table new connections meet, actions flipped."""
    return [
        Flow(
            table=2,
            priority=50,
            match=f"ip,nw_src=10.250.{i}.0/24",
            actions="drop" if variant % 2 else "ct(commit,zone=1),NORMAL",
        )
        for i in range(FLOWS_PER_OWNER)
    ]


async def megaflow_count(dp: NodeDatapath) -> int:
    m = re.search(r"flows: (\d+)", await dp.appctl("dpctl/show"))
    return int(m.group(1)) if m else 0


async def spray(pod: Pod, dst: str, stop: asyncio.Event) -> None:
    """UDP to 1,000 ports, ~5k packets/s: about a thousand megaflows stay live."""
    sock = netns_socket(pod.netns, socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        while not stop.is_set():
            for port in SPRAY_PORTS:
                with contextlib.suppress(OSError):
                    sock.sendto(b"x", (dst, port))
                if port % 50 == 0:
                    await asyncio.sleep(0.01)
    finally:
        sock.close()


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


async def purging(dp: NodeDatapath, every: float | None, stop: asyncio.Event) -> int:
    n = 0
    while every is not None and not stop.is_set():
        await asyncio.sleep(every)
        await dp.purge_stale_megaflows()
        n += 1
    return n


async def with_purges(dp: NodeDatapath, every: float | None, work: Awaitable[str]) -> tuple[str, int]:
    stop = asyncio.Event()
    purger = asyncio.create_task(purging(dp, every, stop))
    try:
        out = await work
    finally:
        stop.set()
        n = await purger
    return out, n


async def ping_under(dp: NodeDatapath, a: Pod, b_ip: str, every: float | None) -> str:
    async def work() -> str:
        cmd = ["ping", "-n", "-q", "-i", "0.005", "-c", "1000", "-W", "1", b_ip]
        return (await arun(cmd, a.netns, check=False, timeout=60)).stdout

    proc_out, n = await with_purges(dp, every, work())
    loss = re.search(r"([\d.]+)% packet loss", proc_out)
    rtt = re.search(r"= ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms", proc_out)
    if not loss or not rtt:
        return f"ping failed: {proc_out.strip()}"
    return (
        f"loss {loss.group(1)}%  rtt min/avg/max {rtt.group(1)}/{rtt.group(2)}/{rtt.group(3)} ms "
        f"(mdev {rtt.group(4)})  purges {n}"
    )


async def iperf_under(dp: NodeDatapath, a: Pod, b: Pod, b_ip: str, every: float | None) -> tuple[float, int]:
    server = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", b.netns, "iperf3", "-s", "-1", "-B", b_ip,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await asyncio.sleep(0.3)

        async def work() -> str:
            return (await arun(["iperf3", "-c", b_ip, "-t", "4", "-J"], a.netns, check=False)).stdout

        out, n = await with_purges(dp, every, work())
        bps = json.loads(out)["end"]["sum_received"]["bits_per_second"]
        return float(bps), n
    finally:
        with contextlib.suppress(ProcessLookupError):
            server.kill()
        await server.wait()


async def measure(bed: TestBed, total: int, edits: int, spray_on: bool) -> None:
    node = bed.add_node()
    settings = AgentSettings(
        node_name=node.name,
        ovsdb=node.ovs.db_remote,
        ovs_rundir=str(node.ovs.workdir),
        datapath_type="netdev",
        host_netns=node.netns,
        install_cni=False,
    )
    dp = NodeDatapath(settings)
    await dp.start()
    stop = asyncio.Event()
    sprayer: asyncio.Task[None] | None = None
    try:
        affected = dp.megaflow_purge
        print(f"{dp.ovs_version}, datapath netdev: the agent purges after changes: {affected}")
        t0 = time.perf_counter()
        await dp.reconciler.set_many(pipeline(total))
        print(f"installed {total} filler flows + pipeline in {time.perf_counter() - t0:.2f} s")
        a, b = bed.add_pod(node, "mfa"), bed.add_pod(node, "mfb")
        bed.plug(a, BR, f"{SUBNET}.2/24")
        bed.plug(b, BR, f"{SUBNET}.3/24")
        b_ip = f"{SUBNET}.3"
        run(["ping", "-c", "3", "-i", "0.2", "-W", "1", b_ip], a.netns)  # ARP, NORMAL learned
        if spray_on:
            sprayer = asyncio.create_task(spray(a, b_ip, stop))
        await asyncio.sleep(1.5)
        what = "with the UDP spray running" if spray_on else "without the UDP spray"
        print(f"live megaflows {what}: {await megaflow_count(dp)}")

        # (a) edit -> installed
        owner = Owner(Category.TEST, "policy-edit")
        results: dict[bool, list[float]] = {}
        for purge in (False, True):
            dp.megaflow_purge = purge
            times = []
            for i in range(edits):
                await asyncio.sleep(0.3)  # let the spray rebuild its megaflows
                t0 = time.perf_counter()
                await dp.reconciler.set_flows(owner, edit(i))
                times.append(time.perf_counter() - t0)
            results[purge] = times
        for purge, times in results.items():
            label = "with purge   " if purge else "without purge"
            print(
                f"(a) 10-flow edit among {total} -> installed, {label}: median "
                f"{statistics.median(times) * 1000:.1f} ms  p95 {pct(times, 0.95) * 1000:.1f} ms"
                f"  ({edits} edits)"
            )
        extra = statistics.median(results[True]) - statistics.median(results[False])
        print(f"    the purge adds {extra * 1000:.1f} ms per edit (median)")

        # (b) live traffic
        dp.megaflow_purge = True
        for every in (None, 1.0, 0.1):
            label = "no purges       " if every is None else f"purge every {every:.1f}s"
            print(f"(b) ping -i 5ms x1000, {label}: {await ping_under(dp, a, b_ip, every)}")
        tcp: dict[float | None, list[float]] = {None: [], 1.0: [], 0.1: []}
        for every in (None, 1.0, None, 0.1, None, 1.0, 0.1):  # interleaved: the machine is noisy
            bps, n = await iperf_under(dp, a, b, b_ip, every)
            tcp[every].append(bps)
            label = "no purges       " if every is None else f"purge every {every:.1f}s"
            print(f"(b) TCP 4 s, {label}: {bps / 1e9:.2f} Gbit/s  purges {n}")
        base = statistics.median(tcp[None])
        for every in (1.0, 0.1):
            ratio = statistics.median(tcp[every]) / base
            print(f"    TCP throughput, purge every {every:.1f} s / none: {ratio:.2f}")
        kinds: dict[str, int] = {}
        for line in (node.ovs.workdir / "ovs-vswitchd.log").read_text().splitlines():
            if "|WARN|" in line:
                kind = re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27}|\d+", "N", line.split("|WARN|", 1)[1])[:90]
                kinds[kind] = kinds.get(kind, 0) + 1
        print(f"    ovs-vswitchd log warnings so far: {sum(kinds.values())}")
        for kind, n in sorted(kinds.items(), key=lambda kv: -kv[1])[:4]:
            print(f"      {n:5d}  {kind}")

        # (c) the purge call
        durations = []
        counts = []
        for _ in range(20):
            await asyncio.sleep(0.3)
            counts.append(await megaflow_count(dp))
            t0 = time.perf_counter()
            await dp.appctl("revalidator/purge")
            durations.append(time.perf_counter() - t0)
        print(
            f"(c) revalidator/purge with ~{statistics.median(counts):.0f} megaflows: median "
            f"{statistics.median(durations) * 1000:.1f} ms  max {max(durations) * 1000:.1f} ms "
            f"(ovs-appctl process included)"
        )
    finally:
        stop.set()
        if sprayer is not None:
            await sprayer
        await dp.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flows", type=int, default=100_000)
    ap.add_argument("--edits", type=int, default=30)
    ap.add_argument(
        "--no-spray",
        action="store_true",
        help="typical case: only the measured ping/TCP traffic (a handful of megaflows)",
    )
    args = ap.parse_args()
    with TestBed() as bed:
        asyncio.run(measure(bed, args.flows, args.edits, not args.no_spray))


if __name__ == "__main__":
    main()
