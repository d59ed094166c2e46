"""Network namespaces: where named ones live, and work done inside one without moving the caller.

A socket stays in the namespace it was created in. So instead of switching the calling thread (or
forking a helper process per socket, as pyroute2's ``netns=`` does), a short-lived thread enters
the namespace with setns(2), does the work (typically: opens sockets) and exits; the caller then
uses those sockets from anywhere.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

CLONE_NEWNET = 0x40000000
NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3)
NETNS_DIR = Path("/var/run/netns")  # where `ip netns add NAME` bind-mounts a namespace

T = TypeVar("T")
_libc = ctypes.CDLL(None, use_errno=True)  # the process's one handle for setns(2)


class NotANetworkNamespace(OSError):
    """The path exists but is not a network namespace file."""


def netns_path(name: str) -> str:
    """The file of namespace ``name`` as `ip netns` knows it; a path is returned as it is."""
    return str(NETNS_DIR / name)


def open_netns(path: str) -> int:
    """Open a network namespace file (e.g. CNI_NETNS); the fd pins the namespace until closed.

    FileNotFoundError when it does not exist, :class:`NotANetworkNamespace` when it is some other
    file (or another kind of namespace), other OSErrors as open(2) raises them.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        nstype = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError:
        nstype = -1
    if nstype != CLONE_NEWNET:
        os.close(fd)
        raise NotANetworkNamespace(f"{path} is not a network namespace")
    return fd


def setns(fd: int) -> None:
    """Move the calling thread into the network namespace ``fd`` (only ever call on a helper thread)."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def in_netns(netns: int | str | None, fn: Callable[[], T], *, name: str = "kvs-setns") -> T:
    """Run ``fn`` on a new thread that first enters ``netns`` (an open fd, a name or a path).

    None runs ``fn`` right here, in the caller's namespace. Exceptions of ``fn`` are re-raised.
    """
    if netns is None:
        return fn()
    result: list[T] = []
    failure: list[BaseException] = []

    def body() -> None:
        try:
            if isinstance(netns, int):
                setns(netns)
            else:
                fd = os.open(netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
                try:
                    setns(fd)
                except OSError as exc:
                    raise OSError(exc.errno, f"setns({netns}): {exc.strerror}") from None
                finally:
                    os.close(fd)
            result.append(fn())
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=body, name=name)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def sockets_in(netns: int | str | None, specs: Iterable[tuple[int, int, int]]) -> list[socket.socket]:
    """Open sockets ``(family, type, proto)`` inside ``netns``; all or none (closed on failure)."""

    def open_all() -> list[socket.socket]:
        out: list[socket.socket] = []
        try:
            for spec in specs:
                out.append(socket.socket(*spec))
        except BaseException:
            for s in out:
                s.close()
            raise
        return out

    return in_netns(netns, open_all)


def read_sysctl(netns: int | str | None, key: str) -> str:
    """``sysctl -n KEY`` as seen from ``netns`` (/proc/sys/net follows the reading thread's namespace)."""
    path = "/proc/sys/" + key.replace(".", "/")

    def read() -> str:
        with open(path) as f:
            return f.read().strip()

    return in_netns(netns, read, name="kvs-sysctl")


def write_sysctl(netns: int | str | None, key: str, value: str) -> None:
    path = "/proc/sys/" + key.replace(".", "/")

    def write() -> None:
        with open(path, "w") as f:
            f.write(value)

    in_netns(netns, write, name="kvs-sysctl")
