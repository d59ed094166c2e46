"""Find what a test-bed run left behind: namespaces, interfaces, processes and files."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from kvswitch_testbed.bed import RUN_PREFIX, run_workdir
from kvswitch_testbed.netns import list_netns, run


@dataclass
class LeakReport:
    netns: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    processes: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.netns or self.links or self.processes or self.paths)

    def __str__(self) -> str:
        parts = [f"{k}: {', '.join(v)}" for k, v in vars(self).items() if v]
        return "; ".join(parts) or "nothing leaked"


def _processes_mentioning(needle: str) -> list[str]:
    """Processes whose command line or environment names ``needle`` (the harness marks its
    daemons with KVSWITCH_RUN_DIR in the environment)."""
    found = []
    raw = needle.encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if raw in cmdline or b"KVSWITCH_RUN_DIR=" + raw.rstrip(b"/") in environ:
            text = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
            found.append(f"{proc.name}:{text[:120]}")
    return found


def find_leaks(run_id: str) -> LeakReport:
    """Everything of run ``run_id`` that still exists. Root-namespace links are matched by run id."""
    prefix = f"{RUN_PREFIX}{run_id}"
    workdir = run_workdir(run_id)
    report = LeakReport()
    report.netns = [ns for ns in list_netns() if ns.startswith(prefix)]
    links = json.loads(run(["ip", "-j", "link", "show"]).stdout or "[]")
    report.links = [link["ifname"] for link in links if run_id in link.get("ifname", "")]
    report.processes = _processes_mentioning(str(workdir) + "/")
    if workdir.exists():
        report.paths = [str(workdir)]
    return report
