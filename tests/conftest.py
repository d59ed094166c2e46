"""Shared fixtures: a real-OVS test bed per test, torn down and leak-checked whatever happens."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator

import pytest
from kvswitch_testbed import TestBed, find_leaks
from kvswitch_testbed.bed import teardown_run
from kvswitch_testbed.cni_harness import CniNode

REQUIRED_BINARIES = ("ovsdb-server", "ovs-vswitchd", "ovs-vsctl", "ovs-ofctl", "ip", "ethtool", "ping")

_session_runs: list[str] = []


def _missing_prerequisites() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    missing = [b for b in REQUIRED_BINARIES if shutil.which(b) is None]
    return f"missing binaries: {', '.join(missing)} (run `make setup`)" if missing else None


@pytest.fixture(scope="session", autouse=True)
def _prerequisites_and_final_leak_check() -> Iterator[None]:
    """Fail loudly (never skip) when the machine is not set up, and check every run at the end."""
    problem = _missing_prerequisites()
    if problem:
        pytest.fail(problem, pytrace=False)
    yield
    leaked = {run: find_leaks(run) for run in _session_runs}
    leaked = {run: report for run, report in leaked.items() if report}
    for run in leaked:
        teardown_run(run)
    assert not leaked, f"test runs leaked resources: {leaked}"


def register_run(run_id: str) -> None:
    """Have the end-of-session leak check cover a run made outside :func:`new_bed`."""
    _session_runs.append(run_id)


def new_bed() -> TestBed:
    bed = TestBed()
    register_run(bed.run_id)
    return bed


@contextlib.contextmanager
def cni_node(prepare: Callable[[CniNode], None] | None = None) -> Iterator[CniNode]:
    """A leak-checked CNI node (bridge, plugin installed, server on a thread) for a test module."""
    bed = new_bed()
    node: CniNode | None = None
    try:
        node = CniNode(bed)
        if prepare is not None:
            prepare(node)
        yield node
        assert node.leftovers() == {}
    finally:
        if node is not None:
            node.close()
        bed.teardown()
    report = find_leaks(bed.run_id)
    assert not report, f"test bed leaked: {report}"


@pytest.fixture
def bed() -> Iterator[TestBed]:
    testbed = new_bed()
    try:
        yield testbed
    finally:
        testbed.teardown()
    report = find_leaks(testbed.run_id)
    assert not report, f"test bed leaked: {report}"
