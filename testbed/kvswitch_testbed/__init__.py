"""A real-OVS multi-node test bed on one machine: nodes and pods are network namespaces.

Shared by the tests, the sandbox and the benchmarks so that all three exercise the same
processes, namespaces and packets.
"""

from kvswitch_testbed.bed import Node, Pod, TestBed
from kvswitch_testbed.leaks import LeakReport, find_leaks
from kvswitch_testbed.ovsproc import OvsInstance

__all__ = ["LeakReport", "Node", "OvsInstance", "Pod", "TestBed", "find_leaks"]
