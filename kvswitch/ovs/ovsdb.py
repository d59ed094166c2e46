"""ovsdb access over the official OVS Python IDL, in ensure()-style idempotent calls.

:class:`Ovsdb` is synchronous and owns its IDL; it must be used from one thread at a time. The CNI
plugin uses it directly; the agent uses :class:`AsyncOvsdb`, which runs every call on one worker
thread so the event loop never blocks and the IDL is never shared between threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import uuid as uuidlib
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import ovs.db.idl
import ovs.jsonrpc
import ovs.poller
import ovs.stream

SCHEMA_PATH = Path("/usr/share/openvswitch/vswitch.ovsschema")
TUNNEL_TYPES = frozenset({"vxlan", "gre", "geneve"})
RECONNECT_MAX_BACKOFF_MS = 1000
_COLUMNS: dict[str, list[str]] = {
    "Open_vSwitch": ["bridges", "other_config", "external_ids", "cur_cfg", "next_cfg"],
    "Bridge": [
        "name",
        "ports",
        "datapath_type",
        "fail_mode",
        "protocols",
        "external_ids",
        "other_config",
        "sflow",
        "ipfix",
    ],
    # Pod traffic telemetry (VSwitchConfig spec.telemetry): SetSflow and SetIpfix.
    "sFlow": ["targets", "sampling", "polling", "header", "agent", "external_ids"],
    "IPFIX": [
        "targets",
        "sampling",
        "obs_domain_id",
        "cache_active_timeout",
        "cache_max_flows",
        "external_ids",
    ],
    "Port": ["name", "interfaces", "external_ids"],
    "Interface": [
        "name",
        "type",
        "options",
        "ofport",
        "external_ids",
        "error",
        "mac_in_use",
        "mtu_request",
        "ofport_request",
    ],
}

P = ParamSpec("P")
T = TypeVar("T")


class OvsdbError(RuntimeError):
    """ovsdb refused or did not answer; the message says what was asked."""


@dataclass(frozen=True)
class PortInfo:
    name: str
    bridge: str | None
    type: str
    ofport: int | None
    external_ids: dict[str, str] = field(default_factory=dict)
    iface_external_ids: dict[str, str] = field(default_factory=dict)
    options: dict[str, str] = field(default_factory=dict)
    error: str | None = None


def _load_schema_helper(remote: str) -> ovs.db.idl.SchemaHelper:
    if SCHEMA_PATH.exists():
        return ovs.db.idl.SchemaHelper(location=str(SCHEMA_PATH))
    # No schema file (e.g. a slim image talking to the host's OVS): ask the server.
    error, stream = ovs.stream.Stream.open_block(ovs.stream.Stream.open(remote))
    if error:
        raise OvsdbError(f"cannot connect to {remote}: {error}")
    rpc = ovs.jsonrpc.Connection(stream)
    try:
        error, reply = rpc.transact_block(ovs.jsonrpc.Message.create_request("get_schema", ["Open_vSwitch"]))
        if error or reply.error:
            raise OvsdbError(f"get_schema from {remote} failed: {error or reply.error}")
        return ovs.db.idl.SchemaHelper(schema_json=reply.result)
    finally:
        rpc.close()


def _unwrap(value: Any) -> Any:
    """IDL optional columns come as [] or [x]."""
    if isinstance(value, list):
        return value[0] if value else None
    return value


def _set_keys(row: Any, column: str, values: Mapping[str, str | None]) -> None:
    """Set the keys of a map column; None removes a key. Unchanged keys are not written."""
    current = getattr(row, column)
    for k, v in values.items():
        if v is None:
            if k in current:
                row.delkey(column, k)
        elif current.get(k) != v:
            row.setkey(column, k, v)


def _merge_map(row: Any, column: str, values: Mapping[str, str] | None) -> None:
    current = getattr(row, column)
    for k, v in (values or {}).items():
        if current.get(k) != v:
            row.setkey(column, k, v)


class Tx:
    """One IDL transaction being built: commands see the rows inserted before them in it."""

    def __init__(self, db: Ovsdb, txn: ovs.db.idl.Transaction) -> None:
        self.db = db
        self.txn = txn
        self.inserted: dict[tuple[str, str], Any] = {}  # (table, name) -> row inserted here

    def insert(self, table: str, name: str) -> Any:
        row = self.txn.insert(self.db.idl.tables[table])
        row.name = name
        self.inserted[(table, name)] = row
        return row

    def bridge(self, name: str) -> Any | None:
        return self.inserted.get(("Bridge", name)) or self.db._bridge(name)

    def port(self, name: str) -> Any | None:
        return self.inserted.get(("Port", name)) or self.db._port(name)


class Command:
    """An ensure-style change, idempotent against the rows it finds (ovsdbapp's pattern)."""

    def apply(self, tx: Tx) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__


@dataclass(frozen=True)
class EnsureBridge(Command):
    """Create the bridge, or bring the listed settings of an existing one to these values."""

    name: str
    datapath_type: str = "system"
    fail_mode: str = "secure"
    protocols: tuple[str, ...] = ("OpenFlow10", "OpenFlow13", "OpenFlow15")
    external_ids: Mapping[str, str] | None = None
    other_config: Mapping[str, str] | None = None

    def apply(self, tx: Tx) -> None:
        br = tx.bridge(self.name)
        if br is None:
            iface = tx.insert("Interface", self.name)
            iface.type = "internal"
            port = tx.insert("Port", self.name)
            port.interfaces = [iface]
            br = tx.insert("Bridge", self.name)
            br.ports = [port]
            br.datapath_type = self.datapath_type
            br.fail_mode = self.fail_mode
            br.protocols = list(self.protocols)
            br.external_ids = dict(self.external_ids or {})
            br.other_config = dict(self.other_config or {})
            tx.db._root().addvalue("bridges", br.uuid)
            return
        if br.datapath_type != self.datapath_type:
            br.datapath_type = self.datapath_type
        if _unwrap(br.fail_mode) != self.fail_mode:
            br.fail_mode = self.fail_mode
        if set(br.protocols) != set(self.protocols):
            br.protocols = list(self.protocols)
        _merge_map(br, "external_ids", self.external_ids)
        _merge_map(br, "other_config", self.other_config)

    def describe(self) -> str:
        return f"ensure bridge {self.name}"


@dataclass(frozen=True)
class DeleteBridge(Command):
    name: str

    def apply(self, tx: Tx) -> None:
        br = tx.bridge(self.name)
        if br is not None:
            tx.db._root().delvalue("bridges", br.uuid)
            br.delete()

    def describe(self) -> str:
        return f"delete bridge {self.name}"


@dataclass(frozen=True)
class EnsurePort(Command):
    """Add the port (or update it in place): ``type`` is "" for a netdev such as a veth,
    "internal", or a tunnel type; external_ids are merged, never dropped."""

    bridge: str
    name: str
    type: str = ""
    options: Mapping[str, str] | None = None
    external_ids: Mapping[str, str] | None = None
    iface_external_ids: Mapping[str, str] | None = None
    ofport_request: int | None = None
    mtu_request: int | None = None

    def apply(self, tx: Tx) -> None:
        options = self.options
        if self.type in TUNNEL_TYPES and options is None:
            options = {"remote_ip": "flow", "key": "flow"}
        br = tx.bridge(self.bridge)
        if br is None:
            raise OvsdbError(f"bridge {self.bridge} does not exist")
        port = tx.port(self.name)
        if port is not None and port not in br.ports:
            # Attached to another bridge: move it.
            other = tx.db._bridge_of_port(port)
            if other is not None:
                other.delvalue("ports", port.uuid)
            port.delete()
            port = None
        if port is None:
            iface = tx.insert("Interface", self.name)
            iface.type = self.type
            iface.options = dict(options or {})
            iface.external_ids = dict(self.iface_external_ids or {})
            if self.ofport_request is not None:
                iface.ofport_request = [self.ofport_request]
            if self.mtu_request is not None:
                iface.mtu_request = [self.mtu_request]
            port = tx.insert("Port", self.name)
            port.interfaces = [iface]
            port.external_ids = dict(self.external_ids or {})
            if ("Bridge", self.bridge) in tx.inserted:
                br.ports = [*br.ports, port]
            else:
                br.addvalue("ports", port.uuid)
            return
        iface = port.interfaces[0]
        if iface.type != self.type:
            iface.type = self.type
        if options is not None and dict(iface.options) != dict(options):
            iface.options = dict(options)
        if self.ofport_request is not None and _unwrap(iface.ofport_request) != self.ofport_request:
            iface.ofport_request = [self.ofport_request]
        if self.mtu_request is not None and _unwrap(iface.mtu_request) != self.mtu_request:
            iface.mtu_request = [self.mtu_request]
        _merge_map(port, "external_ids", self.external_ids)
        _merge_map(iface, "external_ids", self.iface_external_ids)

    def describe(self) -> str:
        return f"ensure port {self.name} on {self.bridge}"


@dataclass(frozen=True)
class DeletePort(Command):
    """Remove the port wherever it is (nothing when there is none)."""

    name: str

    def apply(self, tx: Tx) -> None:
        port = tx.db._port(self.name)
        if port is None:
            return
        br = tx.db._bridge_of_port(port)
        if br is not None:
            br.delvalue("ports", port.uuid)
        port.delete()

    def describe(self) -> str:
        return f"delete port {self.name}"


@dataclass(frozen=True)
class SetExternalIds(Command):
    table: str
    name: str
    values: Mapping[str, str | None]

    def apply(self, tx: Tx) -> None:
        row = tx.inserted.get((self.table, self.name)) or tx.db._named(self.table, self.name)
        if row is None:
            raise OvsdbError(f"{self.table} {self.name} does not exist")
        _set_keys(row, "external_ids", self.values)

    def describe(self) -> str:
        return f"set external_ids on {self.table} {self.name}"


@dataclass(frozen=True)
class SetOtherConfig(Command):
    values: Mapping[str, str | None]

    def apply(self, tx: Tx) -> None:
        _set_keys(tx.db._root(), "other_config", self.values)

    def describe(self) -> str:
        return "set other_config"


TELEMETRY_OWNER = "k-vswitch/telemetry"  # external_ids key on the sFlow/IPFIX rows the agent made


def _set_optional(row: Any, column: str, value: int | str | None) -> None:
    if _unwrap(getattr(row, column)) != value:
        setattr(row, column, [] if value is None else [value])


def _exporter(
    tx: Tx,
    table: str,
    bridge: str,
    column: str,
    wanted: Mapping[str, int | str | None] | None,
    targets: tuple[str, ...],
) -> None:
    """Point ``bridge.column`` (sflow/ipfix) at a row holding ``targets`` and ``wanted``; with
    ``wanted`` None, drop a row the agent made (one someone else made is left alone). Rows are not
    roots: one no bridge references is removed by ovsdb itself."""
    br = tx.bridge(bridge)
    if br is None:
        raise OvsdbError(f"bridge {bridge} does not exist")
    # A bridge inserted by this transaction has no columns to read yet, and no exporter.
    row = None if ("Bridge", bridge) in tx.inserted else _unwrap(getattr(br, column))
    if wanted is None:
        if row is not None and TELEMETRY_OWNER in row.external_ids:
            setattr(br, column, [])
        return
    if row is None:  # a new row has no columns to compare yet: write them all
        row = tx.txn.insert(tx.db.idl.tables[table])
        row.targets = list(targets)
        for col, value in wanted.items():
            setattr(row, col, [] if value is None else [value])
        row.external_ids = {TELEMETRY_OWNER: "agent"}
        setattr(br, column, [row])
        return
    if sorted(row.targets) != sorted(targets):
        row.targets = list(targets)
    for col, value in wanted.items():
        _set_optional(row, col, value)
    if row.external_ids.get(TELEMETRY_OWNER) != "agent":
        row.setkey("external_ids", TELEMETRY_OWNER, "agent")


@dataclass(frozen=True)
class SetSflow(Command):
    """sFlow on ``bridge`` to ``targets`` (``IP:port``); ``targets`` empty: no sFlow (ours removed)."""

    bridge: str
    targets: tuple[str, ...] = ()
    sampling: int = 64
    polling: int = 30
    header: int = 128
    agent: str | None = None  # the interface whose address is the sFlow agent address; None: OVS picks

    def apply(self, tx: Tx) -> None:
        wanted: dict[str, int | str | None] | None = None
        if self.targets:
            wanted = {
                "sampling": self.sampling,
                "polling": self.polling,
                "header": self.header,
                "agent": self.agent,
            }
        _exporter(tx, "sFlow", self.bridge, "sflow", wanted, self.targets)

    def describe(self) -> str:
        return f"sFlow on {self.bridge} to {','.join(self.targets) or 'nobody'}"


@dataclass(frozen=True)
class SetIpfix(Command):
    """IPFIX on ``bridge`` to ``targets`` (``IP:port``); ``targets`` empty: no IPFIX (ours removed)."""

    bridge: str
    targets: tuple[str, ...] = ()
    sampling: int = 64
    cache_active_timeout: int = 60
    cache_max_flows: int = 4096
    obs_domain_id: int = 0

    def apply(self, tx: Tx) -> None:
        wanted: dict[str, int | str | None] | None = None
        if self.targets:
            wanted = {
                "sampling": self.sampling,
                "cache_active_timeout": self.cache_active_timeout,
                "cache_max_flows": self.cache_max_flows,
                "obs_domain_id": self.obs_domain_id,
            }
        _exporter(tx, "IPFIX", self.bridge, "ipfix", wanted, self.targets)

    def describe(self) -> str:
        return f"IPFIX on {self.bridge} to {','.join(self.targets) or 'nobody'}"


_reconnects = 0  # sessions of this process that came back after being lost (kvswitch.metrics)


def reconnects() -> int:
    """How many times an ovsdb connection of this process was lost and established again."""
    return _reconnects


class _Idl(ovs.db.idl.Idl):  # type: ignore[misc]
    """The IDL, plus whether its session is up right now (the base class keeps that private)."""

    _was_up = False
    _ever_up = False

    def is_connected(self) -> bool:
        return bool(self._session.is_connected())

    def set_max_backoff(self, ms: int) -> None:
        """Longest wait between reconnection attempts (python-ovs: 1 s doubling up to 8 s; it
        allows no less than 1 s)."""
        self._session.reconnect.set_backoff(1000, ms)

    def run(self) -> Any:
        global _reconnects
        result = super().run()
        up = self.is_connected()
        if up and not self._was_up:
            if self._ever_up:
                _reconnects += 1
            self._ever_up = True
        self._was_up = up
        return result


class Ovsdb:
    """A connected IDL over the tables k-vswitch needs."""

    def __init__(self, remote: str, timeout: float = 10.0) -> None:
        self.remote = remote
        self.timeout = timeout
        helper = _load_schema_helper(remote)
        for table, cols in _COLUMNS.items():
            helper.register_columns(table, cols)
        self.idl = _Idl(remote, helper, leader_only=False)
        # An ovsdb-server restart costs its clients the outage plus at most this: with the default
        # backoff (1, 2, 4, 8 s) a 1.2 s outage left the agent and the CNI server unable to read or
        # write for 4 s after the server was back (CNI ADD/DEL failing meanwhile).
        self.idl.set_max_backoff(RECONNECT_MAX_BACKOFF_MS)
        self._sync(lambda: self.idl.has_ever_connected(), "initial dump")

    def close(self) -> None:
        self.idl.close()

    # --- the poll loop ------------------------------------------------------------------

    def _sync(self, done: Callable[[], bool], what: str, timeout: float | None = None) -> None:
        """Run the IDL until ``done()``; checks right after run(), never only after block()."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        while True:
            self.idl.run()
            if done():
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise OvsdbError(f"ovsdb {self.remote}: timed out waiting for {what}")
            poller = ovs.poller.Poller()
            self.idl.wait(poller)
            poller.timer_wait(int(min(remaining, 0.1) * 1000))
            poller.block()

    def refresh(self) -> None:
        self.idl.run()

    def refresh_checked(self) -> None:
        """refresh(), then raise when the session is down (its rows may be arbitrarily old)."""
        self.idl.run()
        self.idl.run()  # a broken connection is noticed by one run() and dropped by the next
        if not self.is_connected():
            raise OvsdbError(f"cannot connect to ovsdb {self.remote} (connection lost, reconnecting)")

    def port_info_fresh(self, name: str) -> PortInfo | None:
        self.refresh_checked()
        return self.port_info(name)

    def is_connected(self) -> bool:
        """True while the session to ovsdb is up; otherwise the rows may be arbitrarily old."""
        return self.idl.is_connected()

    def transact(self, build: Callable[[ovs.db.idl.Transaction], None], what: str) -> None:
        """Build and commit one transaction, retrying when the IDL says try-again."""
        deadline = time.monotonic() + self.timeout
        while True:
            self.idl.run()
            txn = ovs.db.idl.Transaction(self.idl)
            try:
                build(txn)
            except BaseException:
                txn.abort()  # else the IDL keeps it open and every later run() fails
                raise
            status = txn.commit()
            while status == ovs.db.idl.Transaction.INCOMPLETE:
                poller = ovs.poller.Poller()
                self.idl.run()
                self.idl.wait(poller)
                txn.wait(poller)
                poller.timer_wait(100)
                poller.block()
                status = txn.commit()
                if time.monotonic() > deadline:
                    txn.abort()
                    raise OvsdbError(f"ovsdb {self.remote}: timed out committing {what}")
            if status in (ovs.db.idl.Transaction.SUCCESS, ovs.db.idl.Transaction.UNCHANGED):
                self.idl.run()
                return
            if status == ovs.db.idl.Transaction.TRY_AGAIN and time.monotonic() < deadline:
                self._sync(lambda: True, "resync after try-again")
                continue
            raise OvsdbError(f"ovsdb {self.remote}: {what} failed: {status} {txn.get_error() or ''}".strip())

    # --- lookups --------------------------------------------------------------------------

    def _rows(self, table: str) -> dict[uuidlib.UUID, Any]:
        rows: dict[uuidlib.UUID, Any] = self.idl.tables[table].rows
        return rows

    def _root(self) -> Any:
        return next(iter(self._rows("Open_vSwitch").values()))

    def _bridge(self, name: str) -> Any | None:
        return next((r for r in self._rows("Bridge").values() if r.name == name), None)

    def _port(self, name: str) -> Any | None:
        return next((r for r in self._rows("Port").values() if r.name == name), None)

    def _bridge_of_port(self, port: Any) -> Any | None:
        return next((b for b in self._rows("Bridge").values() if port in b.ports), None)

    def bridge_exists(self, name: str) -> bool:
        return self._bridge(name) is not None

    def list_bridges(self) -> list[str]:
        return sorted(r.name for r in self._rows("Bridge").values())

    def port_info(self, name: str) -> PortInfo | None:
        port = self._port(name)
        return self._info(port) if port is not None else None

    def _info(self, port: Any) -> PortInfo:
        iface = next((i for i in port.interfaces if i.name == port.name), None) or (
            port.interfaces[0] if port.interfaces else None
        )
        bridge = self._bridge_of_port(port)
        ofport = _unwrap(iface.ofport) if iface is not None else None
        return PortInfo(
            name=port.name,
            bridge=bridge.name if bridge is not None else None,
            type=iface.type if iface is not None else "",
            ofport=ofport if ofport is not None and ofport > 0 else None,
            external_ids=dict(port.external_ids),
            iface_external_ids=dict(iface.external_ids) if iface is not None else {},
            options=dict(iface.options) if iface is not None else {},
            error=_unwrap(iface.error) if iface is not None else None,
        )

    def find_ports(self, bridge: str | None = None, **external_ids: str) -> list[PortInfo]:
        """Ports whose Port or Interface external_ids contain every given key=value."""
        found = []
        for port in self._rows("Port").values():
            info = self._info(port)
            if bridge is not None and info.bridge != bridge:
                continue
            merged = {**info.iface_external_ids, **info.external_ids}
            if all(merged.get(k) == v for k, v in external_ids.items()):
                found.append(info)
        return sorted(found, key=lambda p: p.name)

    def get_external_ids(self, table: str, name: str) -> dict[str, str]:
        row = self._named(table, name)
        return dict(row.external_ids) if row is not None else {}

    def get_other_config(self) -> dict[str, str]:
        return dict(self._root().other_config)

    def _named(self, table: str, name: str) -> Any | None:
        if table == "Open_vSwitch":
            return self._root()
        return next((r for r in self._rows(table).values() if r.name == name), None)

    # --- ensure-style writes: each a command; several commit as one transaction -------------

    def execute(self, *commands: Command, what: str | None = None) -> None:
        """Commit ``commands`` in one transaction: all of them take effect, or none."""
        if not commands:
            return

        def build(txn: ovs.db.idl.Transaction) -> None:
            tx = Tx(self, txn)
            for command in commands:
                command.apply(tx)

        self.transact(build, what or "; ".join(c.describe() for c in commands))

    def ensure_bridge(self, name: str, **settings: Any) -> None:
        self.execute(EnsureBridge(name, **settings))

    def delete_bridge(self, name: str) -> None:
        self.execute(DeleteBridge(name))

    def ensure_port(self, bridge: str, name: str, type: str = "", **settings: Any) -> None:
        self.execute(EnsurePort(bridge, name, type, **settings))

    def delete_port(self, name: str) -> bool:
        """Remove the port wherever it is; False when there was none (idempotent)."""
        existed = self._port(name) is not None
        self.execute(DeletePort(name))
        return existed

    def set_external_ids(self, table: str, name: str, values: Mapping[str, str | None]) -> None:
        """Set (or with None remove) keys of a Bridge/Port/Interface/Open_vSwitch row."""
        self.execute(SetExternalIds(table, name, dict(values)))

    def set_other_config(self, values: Mapping[str, str | None]) -> None:
        """Open_vSwitch other_config, e.g. ``flow-restore-wait``."""
        self.execute(SetOtherConfig(dict(values)))

    def wait_change(self, seqno: int, timeout: float) -> int:
        """Block until the IDL's contents differ from ``seqno`` (or ``timeout``); the new seqno."""
        with contextlib.suppress(OvsdbError):
            self._sync(lambda: self.idl.change_seqno != seqno, "a change", timeout)
        return int(self.idl.change_seqno)

    def wait_ofport(self, name: str, timeout: float = 5.0) -> int:
        """Block until vswitchd assigned the port an OpenFlow number; raise with its error if it failed."""
        result: list[int] = []

        def done() -> bool:
            info = self.port_info(name)
            if info is None:
                return False
            if info.error:
                raise OvsdbError(f"port {name}: {info.error}")
            if info.ofport is not None:
                result.append(info.ofport)
                return True
            return False

        self._sync(done, f"ofport of {name}", timeout)
        return result[0]


class AsyncOvsdb:
    """:class:`Ovsdb` for asyncio: every call runs on one dedicated thread, so the event loop never
    blocks and the IDL is never shared between threads. Callers use these methods only."""

    def __init__(self, db: Ovsdb, executor: ThreadPoolExecutor) -> None:
        self._db = db
        self._executor = executor

    @classmethod
    async def connect(cls, remote: str, timeout: float = 10.0) -> AsyncOvsdb:
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ovsdb")
        loop = asyncio.get_running_loop()
        db = await loop.run_in_executor(executor, functools.partial(Ovsdb, remote, timeout))
        return cls(db, executor)

    @property
    def remote(self) -> str:
        return self._db.remote

    async def _run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    async def close(self) -> None:
        await self._run(self._db.close)
        self._executor.shutdown(wait=True)

    # --- writes ---------------------------------------------------------------------------

    async def execute(self, *commands: Command, what: str | None = None) -> None:
        """Commit ``commands`` as one transaction."""
        await self._run(self._db.execute, *commands, what=what)

    @contextlib.asynccontextmanager
    async def transaction(self, what: str | None = None) -> AsyncIterator[list[Command]]:
        """Collect commands; they commit together when the block ends without an error."""
        commands: list[Command] = []
        yield commands
        await self.execute(*commands, what=what)

    async def ensure_bridge(self, name: str, **settings: Any) -> None:
        await self.execute(EnsureBridge(name, **settings))

    async def ensure_port(self, bridge: str, name: str, type: str = "", **settings: Any) -> None:
        await self.execute(EnsurePort(bridge, name, type, **settings))

    async def delete_port(self, name: str) -> bool:
        return await self._run(self._db.delete_port, name)

    async def set_external_ids(self, table: str, name: str, values: Mapping[str, str | None]) -> None:
        await self.execute(SetExternalIds(table, name, dict(values)))

    async def set_other_config(self, values: Mapping[str, str | None]) -> None:
        await self.execute(SetOtherConfig(dict(values)))

    # --- reads and waits ----------------------------------------------------------------------

    async def refresh(self, *, connected: bool = False) -> None:
        """Take in the updates ovsdb already sent. With ``connected``, refuse rows that may be stale:
        a connection whose server went away still holds the old rows (the IDL reconnects by itself)."""
        await self._run(self._db.refresh_checked if connected else self._db.refresh)

    async def bridge_exists(self, name: str) -> bool:
        await self.refresh(connected=True)
        return await self._run(self._db.bridge_exists, name)

    async def port_info(self, name: str, *, refresh: bool = True) -> PortInfo | None:
        return await self._run(self._db.port_info_fresh if refresh else self._db.port_info, name)

    async def find_ports(
        self,
        bridge: str | None = None,
        external_ids: Mapping[str, str] | None = None,
        *,
        refresh: bool = True,
    ) -> list[PortInfo]:
        """Ports on ``bridge`` (any, when None) whose external_ids contain ``external_ids``."""
        if refresh:
            await self.refresh(connected=True)
        return await self._run(self._db.find_ports, bridge, **(external_ids or {}))

    async def get_external_ids(self, table: str, name: str) -> dict[str, str]:
        return await self._run(self._db.get_external_ids, table, name)

    async def get_other_config(self) -> dict[str, str]:
        return await self._run(self._db.get_other_config)

    async def wait_change(self, seqno: int, timeout: float) -> int:
        return await self._run(self._db.wait_change, seqno, timeout)

    async def wait_ofport(self, name: str, timeout: float = 5.0) -> int:
        return await self._run(self._db.wait_ofport, name, timeout)
