"""IPAM by delegation: exec the plugin named by ``ipam.type`` (host-local) as the CNI spec says.

The delegate gets the same environment and the same network configuration on stdin. When it
speaks an older protocol than the caller (Debian's host-local 1.1.1 stops at 1.0.0), the
configuration is re-versioned to the newest version both sides speak; the answer is read in
any version and re-rendered by the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvswitch.cni.result import Result
from kvswitch.cni.spec import SUPPORTED_VERSIONS, WELL_KNOWN_CODES, CniError, Code, at_least, version_key

HOST_LOCAL = "host-local"
HOST_LOCAL_DEFAULT_DIR = "/var/lib/cni/networks"
EXEC_TIMEOUT = 60.0


@dataclass(frozen=True)
class Allocation:
    """One host-local reservation: a file named after the IP holding ``containerID\\r\\nifname``."""

    ip: str
    container_id: str
    ifname: str


def find_plugin(name: str, cni_path: tuple[str, ...]) -> str:
    for directory in cni_path:
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise CniError(
        Code.INVALID_CONFIG,
        f"IPAM plugin {name!r} not found",
        f"ipam.type names no executable in CNI_PATH {':'.join(cni_path)}",
    )


class IpamDelegate:
    """Runs IPAM plugins; remembers each binary's supported versions (keyed by path and mtime)."""

    def __init__(self) -> None:
        self._versions: dict[tuple[str, int], tuple[str, ...]] = {}

    async def _exec(
        self, plugin: str, env: Mapping[str, str], stdin: bytes, command: str
    ) -> tuple[int, bytes, bytes]:
        full_env = {**env, "CNI_COMMAND": command}
        try:
            proc = await asyncio.create_subprocess_exec(
                plugin,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=full_env,
            )
        except OSError as exc:
            raise CniError(Code.IPAM_FAILED, f"cannot run IPAM plugin {plugin}", str(exc)) from None
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin), EXEC_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise CniError(
                Code.TRY_AGAIN_LATER, f"IPAM plugin {plugin} {command} timed out after {EXEC_TIMEOUT:.0f}s"
            ) from None
        except BaseException:
            # Cancelled (server stopping): do not leave the child running unattended.
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.shield(proc.wait())
            raise
        return proc.returncode or 0, out, err

    async def supported_versions(self, plugin: str, env: Mapping[str, str]) -> tuple[str, ...]:
        try:
            key = (plugin, os.stat(plugin).st_mtime_ns)
        except OSError:
            key = (plugin, 0)
        if key not in self._versions:
            code, out, _ = await self._exec(plugin, env, b'{"cniVersion":"1.1.0"}', "VERSION")
            versions: tuple[str, ...] = ()
            if code == 0:
                with contextlib.suppress(ValueError, TypeError, AttributeError):
                    versions = tuple(str(v) for v in json.loads(out).get("supportedVersions", []))
            self._versions[key] = versions
        return self._versions[key]

    async def negotiate(self, plugin: str, env: Mapping[str, str], wanted: str) -> str:
        """The newest version both speak, not newer than ``wanted``; error 1 when there is none."""
        theirs = await self.supported_versions(plugin, env)
        if wanted in theirs or not theirs:
            return wanted  # an unanswered VERSION proves nothing: let the real call speak
        want_key = version_key(wanted) or (0, 0, 0)
        common = [v for v in SUPPORTED_VERSIONS if v in theirs and (version_key(v) or (0, 0, 0)) <= want_key]
        if not common:
            raise CniError(
                Code.INCOMPATIBLE_VERSION,
                f"IPAM plugin {os.path.basename(plugin)} shares no CNI version with {wanted}",
                f"it supports {', '.join(theirs) or 'nothing it would tell'}",
            )
        return max(common, key=lambda v: version_key(v) or (0, 0, 0))

    async def supports(self, plugin: str, env: Mapping[str, str], version: str) -> bool:
        return any(at_least(v, version) for v in await self.supported_versions(plugin, env))

    async def call(
        self,
        command: str,
        plugin: str,
        env: Mapping[str, str],
        raw_conf: dict[str, Any],
        version: str,
    ) -> bytes:
        """Run ``command``; the delegate's CNI error is passed on (well-known codes unchanged)."""
        use = await self.negotiate(plugin, env, version)
        conf = dict(raw_conf)
        if use != version:
            conf["cniVersion"] = use
            if isinstance(conf.get("prevResult"), dict):
                conf["prevResult"] = Result.parse(conf["prevResult"], "prevResult").render(use)
        code, out, err = await self._exec(plugin, env, json.dumps(conf).encode(), command)
        if code != 0:
            raise _delegate_error(os.path.basename(plugin), command, out, err)
        return out

    async def add(
        self, plugin: str, env: Mapping[str, str], raw_conf: dict[str, Any], version: str
    ) -> Result:
        out = await self.call("ADD", plugin, env, raw_conf, version)
        try:
            data = json.loads(out)
        except ValueError as exc:
            raise CniError(Code.IPAM_FAILED, "IPAM plugin returned no JSON result", str(exc)) from None
        result = Result.parse(data, "the IPAM result")
        if not result.ips:
            raise CniError(Code.IPAM_FAILED, "IPAM plugin returned no IP address")
        return result


def _delegate_error(name: str, command: str, out: bytes, err: bytes) -> CniError:
    prefix = f"IPAM plugin {name} {command} failed"
    try:
        data = json.loads(out)
        code, msg = int(data["code"]), str(data.get("msg", ""))
        details = str(data.get("details", "") or "")
    except (ValueError, TypeError, KeyError):
        text = (out or err).decode(errors="replace").strip()
        return CniError(Code.IPAM_FAILED, prefix, text or "it exited non-zero without a CNI error")
    full = f"{prefix}: {msg}"
    if code in WELL_KNOWN_CODES:
        return CniError(code, full, details)
    return CniError(Code.IPAM_FAILED, full, details or f"delegate error code {code}")


def host_local_allocations(raw_conf: dict[str, Any], network: str) -> list[Allocation]:
    """host-local's reservations of ``network``: files in ``<dataDir>/<network>/`` named by IP."""
    ipam = raw_conf.get("ipam") or {}
    data_dir = Path(ipam.get("dataDir") or HOST_LOCAL_DEFAULT_DIR) / network
    found: list[Allocation] = []
    try:
        entries = list(data_dir.iterdir())
    except OSError:
        return found
    for entry in entries:
        try:
            ipaddress.ip_address(entry.name)
            text = entry.read_text()
        except (ValueError, OSError):
            continue  # lock, last_reserved_ip.N, or gone meanwhile
        container_id, _, ifname = text.strip().partition("\n")
        found.append(Allocation(entry.name, container_id.strip(), ifname.strip()))
    return found
