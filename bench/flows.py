"""Flow reconciler vs raw ovs-ofctl on a real bridge, in one run.

(a) install 100k flows into an empty bridge   vs  ovs-ofctl --bundle add-flows of the same file
(b) change one owner (10 flows) among 100k     vs  a raw 10-flow bundle
(c) full resync with 1 % drift                 vs  ovs-ofctl --bundle replace-flows

Targets: (a) <= 1.5x, (b) <= 2x, (c) <= 1.0x the raw figure.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from pathlib import Path

from kvswitch_testbed import TestBed

from kvswitch.ovs.flows import Flow
from kvswitch.ovs.openflow import FlowReconciler, Ofctl
from kvswitch.ovs.ovsdb import Ovsdb
from kvswitch.ovs.pipeline import Category, Owner

BR = "k-vswitch0"
FLOWS_PER_OWNER = 10


def build(total: int, variant: int = 1) -> dict[Owner, list[Flow]]:
    owners: dict[Owner, list[Flow]] = {}
    for o in range(total // FLOWS_PER_OWNER):
        owner = Owner(Category.TEST, f"owner-{o}")
        owners[owner] = [
            Flow(
                table=10 + i,
                priority=100,
                match=f"ip,nw_dst=10.{(o >> 8) & 255}.{o & 255}.{i + 1}",
                actions=f"output:{variant}",
            )
            for i in range(FLOWS_PER_OWNER)
        ]
    return owners


def sh(ofctl: Ofctl, *args: str, input: str | None = None) -> float:
    t0 = time.perf_counter()
    asyncio.run(ofctl._run(*args, input=input))
    return time.perf_counter() - t0


async def measure(bed: TestBed, total: int, repeat: int) -> None:
    node = bed.add_node()
    db = Ovsdb(node.ovs.db_remote)
    db.ensure_bridge(BR, datapath_type="netdev")
    node.ovs.wait_bridge(BR)
    ofctl = Ofctl(BR, str(node.ovs.workdir))
    t0 = time.perf_counter()
    desired = build(total)
    t_build = time.perf_counter() - t0
    print(f"built {total} pydantic flows in {t_build:.3f}s (translation cost, not part of (a))")

    # Round-trip file for the raw baselines: exactly what the reconciler sends.
    rec = FlowReconciler(ofctl)
    text = "".join("add " + f.render(rec.cookie(o)) + "\n" for o, flows in desired.items() for f in flows)
    # (a) install from empty
    raw_a, ours_a = [], []
    for _ in range(repeat):
        await ofctl._run("del-flows", BR)
        t0 = time.perf_counter()
        await ofctl._run("--bundle", "add-flows", BR, "-", input=text)
        raw_a.append(time.perf_counter() - t0)
        await ofctl._run("del-flows", BR)
        rec = FlowReconciler(ofctl)
        t0 = time.perf_counter()
        await rec.set_many(desired)
        ours_a.append(time.perf_counter() - t0)
    ra, oa = statistics.median(raw_a), statistics.median(ours_a)
    print(f"(a) install {total}: ours {oa:.3f}s  raw bundle {ra:.3f}s  ratio {oa / ra:.2f}  (target <= 1.5)")

    # (b) one owner changes its 10 flows, bridge holds `total`
    owners = list(desired)
    raw_b, ours_b = [], []
    for i in range(repeat * 5):
        owner = owners[i * 7919 % len(owners)]
        new = [f.model_copy(update={"actions": f"output:{2 + i % 2}"}) for f in desired[owner]]
        t0 = time.perf_counter()
        n = await rec.set_flows(owner, new)
        ours_b.append(time.perf_counter() - t0)
        assert n == FLOWS_PER_OWNER
        raw = "".join(
            "modify_strict " + f.render(rec.cookie(owner)).replace("output:", "output:1") + "\n" for f in new
        )
        t0 = time.perf_counter()
        await ofctl._run("--bundle", "add-flows", BR, "-", input=raw)
        raw_b.append(time.perf_counter() - t0)
        await rec.set_flows(owner, desired[owner])
    rb, ob = statistics.median(raw_b), statistics.median(ours_b)
    print(f"(b) one owner ({FLOWS_PER_OWNER} flows) among {total}: ours {ob * 1000:.1f}ms  "
          f"raw bundle {rb * 1000:.1f}ms  ratio {ob / rb:.2f}  (target <= 2)")  # fmt: skip

    # (c) 1 % drift: half deleted by hand, half with altered actions; then repair
    desired_file = Path(tempfile.mkstemp(dir=node.ovs.workdir, suffix=".flows")[1])
    desired_file.write_text(text.replace("add ", ""))
    rng = random.Random(7)

    async def drift() -> None:
        flows = [f for o in rng.sample(owners, total // 100 // FLOWS_PER_OWNER) for f in desired[o]]
        lines = [("delete_strict " + f.spec()) if k % 2 else ("modify_strict " + f.spec() + " actions=drop")
                 for k, f in enumerate(flows)]  # fmt: skip
        await ofctl._run("--bundle", "add-flows", BR, "-", input="\n".join(lines) + "\n")

    t0 = time.perf_counter()
    cold = await rec.resync()
    t_clean = time.perf_counter() - t0
    raw_c, ours_c = [], []
    for _ in range(repeat):
        await drift()
        t0 = time.perf_counter()
        report = await rec.resync()
        ours_c.append(time.perf_counter() - t0)
        assert report.added == total // 100, report
        await drift()
        t0 = time.perf_counter()
        await ofctl._run("--bundle", "replace-flows", BR, str(desired_file))
        raw_c.append(time.perf_counter() - t0)
        assert not (await rec.resync()).changed
    rc, oc = statistics.median(raw_c), statistics.median(ours_c)
    print(f"    resync without drift: {t_clean:.3f}s ({cold.unchanged} flows compared)")
    print(f"(c) resync with 1% drift of {total}: ours {oc:.3f}s  replace-flows {rc:.3f}s  "
          f"ratio {oc / rc:.2f}  (target <= 1.0)")  # fmt: skip
    db.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flows", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with TestBed() as bed:
        asyncio.run(measure(bed, args.flows, args.repeat))


if __name__ == "__main__":
    main()
