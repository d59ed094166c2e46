"""Test-bed start/stop cost: 3 simulated nodes vs one bare OVS instance started the same way.

Prints medians over a few rounds; the ratio shows what namespaces, underlay and br-phy add.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from kvswitch_testbed import OvsInstance, TestBed, find_leaks

ROUNDS = 5


def bare_instance() -> tuple[float, float]:
    with tempfile.TemporaryDirectory(dir="/run") as d:
        inst = OvsInstance(Path(d) / "ovs")
        t0 = time.perf_counter()
        inst.start()
        inst.vsctl("add-br", "br0", "--", "set", "bridge", "br0", "datapath_type=netdev")
        inst.wait_bridge("br0")
        t1 = time.perf_counter()
        inst.stop()
        return t1 - t0, time.perf_counter() - t1


def three_nodes() -> tuple[float, float]:
    bed = TestBed()
    t0 = time.perf_counter()
    bed.add_nodes(3)
    bed.seed_tunnel_neighbours()
    t1 = time.perf_counter()
    bed.teardown()
    t2 = time.perf_counter()
    assert not find_leaks(bed.run_id)
    return t1 - t0, t2 - t1


def main() -> None:
    base = [bare_instance() for _ in range(ROUNDS)]
    bed = [three_nodes() for _ in range(ROUNDS)]
    b_start, b_stop = statistics.median(x[0] for x in base), statistics.median(x[1] for x in base)
    n_start, n_stop = statistics.median(x[0] for x in bed), statistics.median(x[1] for x in bed)
    print(f"bare OVS instance start:  {b_start * 1000:7.1f} ms   stop: {b_stop * 1000:6.1f} ms")
    print(f"3-node test bed start:    {n_start * 1000:7.1f} ms   stop: {n_stop * 1000:6.1f} ms")
    print(f"ratio 3 nodes / 1 bare instance (start): {n_start / b_start:.2f}  (target: 3 nodes < 3000 ms)")


if __name__ == "__main__":
    main()
