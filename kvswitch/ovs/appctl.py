"""``ovs-appctl`` against this node's ovs-vswitchd, found by its control socket.

``ovs-appctl -t ovs-vswitchd`` reads ovs-vswitchd.pid and checks that the process holding it is
alive: from a pod without hostPID that process is invisible ("stale pidfile"). The control socket
``ovs-vswitchd.<pid>.ctl`` in the run directory works from anywhere that sees the directory.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

DEFAULT_RUNDIR = "/var/run/openvswitch"


def vswitchd_target(rundir: str | None = None) -> str:
    """The control socket of the running ovs-vswitchd (the newest, after a restart), or the
    daemon's name when none is found."""
    base = Path(rundir or os.environ.get("OVS_RUNDIR") or DEFAULT_RUNDIR)
    fixed = base / "ovs-vswitchd.ctl"  # --unixctl given explicitly (the test bed)
    if fixed.exists():
        return str(fixed)
    found = sorted(base.glob("ovs-vswitchd.*.ctl"), key=lambda p: p.stat().st_mtime)
    return str(found[-1]) if found else "ovs-vswitchd"


async def appctl(rundir: str | None, *args: str) -> str:
    env = {**os.environ, "OVS_RUNDIR": rundir} if rundir else None
    proc = await asyncio.create_subprocess_exec(
        "ovs-appctl", "-t", vswitchd_target(rundir), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"ovs-appctl {args[0]}: {err.decode().strip() or out.decode().strip()}")
    return out.decode()
