"""Install the ``k-vswitch-cni`` executable into a CNI bin directory (e.g. /opt/cni/bin).

The installed file is a three-line Python script started with ``-I -S``: isolated and without
site-packages, because processing the virtualenv's site directory (and its .pth hooks) costs
about three times the interpreter's own start-up. The package directory goes on ``sys.path``
explicitly; the in-process fallback enables site-packages only when it needs them.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import kvswitch

NAME = "k-vswitch-cni"


def shim_text(python: str, package_root: str) -> str:
    return (
        f"#!{python} -IS\n"
        "# k-vswitch CNI plugin entry point, written by `python -m kvswitch.cni.install`.\n"
        f"import sys; sys.path.insert(0, {package_root!r})\n"
        "from kvswitch.cni.main import main; sys.exit(main())\n"
    )


def install(dest_dir: str | os.PathLike[str], *, name: str = NAME, python: str | None = None) -> Path:
    """Write the executable atomically (a runtime may be exec'ing the old one right now)."""
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    root = str(Path(kvswitch.__file__).resolve().parent.parent)
    text = shim_text(python or sys.executable, root)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=dest)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o755)
        os.replace(tmp, dest / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest / name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvswitch.cni.install", description=__doc__)
    parser.add_argument("dest", nargs="?", default="/opt/cni/bin", help="CNI bin directory")
    parser.add_argument("--python", default=None, help="interpreter (default: this one)")
    args = parser.parse_args(argv)
    print(install(args.dest, python=args.python))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
