"""Lifecycle of one private Open vSwitch instance (ovsdb-server + ovs-vswitchd).

Every path (database, sockets, pidfiles, logs) lives under ``workdir`` so that several instances,
and several test runs, coexist on one machine. ovs-vswitchd runs inside ``netns`` because its taps,
AF_PACKET sockets and route table belong to the namespace it was started in.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from subprocess import CompletedProcess

from kvswitch_testbed.netns import run

OVS_SCHEMA = Path("/usr/share/openvswitch/vswitch.ovsschema")


class OvsInstance:
    def __init__(self, workdir: Path, netns: str | None = None) -> None:
        self.workdir = workdir
        self.netns = netns

    @property
    def db_sock(self) -> Path:
        return self.workdir / "db.sock"

    @property
    def db_remote(self) -> str:
        return f"unix:{self.db_sock}"

    @property
    def vswitchd_ctl(self) -> Path:
        return self.workdir / "ovs-vswitchd.ctl"

    @property
    def ovsdb_ctl(self) -> Path:
        return self.workdir / "ovsdb-server.ctl"

    @property
    def env(self) -> dict[str, str]:
        """Environment under which the stock OVS tools find this instance."""
        d = str(self.workdir)
        return {
            **os.environ,
            "OVS_RUNDIR": d,
            "OVS_DBDIR": d,
            "OVS_LOGDIR": d,
            "OVS_SYSCONFDIR": d,
            "OVS_PKGDATADIR": "/usr/share/openvswitch",
        }

    def _pid(self, name: str) -> int | None:
        try:
            return int((self.workdir / f"{name}.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    @property
    def vswitchd_pid(self) -> int | None:
        pid = self._pid("ovs-vswitchd")
        return pid if pid is not None and process_alive(pid) else None

    @property
    def ovsdb_pid(self) -> int | None:
        pid = self._pid("ovsdb-server")
        return pid if pid is not None and process_alive(pid) else None

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        db = self.workdir / "conf.db"
        if not db.exists():
            run(["ovsdb-tool", "create", str(db), str(OVS_SCHEMA)])
        if self.ovsdb_pid is None:
            self.start_ovsdb()
            self.vsctl("--no-wait", "init")
        self.start_vswitchd()

    def start_ovsdb(self) -> None:
        """Start ovsdb-server on the existing database (returns once it listens)."""
        if self.ovsdb_pid is not None:
            return
        run(
            [
                "ovsdb-server",
                str(self.workdir / "conf.db"),
                f"--remote=punix:{self.db_sock}",
                f"--unixctl={self.ovsdb_ctl}",
                f"--pidfile={self.workdir / 'ovsdb-server.pid'}",
                f"--log-file={self.workdir / 'ovsdb-server.log'}",
                "--no-chdir",
                "--detach",
            ],
            self.netns,
        )

    def start_vswitchd(self) -> None:
        if self.vswitchd_pid is not None:
            return
        run(
            [
                "ovs-vswitchd",
                self.db_remote,
                f"--unixctl={self.vswitchd_ctl}",
                f"--pidfile={self.workdir / 'ovs-vswitchd.pid'}",
                f"--log-file={self.workdir / 'ovs-vswitchd.log'}",
                "--no-chdir",
                "--detach",
            ],
            self.netns,
            env=self.env,
        )

    def kill_vswitchd(self, sig: int = signal.SIGKILL) -> None:
        """Kill ovs-vswitchd abruptly (crash simulation); the database survives."""
        pid = self.vswitchd_pid
        if pid is None:
            return
        os.kill(pid, sig)
        _wait_gone(pid)

    def kill_ovsdb(self, sig: int = signal.SIGKILL) -> None:
        """Stop ovsdb-server with ``sig`` (SIGKILL: a crash; SIGTERM: a clean exit); the database
        file stays, clients (vswitchd, agents, the CNI server) see their connections drop."""
        pid = self.ovsdb_pid
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        if not _wait_gone(pid):
            _terminate(pid)

    def restart_ovsdb(self, downtime: float = 0.0, sig: int = signal.SIGKILL) -> None:
        """ovsdb-server goes away (``sig``) and comes back on the same database after ``downtime``."""
        self.kill_ovsdb(sig)
        time.sleep(downtime)
        self.start_ovsdb()

    def restart_vswitchd(self, downtime: float = 0.0, sig: int = signal.SIGKILL) -> None:
        """ovs-vswitchd goes away (``sig``) and comes back after ``downtime``: it rebuilds bridges
        and ports from the database, with empty flow tables."""
        self.kill_vswitchd(sig)
        time.sleep(downtime)
        self.start_vswitchd()

    def stop(self, cleanup: bool = False) -> None:
        """Stop both daemons.

        SIGTERM is immediate; ``cleanup`` asks vswitchd to delete its tap devices first (about 1.5 s),
        which is only needed when it does not run in a namespace of its own that goes away anyway.
        """
        pid = self.vswitchd_pid
        if pid is not None and cleanup:
            run(["ovs-appctl", "-t", str(self.vswitchd_ctl), "exit", "--cleanup"], check=False, timeout=10)
        for pid in (self.vswitchd_pid, self.ovsdb_pid):
            if pid is not None:
                _terminate(pid)

    def vsctl(self, *args: str, check: bool = True) -> CompletedProcess[str]:
        return run(["ovs-vsctl", f"--db={self.db_remote}", "--timeout=10", *args], check=check)

    def ofctl(self, *args: str, check: bool = True, input: str | None = None) -> CompletedProcess[str]:
        return run(["ovs-ofctl", "-O", "OpenFlow15", *args], check=check, input=input, env=self.env)

    def appctl(self, *args: str, check: bool = True) -> CompletedProcess[str]:
        return run(["ovs-appctl", "-t", str(self.vswitchd_ctl), *args], check=check)

    def mgmt_sock(self, bridge: str) -> Path:
        return self.workdir / f"{bridge}.mgmt"

    def wait_bridge(self, bridge: str, timeout: float = 5.0) -> None:
        """Wait until vswitchd has created the bridge's OpenFlow management socket."""
        deadline = time.monotonic() + timeout
        while not self.mgmt_sock(bridge).exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"bridge {bridge} has no management socket after {timeout}s")
            time.sleep(0.01)


def _terminate(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not _wait_gone(pid, 5.0):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _wait_gone(pid)


def process_alive(pid: int) -> bool:
    """True while the process runs; a zombie (exited, not yet reaped by init) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process_alive(pid):
            return True
        time.sleep(0.005)
    return False


def commands(*cmds: Sequence[str]) -> list[str]:
    """Join several ovs-vsctl commands into one transaction's argument list."""
    out: list[str] = []
    for c in cmds:
        if out:
            out.append("--")
        out.extend(c)
    return out
