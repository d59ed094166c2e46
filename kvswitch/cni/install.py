"""Install the ``k-vswitch-cni`` executable into a CNI bin directory (e.g. /opt/cni/bin).

The installed file is a three-line Python script started with ``-I -S``: isolated and without
site-packages, because processing the virtualenv's site directory (and its .pth hooks) costs
about three times the interpreter's own start-up. The package directory goes on ``sys.path``
explicitly; the in-process fallback enables site-packages only when it needs them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import kvswitch
from kvswitch.cni.contract import (
    CONFLIST_NAME,
    CONFLIST_VERSION,
    DEFAULT_CNI_BIN_DIR,
    NETWORK_NAME,
    PLUGIN_NAME,
)

NAME = PLUGIN_NAME


def shim_text(python: str, package_root: str) -> str:
    return (
        f"#!{python} -IS\n"
        "# k-vswitch CNI plugin entry point, written by `python -m kvswitch.cni.install`.\n"
        f"import sys; sys.path.insert(0, {package_root!r})\n"
        "from kvswitch.cni.main import main; sys.exit(main())\n"
    )


def write_atomically(path: Path, text: str, mode: int = 0o644) -> Path:
    """Readers see the old file or the new one, never a partial one (a runtime may be exec'ing
    the plugin or reading the conflist right now)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def install(dest_dir: str | os.PathLike[str], *, name: str = NAME, python: str | None = None) -> Path:
    """Write the executable into the CNI bin directory."""
    root = str(Path(kvswitch.__file__).resolve().parent.parent)
    return write_atomically(Path(dest_dir) / name, shim_text(python or sys.executable, root), 0o755)


def conflist(
    *,
    bridge: str,
    mtu: int,
    encapsulation: str,
    ovsdb_socket: str,
    server_socket: str,
    pod_cidr: str,
    gateway_ip: str,
    ipam_data_dir: str | None = None,
) -> dict[str, Any]:
    """k-vswitch first (it makes the interface and asks host-local for the IP), then portmap."""
    ipam: dict[str, Any] = {"type": "host-local", "ranges": [[{"subnet": pod_cidr, "gateway": gateway_ip}]]}
    if ipam_data_dir:
        ipam["dataDir"] = ipam_data_dir
    return {
        "cniVersion": CONFLIST_VERSION,
        "name": NETWORK_NAME,
        "plugins": [
            {
                "type": PLUGIN_NAME,
                "bridge": bridge,
                "mtu": mtu,
                "encapsulation": encapsulation,
                "ovsdbSocket": ovsdb_socket,
                "serverSocket": server_socket,
                "ipam": ipam,
            },
            {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True},
        ],
    }


def install_conflist(conf_dir: str | os.PathLike[str], conf: dict[str, Any]) -> Path:
    """The conflist goes last on a node: the runtime starts sending pods once it exists."""
    return write_atomically(Path(conf_dir) / CONFLIST_NAME, json.dumps(conf, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvswitch.cni.install", description=__doc__)
    parser.add_argument("dest", nargs="?", default=DEFAULT_CNI_BIN_DIR, help="CNI bin directory")
    parser.add_argument("--python", default=None, help="interpreter (default: this one)")
    args = parser.parse_args(argv)
    print(install(args.dest, python=args.python))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
