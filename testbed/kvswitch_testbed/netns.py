"""Network-namespace primitives: run commands in a namespace and open sockets inside one.

Sockets are created in-process: a short-lived thread enters the namespace with setns(2), opens
the socket and exits. The socket stays bound to that namespace, so one asyncio loop can talk
from and to any number of namespaces without forking a process per probe.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
from collections.abc import Sequence

from kvswitch.kernel.netns import NETNS_DIR
from kvswitch.kernel.netns import in_netns as in_thread_netns


class CommandError(RuntimeError):
    """A command exited non-zero; carries its output so failures explain themselves."""

    def __init__(self, cmd: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        self.cmd = list(cmd)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(f"{' '.join(cmd)} exited {returncode}: {stderr.strip() or stdout.strip()}")


def in_netns(cmd: Sequence[str], netns: str | None) -> list[str]:
    return ["ip", "netns", "exec", netns, *cmd] if netns else list(cmd)


def run(
    cmd: Sequence[str],
    netns: str | None = None,
    *,
    check: bool = True,
    input: str | None = None,
    timeout: float = 30.0,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    full = in_netns(cmd, netns)
    proc = subprocess.run(
        full, input=input, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )
    if check and proc.returncode != 0:
        raise CommandError(full, proc.returncode, proc.stdout, proc.stderr)
    return proc


async def arun(
    cmd: Sequence[str],
    netns: str | None = None,
    *,
    check: bool = True,
    input: str | None = None,
    timeout: float = 30.0,
) -> subprocess.CompletedProcess[str]:
    full = in_netns(cmd, netns)
    proc = await asyncio.create_subprocess_exec(
        *full,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(
            proc.communicate(input.encode() if input is not None else None), timeout
        )
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    result = subprocess.CompletedProcess(full, proc.returncode or 0, out.decode(), err.decode())
    if check and result.returncode != 0:
        raise CommandError(full, result.returncode, result.stdout, result.stderr)
    return result


def list_netns() -> list[str]:
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir())


def create_netns(name: str) -> None:
    """Create a namespace with loopback up (idempotent)."""
    if name not in list_netns():
        run(["ip", "netns", "add", name])
    run(["ip", "link", "set", "lo", "up"], name)


def delete_netns(name: str) -> None:
    if name in list_netns():
        run(["ip", "netns", "delete", name], check=False)


def sysctl(netns: str | None, key: str, value: str) -> None:
    run(["sysctl", "-qw", f"{key}={value}"], netns)


def netns_socket(
    netns: str, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM, proto: int = 0
) -> socket.socket:
    """Open a socket that lives in network namespace ``netns``."""
    return in_thread_netns(netns, lambda: socket.socket(family, type, proto))
