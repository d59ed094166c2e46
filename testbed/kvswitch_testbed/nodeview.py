"""Run a program with one simulated node's filesystem: its directories at the chart's host paths.

The nodes of the test bed share one machine, so a path such as ``/var/run/k-vswitch/cni.sock`` or
``/opt/cni/bin`` cannot be each node's at once. The chart-driven sandbox mounts each node's own
directory into that node's containers at those paths (podman ``--volume``); this module gives the
node's *host-side* programs, the CNI plugins its runtime execs, the same view: in a private mount
namespace it binds each node directory over the host path, then execs the program. Nothing is
changed outside that namespace, and it ends with the program.

A host path that does not exist on the machine (say ``/run/k-vswitch``) is created on a tmpfs laid
over its deepest existing parent, inside the private namespace only; the parent's entries are bound
back onto the tmpfs, so everything else under it (``/run/netns``...) stays visible.

Standard library only, started as a file (``python -I -S nodeview.py SPEC PLUGIN``) on every CNI
call: no package import on that path.
"""

from __future__ import annotations

import ctypes
import json
import os
import stat
import sys
from pathlib import Path

CLONE_NEWNS = 0x00020000
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SLAVE = 1 << 19

_libc = ctypes.CDLL(None, use_errno=True)
_covered: set[Path] = set()  # directories this namespace laid a tmpfs over


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    rc = _libc.mount(
        source.encode(),
        target.encode(),
        fstype.encode() if fstype else None,
        ctypes.c_ulong(flags),
        data.encode() if data else None,
    )
    _check(rc, f"mount {source} on {target}")


def _real(path: str) -> Path:
    """``path`` with the symlinks of its existing part resolved (/var/run/x -> /run/x)."""
    p = Path(path)
    existing = p
    rest: list[str] = []
    while not existing.exists() and existing != existing.parent:
        rest.insert(0, existing.name)
        existing = existing.parent
    return Path(os.path.realpath(existing)).joinpath(*rest)


def _make_room(target: Path) -> None:
    """Create ``target`` (a directory) when missing, on a tmpfs over its deepest existing parent."""
    if target.is_dir():
        return
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if parent in _covered:  # our own tmpfs: create in place
        target.mkdir(parents=True, exist_ok=True)
        return
    if parent == Path("/"):
        raise OSError(f"will not lay a tmpfs over / to create {target}")
    # A handle on the parent as it is now, to bind its entries back from under the tmpfs.
    fd = os.open(parent, os.O_PATH | os.O_DIRECTORY)
    try:
        entries = os.listdir(f"/proc/self/fd/{fd}")
        mode = stat.S_IMODE(os.stat(parent).st_mode)
        _mount("kvswitch-nodeview", str(parent), "tmpfs", 0, f"mode={mode:o}")
        for name in entries:
            src = f"/proc/self/fd/{fd}/{name}"
            dst = parent / name
            st = os.lstat(src)
            if stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(src), dst)
                continue
            if stat.S_ISDIR(st.st_mode):
                dst.mkdir()
            else:
                dst.touch()
            _mount(src, str(dst), None, MS_BIND | MS_REC)
    finally:
        os.close(fd)
    _covered.add(parent)
    target.mkdir(parents=True, exist_ok=True)


def enter(mounts: list[tuple[str, str]]) -> None:
    """Unshare the mount namespace and bind each (host path, node directory) pair."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    # Slave: namespaces the machine mounts later (new pods' /run/netns/NAME) still appear in here,
    # and nothing mounted in here reaches the machine.
    _mount("none", "/", None, MS_REC | MS_SLAVE)
    for target, source in mounts:
        real = _real(target)
        _make_room(real)
        _mount(source, str(real), None, MS_BIND | MS_REC)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: nodeview.py SPEC.json PLUGIN", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[1]).read_text())
    enter([(t, s) for t, s in spec["mounts"]])
    plugin = argv[2]
    for d in os.environ.get("CNI_PATH", "").split(":"):
        path = os.path.join(d, plugin)
        if d and os.path.isfile(path):
            os.execv(path, [path])
    print(json.dumps({"cniVersion": "1.0.0", "code": 7, "msg": f"{plugin} not in CNI_PATH on this node"}))
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
