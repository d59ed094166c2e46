"""Packets lost by other pods' tunnel traffic while a node's links change (OVS userspace datapath).

Found by a CI run: a no-loss ping stream between two nodes lost one request of 608 while a pod was
plugged on one of them. Every link created, brought up or deleted in the namespace ovs-vswitchd
runs in (a pod's veth, at every CNI ADD and DEL) makes it flush and re-read its route table and
its cached address list (``route_table_reset``, unchanged up to OVS's main branch); a tunnel packet
translated meanwhile finds no route to the remote node (encapsulation) or no address on the
underlay bridge (termination), and is dropped without a drop counter. The kernel datapath routes
tunnels in the kernel and is not affected.

A 2-node cluster (real agents and CNI), a ping every ``--interval`` from a pod on node1 to a pod on
node2 (across the tunnel) and to one on node1 (no tunnel), while a veth pair is created, brought up
and deleted in node1's namespace every ~0.2 s, with no OVS port and no flow involved. tcpdump on
the pods and on both nodes' underlay links tells where each lost packet vanished. ``--pinned``
also pins the routes to the remote nodes as OVS user routes (``ovs/route/add``), which a flush
keeps: encapsulation losses go, termination losses stay.

Prints: link changes, pings and losses per stream, and per lost packet where it vanished.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from kvswitch_testbed.cluster import Cluster, ClusterPod
from kvswitch_testbed.netns import in_netns, run

LINK = "eth0"  # a pod's veth end, and a node's underlay veth (kvswitch_testbed.bed)


@dataclass
class Churn:
    """Creates, brings up and deletes a veth pair in ``netns`` until stopped."""

    netns: str
    period: float = 0.1
    changes: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            i += 1
            run(["ip", "link", "add", f"churn{i}", "type", "veth", "peer", "name", f"churnp{i}"], self.netns)
            run(["ip", "link", "set", f"churn{i}", "up"], self.netns)
            time.sleep(self.period)
            run(["ip", "link", "del", f"churn{i}"], self.netns)
            self.changes += 1
            time.sleep(self.period)

    def __enter__(self) -> Churn:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def ping(src: ClusterPod, dst: ClusterPod, count: int, interval: float) -> subprocess.Popen[str]:
    cmd = ["ping", "-n", "-q", "-i", str(interval), "-c", str(count), "-W", "1", dst.ip]
    return subprocess.Popen(in_netns(cmd, src.netns), stdout=subprocess.PIPE, text=True)


def seen(capture: Path, kind: str) -> set[int]:
    """Sequence numbers of the echo ``kind`` (request, reply) in a capture (inner packets too)."""
    text = subprocess.run(["tcpdump", "-n", "-r", str(capture)], capture_output=True, text=True).stdout
    return set(map(int, re.findall(rf"ICMP echo {kind}, id \d+, seq (\d+),", text)))


def where_lost(files: dict[str, Path]) -> dict[str, set[int]]:
    """The tunnel stream's unanswered requests, by where they vanished."""
    sent = seen(files["src pod"], "request")
    lost = sent - seen(files["src pod"], "reply") - {max(sent, default=0)}  # the last: in flight
    out_req, out_rep = seen(files["node1 underlay"], "request"), seen(files["node1 underlay"], "reply")
    return {
        "encapsulation on node1 (never reached its underlay link)": lost - out_req,
        "termination on node1 (the reply reached its underlay link, not the pod)": lost & out_rep,
        "elsewhere (node2, the underlay)": (lost & out_req) - out_rep,
    }


def pin_tunnel_routes(c: Cluster) -> None:
    """Each node's route to every other node's overlay IP, as an OVS user route on the device the
    system route names (the flush that follows a link change keeps user routes)."""
    for name, node in c.bed.nodes.items():
        for other in c.bed.nodes:
            if other == name:
                continue
            config = c.vswitchconfig(other)
            assert config is not None
            ip = config["spec"]["overlayIP"]
            found = re.search(r"dev (\S+)", node.ovs.appctl("ovs/route/lookup", ip).stdout)
            assert found, f"{name}: no route to {ip}"
            node.ovs.appctl("ovs/route/add", f"{ip}/32", found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--interval", type=float, default=0.02, help="between pings (s)")
    parser.add_argument("--pinned", action="store_true", help="pin tunnel routes as OVS user routes")
    args = parser.parse_args()
    count = int(args.seconds / args.interval)

    with Cluster(nodes=2, overlay="vxlan") as c, tempfile.TemporaryDirectory() as tmp:
        n1, n2 = c.bed.nodes["node1"], c.bed.nodes["node2"]
        src = c.add_pod(n1, "src")
        near = c.add_pod(n1, "near")
        far = c.add_pod(n2, "far")
        version = n1.ovs.appctl("version").stdout.split("\n")[0]
        if args.pinned:
            pin_tunnel_routes(c)
        # (netns, capture filter) of each point; pods and nodes alike have their link as eth0
        points = {
            "src pod": (src.netns, f"icmp and host {far.ip}"),
            "node1 underlay": (n1.netns, "udp port 4789"),
            "node2 underlay": (n2.netns, "udp port 4789"),
            "far pod": (far.netns, "icmp"),
        }
        files = {label: Path(tmp) / f"{i}.pcap" for i, label in enumerate(points)}
        tcpdump = ["tcpdump", "-n", "-U", "-s", "200", "-i", LINK]
        dumps = [
            subprocess.Popen(
                in_netns([*tcpdump, "-w", str(files[label]), flt], ns), stderr=subprocess.DEVNULL
            )
            for label, (ns, flt) in points.items()
        ]
        time.sleep(1.0)
        with Churn(n1.netns) as churn:
            pings = {
                "across the tunnel": ping(src, far, count, args.interval),
                "same node": ping(src, near, count, args.interval),
            }
            results = {name: p.communicate()[0] for name, p in pings.items()}
        time.sleep(0.5)
        for dump in dumps:
            dump.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                dump.wait(5)

        print(f"{version}, datapath netdev, routes {'pinned' if args.pinned else 'as OVS learns them'}")
        print(f"link changes in node1's namespace: {churn.changes} veths created, brought up and deleted")
        for name, out in results.items():
            m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
            assert m, out
            sent, got = int(m.group(1)), int(m.group(2))
            print(f"  {name}: {sent} pings, {sent - got} lost ({(sent - got) / sent:.2%})")
        for label, seqs in where_lost(files).items():
            print(f"  tunnel stream, lost in {label}: {len(seqs)}")


if __name__ == "__main__":
    main()
