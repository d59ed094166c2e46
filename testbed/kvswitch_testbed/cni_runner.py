"""The runtime's side of CNI, small: exec a plugin (in a node's namespace) and run conflists.

Used by the tests and the benchmark in place of containerd/libcni. A plugin is started from a
fresh thread that setns(2)s into the node's namespace first, so the child is born there without
the cost of ``ip netns exec`` (which would also distort the latency comparison).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The setns(2) thread helper and the namespace paths are the product's kernel layer's.
from kvswitch.kernel.netns import in_netns as in_netns
from kvswitch.kernel.netns import netns_path as netns_path


@dataclass
class PluginRun:
    """One plugin execution as the runtime sees it."""

    code: int
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        return self.code == 0

    def json(self) -> Any:
        return json.loads(self.stdout)

    @property
    def error_code(self) -> int | None:
        """The CNI error code of a failed call (None when it succeeded or printed no error)."""
        if self.ok:
            return None
        try:
            return int(self.json()["code"])
        except (ValueError, KeyError, TypeError):
            return None

    def __str__(self) -> str:
        out, err = (b.decode(errors="replace").strip() for b in (self.stdout, self.stderr))
        return f"exit {self.code}: {out} {err}".strip()


@dataclass
class Plugins:
    """Where plugins live and in which namespace they run (the node's)."""

    cni_path: Sequence[str]
    netns: str | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    timeout: float = 60.0

    def find(self, plugin_type: str) -> str:
        for d in self.cni_path:
            p = Path(d) / plugin_type
            if p.is_file():
                return str(p)
        raise FileNotFoundError(f"plugin {plugin_type} not in {':'.join(self.cni_path)}")

    def exec(
        self,
        plugin_type: str,
        command: str,
        conf: Mapping[str, Any] | bytes,
        *,
        container_id: str = "",
        netns: str = "",
        ifname: str = "",
        args: str = "",
        env: Mapping[str, str] | None = None,
        stdin_fd: int | None = None,
    ) -> PluginRun:
        """Exec one plugin. ``env`` entries override (an empty value removes the variable)."""
        full = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": container_id,
            "CNI_NETNS": netns,
            "CNI_IFNAME": ifname,
            "CNI_ARGS": args,
            "CNI_PATH": ":".join(self.cni_path),
            **self.extra_env,
        }
        for k, v in (env or {}).items():
            full[k] = v
        full = {k: v for k, v in full.items() if v}
        data = conf if isinstance(conf, bytes) else json.dumps(conf).encode()
        binary = self.find(plugin_type)

        def run() -> subprocess.CompletedProcess[bytes]:
            return subprocess.run(
                [binary],
                input=None if stdin_fd is not None else data,
                stdin=stdin_fd,
                capture_output=True,
                env=full,
                timeout=self.timeout,
                check=False,
            )

        proc = in_netns(self.netns, run)
        return PluginRun(proc.returncode, proc.stdout, proc.stderr)


class PluginFailed(RuntimeError):
    def __init__(self, plugin: str, command: str, run: PluginRun) -> None:
        super().__init__(f"{plugin} {command}: {run}")
        self.run = run


@dataclass
class Attachment:
    container_id: str
    netns: str
    ifname: str = "eth0"
    args: str = ""
    capability_args: dict[str, Any] = field(default_factory=dict)


class ConfList:
    """Run a conflist like libcni: per plugin inject name, cniVersion, runtimeConfig, prevResult."""

    def __init__(self, conflist: Mapping[str, Any], plugins: Plugins) -> None:
        self.conflist = conflist
        self.plugins = plugins

    @property
    def version(self) -> str:
        return str(self.conflist["cniVersion"])

    def plugin_conf(self, index: int, att: Attachment, prev: Any | None) -> dict[str, Any]:
        conf = copy.deepcopy(dict(self.conflist["plugins"][index]))
        conf["name"] = self.conflist["name"]
        conf["cniVersion"] = self.version
        caps = conf.get("capabilities") or {}
        runtime = {k: v for k, v in att.capability_args.items() if caps.get(k)}
        if runtime:
            conf["runtimeConfig"] = runtime
        if prev is not None:
            conf["prevResult"] = prev
        return conf

    def _exec(self, index: int, command: str, att: Attachment, prev: Any | None) -> PluginRun:
        conf = self.plugin_conf(index, att, prev)
        return self.plugins.exec(
            conf["type"],
            command,
            conf,
            container_id=att.container_id,
            netns=att.netns,
            ifname=att.ifname,
            args=att.args,
        )

    def add(self, att: Attachment) -> Any:
        prev: Any | None = None
        for i, p in enumerate(self.conflist["plugins"]):
            run = self._exec(i, "ADD", att, prev)
            if not run.ok:
                raise PluginFailed(p["type"], "ADD", run)
            prev = run.json()
        return prev

    def check(self, att: Attachment, prev: Any, skip: frozenset[str] = frozenset()) -> None:
        for i, p in enumerate(self.conflist["plugins"]):
            if p["type"] in skip:
                continue
            run = self._exec(i, "CHECK", att, prev)
            if not run.ok:
                raise PluginFailed(p["type"], "CHECK", run)

    def delete(self, att: Attachment, prev: Any | None) -> None:
        """DEL in reverse order; every plugin runs even when one fails (the first failure is raised)."""
        failures = []
        for i in reversed(range(len(self.conflist["plugins"]))):
            run = self._exec(i, "DEL", att, prev)
            if not run.ok:
                failures.append(PluginFailed(self.conflist["plugins"][i]["type"], "DEL", run))
        if failures:
            raise failures[0]
