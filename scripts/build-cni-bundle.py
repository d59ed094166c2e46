#!/usr/bin/env python3
"""Builds the self-contained bundle that install-cni.sh puts into a node's CNI bin dir.

The container runtime runs CNI plugins on the host, where no Python (or not ours, or a libc older
than the one our binaries were linked against) can be assumed. The bundle therefore carries this
interpreter, its standard library, the installed distribution ``--dist`` with its dependencies, every
shared library they link (found with ``ldd``) and the dynamic loader itself. Each wrapper in
``wrappers/`` starts its program through the bundled loader with ``--library-path``, so nothing but
the kernel and ``/bin/sh`` comes from the host.

Usage (the Dockerfile's): build-cni-bundle.py OUT --dist kvswitch --entry k-vswitch-cni
                          --binary /usr/lib/cni/host-local --binary /usr/lib/cni/portmap
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

# The first line after the shebang marks a file as ours: install-cni.sh replaces and
# uninstall-cni.sh removes only files that carry it.
MARK = "# k-vswitch-wrapper"
LOADER = "ld-linux-x86-64.so.2"
# Parts of the standard library a CNI plugin never imports; they are a third of its size.
STDLIB_SKIP = {
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "lib2to3",
    "pydoc_data",
    "site-packages",
    "dist-packages",
}
# Loaded with dlopen() by glibc (thread cancellation), so ldd never lists it.
DLOPENED = ("libgcc_s.so.1",)


def _dist_closure(name: str) -> list[md.Distribution]:
    """The distribution and everything it requires (extras ignored, markers not evaluated)."""
    seen: dict[str, md.Distribution] = {}
    todo = [name]
    while todo:
        req = todo.pop()
        key = re.sub(r"[-_.]+", "-", req).lower()
        if key in seen:
            continue
        try:
            dist = md.distribution(req)
        except md.PackageNotFoundError:
            if req == name:
                raise
            continue  # an optional or platform-specific requirement that is not installed
        seen[key] = dist
        for spec in dist.requires or []:
            if "extra ==" in spec:
                continue
            match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", spec)
            if match:
                todo.append(match.group(0))
    return list(seen.values())


def _copy_site_packages(dists: list[md.Distribution], dest: Path) -> None:
    for dist in dists:
        files = dist.files
        if files is None:
            sys.exit(f"{dist.metadata['Name']} has no RECORD: cannot tell its files")
        for rel in files:
            if rel.parts and rel.parts[0] == "..":
                continue  # console scripts and data outside site-packages
            src = Path(str(dist.locate_file(rel)))
            if src.is_file():
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, target)


def _entry_point(name: str) -> md.EntryPoint:
    found = md.entry_points(group="console_scripts", name=name)
    if not found:
        sys.exit(f"no console script {name!r} is installed: build the package first")
    return next(iter(found))


def _ldd(path: Path) -> list[tuple[str, str | None]]:
    """(name, resolved path or None when not found) for each library ``path`` needs."""
    proc = subprocess.run(["ldd", str(path)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return []  # static, or not ELF
    libs: list[tuple[str, str | None]] = []
    for line in proc.stdout.splitlines():
        line = line.strip()
        if "=>" in line:
            soname, _, rest = line.partition("=>")
            target = rest.strip().split(" (")[0].strip()
            libs.append((soname.strip(), None if target == "not found" else target))
        elif line.startswith("/"):
            libs.append((LOADER, line.split(" (")[0]))
    return libs


def _is_elf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"\x7fELF"


def _collect_libraries(out: Path, lib: Path) -> list[str]:
    missing: set[str] = set()
    elves = [p for p in out.rglob("*") if p.is_file() and not p.is_symlink() and _is_elf(p)]
    for elf in elves:
        for soname, resolved in _ldd(elf):
            if resolved is None:
                missing.add(f"{soname} (needed by {elf.relative_to(out)})")
            elif not (lib / soname).exists():
                shutil.copy2(os.path.realpath(resolved), lib / soname)
    for soname in DLOPENED:
        for candidate in (Path("/lib/x86_64-linux-gnu") / soname, Path("/usr/lib/x86_64-linux-gnu") / soname):
            if candidate.exists() and not (lib / soname).exists():
                shutil.copy2(os.path.realpath(candidate), lib / soname)
    if not (lib / LOADER).exists():
        sys.exit(f"no {LOADER} found: is this an x86_64 glibc system?")
    return sorted(missing)


def _build_id(out: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(out)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def _wrapper(build_id: str, description: str, command: str) -> str:
    return f"""#!/bin/sh
{MARK}: installed by k-vswitch, removed by `helm uninstall`.
# {description}, with the loader and libraries of k-vswitch bundle {build_id} instead of the host's.
case "$0" in */*) d="${{0%/*}}" ;; *) d="$(dirname "$(command -v "$0")")" ;; esac
b="$d/k-vswitch.d/{build_id}"
exec "$b/lib/{LOADER}" --library-path "$b/lib" {command} "$@"
"""


def build(out: Path, dist: str, entries: list[str], binaries: list[Path]) -> str:
    if out.exists():
        shutil.rmtree(out)
    lib = out / "lib"
    (out / "bin").mkdir(parents=True)
    lib.mkdir()
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"

    # The interpreter finds its prefix from bin/python3 by the landmark lib/pythonX.Y/os.py.
    shutil.copy2(os.path.realpath(sys.executable), out / "bin" / "python3")

    def skipped(_dir: str, names: list[str]) -> set[str]:
        return {n for n in names if n in STDLIB_SKIP or n.startswith(("config-", "_tkinter"))}

    shutil.copytree(sysconfig.get_paths()["stdlib"], lib / version, symlinks=False, ignore=skipped)
    _copy_site_packages(_dist_closure(dist), out / "site-packages")

    for name in entries:
        ep = _entry_point(name)
        # Started with -I -S: site processing would triple the interpreter's start-up, paid on
        # every pod. The bundle's site-packages goes on sys.path directly; only a development
        # bundle (editable install: a .pth finder) needs site processing after all.
        (out / "bin" / f"{name}.py").write_text(
            f"# Generated: the {name} console script, from the bundle's own site-packages.\n"
            "import importlib, os, sys\n"
            "sp = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),"
            " 'site-packages')\n"
            "sys.path.insert(0, sp)\n"
            "try:\n"
            f"    target = importlib.import_module({ep.module!r})\n"
            "except ModuleNotFoundError:\n"
            "    import site\n"
            "    site.addsitedir(sp)\n"
            f"    target = importlib.import_module({ep.module!r})\n"
            f"for attr in {ep.attr!r}.split('.'):\n"
            "    target = getattr(target, attr)\n"
            "sys.exit(target())\n"
        )
    for binary in binaries:
        (out / "libexec").mkdir(exist_ok=True)
        shutil.copy2(binary, out / "libexec" / binary.name)

    missing = _collect_libraries(out, lib)
    if missing:
        (out / "MISSING-LIBRARIES").write_text("\n".join(missing) + "\n")
        print(
            "warning: libraries not found (those modules will not import):",
            *missing,
            sep="\n  ",
            file=sys.stderr,
        )

    build_id = _build_id(out)
    wrappers = out / "wrappers"
    wrappers.mkdir()
    for name in entries:
        (wrappers / name).write_text(
            _wrapper(build_id, f"Runs {name}", f'"$b/bin/python3" -I "$b/bin/{name}.py"')
        )
    for binary in binaries:
        (wrappers / binary.name).write_text(
            _wrapper(build_id, f"Runs {binary.name}", f'"$b/libexec/{binary.name}"')
        )
    for wrapper in wrappers.iterdir():
        wrapper.chmod(0o755)
    (out / "BUILD_ID").write_text(build_id + "\n")
    return build_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path)
    parser.add_argument(
        "--dist", required=True, help="installed distribution to carry, with its requirements"
    )
    parser.add_argument("--entry", action="append", default=[], help="console script to wrap")
    parser.add_argument("--binary", action="append", default=[], type=Path, help="executable to wrap")
    args = parser.parse_args(argv)
    build_id = build(args.out, args.dist, args.entry, args.binary)
    print(f"bundle {build_id} in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
