"""The CNI commands themselves; the same code runs inside the CNI server and in-process.

An attachment is a veth pair (pod end named CNI_IFNAME inside CNI_NETNS, host end named from a
hash of network, container id and ifname so DEL needs no state), an OVS port on the bridge whose
external_ids say whose it is, and an IPAM reservation. ADD runs independent steps concurrently
(IPAM exec alongside the veth; the OVS port alongside the pod's addresses) and undoes every step
that succeeded when any fails, so a failed ADD leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

from kvswitch.cni import netlink
from kvswitch.cni.client import Reply
from kvswitch.cni.config import CniEnv, NetConf, Request, decode_stdin, parse_env, parse_request
from kvswitch.cni.contract import (
    ID_CONTAINER,
    ID_IFNAME,
    ID_IP,
    ID_MAC,
    ID_NETNS,
    ID_NETWORK,
    ID_OWNER,
    ID_POD_NAME,
    ID_POD_NAMESPACE,
    ID_POD_UID,
    LINK_ALIAS_PREFIX,
    PLUGIN_NAME,
    host_ifname,
    link_alias,
)
from kvswitch.cni.ipam import HOST_LOCAL, IpamDelegate, find_plugin, host_local_allocations
from kvswitch.cni.result import Dns, Interface, IPConfig, Result, Route
from kvswitch.cni.spec import (
    FAILPOINT_ENV,
    SUPPORTED_VERSIONS,
    CniError,
    Code,
    at_least,
    version_reply,
)
from kvswitch.kernel.rtnl import Rtnl
from kvswitch.ovs.ovsdb import AsyncOvsdb, OvsdbError, PortInfo

log = logging.getLogger(__name__)
T = TypeVar("T")

OVSDB_TIMEOUT = 5.0

Key = tuple[str, str, str]  # (network, container id, ifname): the spec's attachment key
# Called by ADD once the port is plugged and numbered, before the result goes back: the agent
# hosting the server installs the pod's flows there, so the pod works when ADD returns.
AttachHook = Callable[[PortInfo], Awaitable[None]]


def failpoint(env: CniEnv, stage: str) -> None:
    """Fault injection for tests: fail right after ``stage`` when the caller asks for it."""
    if env.raw.get(FAILPOINT_ENV) == stage:
        raise CniError(Code.INJECTED_FAULT, f"injected fault after {stage}", f"{FAILPOINT_ENV}={stage}")


async def gather_all(*aws: Awaitable[Any]) -> list[Any]:
    """Run concurrently, let every one finish, then raise the first failure (in argument order)."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


class Rollback:
    """Undo steps pushed as work succeeds; run in reverse order unless committed."""

    def __init__(self) -> None:
        self._steps: list[tuple[str, Callable[[], Awaitable[object]]]] = []

    def push(self, what: str, undo: Callable[[], Awaitable[object]]) -> None:
        self._steps.append((what, undo))

    def commit(self) -> None:
        self._steps.clear()

    async def run(self) -> list[str]:
        failures = []
        while self._steps:
            what, undo = self._steps.pop()
            try:
                await undo()
            except Exception as exc:
                log.warning("rollback of %s failed: %s", what, exc)
                failures.append(f"{what}: {exc}")
        return failures


def ovs_error(what: str, exc: OvsdbError) -> CniError:
    text = str(exc)
    if "timed out" in text or "cannot connect" in text or "does not exist" in text:
        return CniError(Code.TRY_AGAIN_LATER, what, text)
    return CniError(Code.OVS_FAILED, what, text)


class CniPlugin:
    """Serves CNI calls. Long-lived in the server (ovsdb connections cached), or one call in-process.

    ``host_netns`` is the namespace (path, or name under /var/run/netns) whose interfaces are the
    node's (None: this process's), so the server may live outside the node's namespace.
    """

    def __init__(
        self,
        *,
        host_netns: str | None = None,
        via_server: bool = False,
        defer_veth_delete: bool | None = None,
        attached: AttachHook | None = None,
    ) -> None:
        self.via_server = via_server
        self.attached = attached
        # The kernel needs ~25 ms (an RCU grace period) to delete a veth. A long-lived server
        # finishes that after answering DEL: the port and the IP are gone by then, and any later
        # call on the same attachment (or an ADD that finds the pod's ifname still taken) waits.
        self.defer_veth_delete = via_server if defer_veth_delete is None else defer_veth_delete
        self.ipam = IpamDelegate()
        if host_netns and not host_netns.startswith("/"):
            host_netns = f"/var/run/netns/{host_netns}"  # a name as `ip netns` knows it
        self._host_ns = netlink.Netns(host_netns) if host_netns else None
        self._ovsdb: dict[str, AsyncOvsdb] = {}
        self._ovsdb_lock = asyncio.Lock()
        self._locks: dict[Key, tuple[asyncio.Lock, int]] = {}
        self._background: set[asyncio.Task[None]] = set()

    async def drain(self) -> None:
        """Wait for deferred veth deletions."""
        while self._background:
            await asyncio.wait(set(self._background))

    async def close(self) -> None:
        await self.drain()
        for db in self._ovsdb.values():
            with contextlib.suppress(Exception):
                await db.close()
        self._ovsdb.clear()
        if self._host_ns is not None:
            self._host_ns.close()

    # --- entry point ----------------------------------------------------------------------------

    async def handle(self, environ: Mapping[str, str], stdin: bytes) -> Reply:
        """One CNI call: the bytes to print and the exit code, errors as CNI error JSON."""
        version: str | None = None
        try:
            env = parse_env(dict(environ))
            if env.command == "VERSION":
                return Reply(0, version_reply(stdin).encode() + b"\n")
            with contextlib.suppress(CniError):
                given = decode_stdin(stdin).get("cniVersion")
                version = given if given in SUPPORTED_VERSIONS else None
            req = parse_request(dict(environ), stdin)
            command: dict[str, Callable[[Request], Awaitable[bytes]]] = {
                "ADD": self.add,
                "DEL": self.delete,
                "CHECK": self.check,
                "STATUS": self.status,
                "GC": self.gc,
            }
            return Reply(0, await command[env.command](req))
        except CniError as err:
            log.info("%s failed: %s", environ.get("CNI_COMMAND"), err)
            return Reply(1, err.to_json(version).encode() + b"\n")
        except Exception as exc:
            log.exception("internal error")
            internal = CniError(Code.INTERNAL, "k-vswitch-cni internal error", repr(exc))
            return Reply(1, internal.to_json(version).encode() + b"\n")

    # --- shared helpers -------------------------------------------------------------------------

    async def ovsdb(self, remote: str) -> AsyncOvsdb:
        """The cached connection to ``remote``; CNI error 11 when ovsdb does not answer."""
        async with self._ovsdb_lock:
            db = self._ovsdb.get(remote)
            if db is None:
                if remote.startswith("unix:") and not os.path.exists(remote[5:]):
                    raise CniError(Code.TRY_AGAIN_LATER, "ovsdb is not reachable", f"no socket {remote[5:]}")
                try:
                    db = await AsyncOvsdb.connect(remote, timeout=OVSDB_TIMEOUT)
                except (OvsdbError, OSError) as exc:
                    raise CniError(Code.TRY_AGAIN_LATER, "ovsdb is not reachable", str(exc)) from None
                self._ovsdb[remote] = db
            return db

    async def ovs_call(self, what: str, call: Awaitable[T]) -> T:
        """An ovsdb call whose failure becomes the CNI error for ``what``."""
        try:
            return await call
        except OvsdbError as exc:
            raise ovs_error(what, exc) from None

    def host_rtnl(self) -> Rtnl:
        return netlink.open_rtnl(self._host_ns.fd if self._host_ns else None)

    def _hold(self, key: Key) -> asyncio.Lock:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        return lock

    def _release(self, key: Key) -> None:
        lock, users = self._locks[key]
        if users <= 1:
            del self._locks[key]
        else:
            self._locks[key] = (lock, users - 1)

    @contextlib.asynccontextmanager
    async def attachment(self, key: Key, held: bool = False) -> AsyncIterator[None]:
        """Serialise calls on one attachment (a retried DEL racing its ADD, GC racing either).

        ``held``: the caller already counted itself in with :meth:`_hold` (a deferred task).
        """
        lock = self._locks[key][0] if held else self._hold(key)
        try:
            async with lock:
                yield
        finally:
            self._release(key)

    def busy(self, key: Key) -> bool:
        return key in self._locks

    def pod_mtu(self, conf: NetConf, host: Rtnl) -> int:
        if conf.mtu is not None:
            return conf.mtu
        underlay = netlink.route_device_mtu(host, conf.underlayInterface) or 1500
        mtu = underlay - conf.overhead
        if mtu < 68:
            raise CniError(Code.INVALID_CONFIG, f"underlay MTU {underlay} leaves no room for the overlay")
        return mtu

    async def ipam_del(self, req: Request, container_id: str, ifname: str) -> None:
        plugin = find_plugin(req.conf.ipam.type, req.env.path)
        env = {**req.env.raw, "CNI_CONTAINERID": container_id, "CNI_IFNAME": ifname}
        if container_id != req.env.container_id:
            env["CNI_NETNS"] = ""
        await self.ipam.call("DEL", plugin, env, req.raw, req.conf.cniVersion)

    async def unplug(self, db: AsyncOvsdb, host: Rtnl, host_if: str) -> None:
        await self.ovs_call(f"cannot delete OVS port {host_if}", db.delete_port(host_if))
        await asyncio.to_thread(netlink.delete_link, host, host_if)

    # --- ADD ------------------------------------------------------------------------------------

    async def add(self, req: Request) -> bytes:
        env, conf = req.env, req.conf
        prev = Result.parse(conf.prevResult, "prevResult") if conf.prevResult else None
        plugin = find_plugin(conf.ipam.type, env.path)
        with netlink.Netns(env.netns) as pod_ns:
            db = await self.ovsdb(conf.ovsdbSocket)
            if not await self.ovs_call("ovsdb lookup", db.bridge_exists(conf.bridge)):
                raise CniError(
                    Code.TRY_AGAIN_LATER,
                    f"bridge {conf.bridge} does not exist",
                    "the k-vswitch agent creates it; retry once the node is ready",
                )
            key = (conf.name, env.container_id, env.ifname)
            async with self.attachment(key):
                host = self.host_rtnl()
                undo = Rollback()
                try:
                    out = await self._add(req, plugin, pod_ns, db, host, prev, undo)
                except BaseException as exc:
                    failures = await asyncio.shield(undo.run())
                    if isinstance(exc, CniError) and failures:
                        exc.details = (exc.details + "; " if exc.details else "") + (
                            "rollback failed: " + "; ".join(failures)
                        )
                    raise
                finally:
                    host.close()
                undo.commit()
                return out

    async def _add(
        self,
        req: Request,
        plugin: str,
        pod_ns: netlink.Netns,
        db: AsyncOvsdb,
        host: Rtnl,
        prev: Result | None,
        undo: Rollback,
    ) -> bytes:
        env, conf = req.env, req.conf
        host_if = host_ifname(conf.name, env.container_id, env.ifname)
        mtu = self.pod_mtu(conf, host)
        host_mac = netlink.random_mac()
        pod_mac = conf.runtimeConfig.mac if conf.runtimeConfig and conf.runtimeConfig.mac else None
        if pod_mac is None and conf.macMode == "random":
            pod_mac = netlink.random_mac()

        async def allocate() -> Result:
            undo.push("IPAM reservation", lambda: self.ipam_del(req, env.container_id, env.ifname))
            allocated = await self.ipam.add(plugin, env.raw, req.raw, conf.cniVersion)
            failpoint(env, "ipam")
            return allocated

        async def make_veth() -> None:
            args = (host, host_if, env.ifname, pod_ns, mtu, host_mac, pod_mac)
            try:
                await asyncio.to_thread(netlink.create_veth, *args)
            except CniError as err:
                if err.code != Code.INVALID_ENV or not self._background:
                    raise
                await self.drain()  # the name may belong to a veth whose deletion is still running
                await asyncio.to_thread(netlink.create_veth, *args)
            undo.push(f"veth {host_if}", lambda: asyncio.to_thread(netlink.delete_link, host, host_if))
            alias = link_alias(conf.name, env.container_id, env.ifname)
            await asyncio.to_thread(netlink.host_side_up, host, host_if, alias)
            failpoint(env, "veth")

        allocated, _ = await gather_all(allocate(), make_veth())
        assert isinstance(allocated, Result)
        ips = allocated.ips
        if pod_mac is None:
            first = next((ip for ip in ips if ip.address.version == 4), ips[0])
            pod_mac = netlink.mac_from_ip(first.address.ip)
        routes = pod_routes(allocated)
        ids = {
            ID_OWNER: PLUGIN_NAME,
            ID_NETWORK: conf.name,
            ID_CONTAINER: env.container_id,
            ID_IFNAME: env.ifname,
            ID_NETNS: env.netns,
            ID_POD_NAMESPACE: env.pod_namespace,
            ID_POD_NAME: env.pod_name,
            ID_POD_UID: env.pod_uid,
            ID_IP: ",".join(str(ip.address) for ip in ips),
            ID_MAC: pod_mac,
        }

        async def plug() -> int:
            await db.ensure_port(conf.bridge, host_if, external_ids={k: v for k, v in ids.items() if v})
            return await db.wait_ofport(host_if, timeout=conf.portTimeout)

        async def add_port() -> None:
            undo.push(
                f"OVS port {host_if}",
                lambda: self.ovs_call("delete port", db.delete_port(host_if)),
            )
            await self.ovs_call(f"cannot attach {host_if} to {conf.bridge}", plug())
            failpoint(env, "port")

        async def configure() -> None:
            addresses = [ip.address for ip in ips]
            await asyncio.to_thread(netlink.configure_pod, pod_ns, env.ifname, pod_mac, addresses, routes)
            failpoint(env, "pod")

        await gather_all(add_port(), configure())
        if self.attached is not None:
            info = await self.ovs_call("ovsdb lookup", db.port_info(host_if))
            if info is None:
                raise CniError(Code.TRY_AGAIN_LATER, f"OVS port {host_if} vanished during ADD")
            try:
                await self.attached(info)
            except CniError:
                raise
            except Exception as exc:
                raise CniError(Code.OVS_FAILED, "cannot install the pod's flows", str(exc)) from None
            failpoint(env, "flows")
        failpoint(env, "result")

        result = Result(
            interfaces=list(prev.interfaces) if prev else [],
            ips=list(prev.ips) if prev else [],
            routes=list(prev.routes) if prev else [],
            dns=prev.dns if prev and prev.dns else Dns(),
        )
        index = len(result.interfaces) + 1
        result.interfaces += [
            Interface(name=host_if, mac=host_mac),
            Interface(name=env.ifname, mac=pod_mac, sandbox=env.netns, mtu=mtu),
        ]
        result.ips += [IPConfig(ip.address, ip.gateway, index) for ip in ips]
        result.routes += routes
        if not result.dns:
            result.dns = allocated.dns if allocated.dns else _conf_dns(conf)
        log.info("ADD %s %s -> %s on %s", env.container_id, env.ifname, ids[ID_IP], host_if)
        return json.dumps(result.render(conf.cniVersion)).encode() + b"\n"

    # --- DEL ------------------------------------------------------------------------------------

    async def delete(self, req: Request) -> bytes:
        """Release everything of the attachment; missing pieces are fine, so DEL is idempotent."""
        env, conf = req.env, req.conf
        host_if = host_ifname(conf.name, env.container_id, env.ifname)

        async def port() -> None:
            db = await self.ovsdb(conf.ovsdbSocket)
            await self.ovs_call(f"cannot delete OVS port {host_if}", db.delete_port(host_if))

        async def veth() -> None:
            host = self.host_rtnl()
            try:
                await asyncio.to_thread(netlink.delete_link, host, host_if)
            finally:
                host.close()

        key = (conf.name, env.container_id, env.ifname)
        async with self.attachment(key):
            jobs = [self.ipam_del(req, env.container_id, env.ifname), port()]
            if not self.defer_veth_delete:
                jobs.append(veth())
            results = await asyncio.gather(*jobs, return_exceptions=True)
        if self.defer_veth_delete:
            self._hold(key)
            task = asyncio.create_task(self._deferred_delete(key, veth))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        raise_first(results)
        log.info("DEL %s %s (%s)", env.container_id, env.ifname, host_if)
        return b""

    async def _deferred_delete(self, key: Key, delete: Callable[[], Awaitable[None]]) -> None:
        async with self.attachment(key, held=True):
            try:
                await delete()
            except Exception as exc:
                log.warning("deferred deletion of %s failed: %s", key, exc)

    # --- CHECK ----------------------------------------------------------------------------------

    async def check(self, req: Request) -> bytes:
        env, conf = req.env, req.conf
        if not at_least(conf.cniVersion, "0.4.0"):
            raise CniError(Code.INCOMPATIBLE_VERSION, f"cniVersion {conf.cniVersion} does not allow CHECK")
        if conf.prevResult is None:
            raise CniError(
                Code.INVALID_CONFIG, "CHECK needs prevResult", "the runtime must pass the ADD result"
            )
        prev = Result.parse(conf.prevResult, "prevResult")
        host_if = host_ifname(conf.name, env.container_id, env.ifname)
        plugin = find_plugin(conf.ipam.type, env.path)
        with netlink.Netns(env.netns) as pod_ns:
            ours = [
                i
                for i, iface in enumerate(prev.interfaces)
                if iface.name == env.ifname and iface.sandbox == env.netns
            ]
            if not ours:
                raise CniError(
                    Code.CHECK_FAILED, f"prevResult lists no interface {env.ifname} in {env.netns}"
                )
            index = ours[0]
            expected = prev.interfaces[index]

            async def ipam_check() -> None:
                await self.ipam.call("CHECK", plugin, env.raw, req.raw, conf.cniVersion)

            async def host_check() -> list[str]:
                problems = []
                db = await self.ovsdb(conf.ovsdbSocket)
                info = await self.ovs_call("ovsdb lookup", db.port_info(host_if))
                if info is None:
                    problems.append(f"OVS port {host_if} is missing")
                else:
                    if info.bridge != conf.bridge:
                        problems.append(f"OVS port {host_if} is on {info.bridge}, not {conf.bridge}")
                    if info.error or info.ofport is None:
                        problems.append(f"OVS port {host_if} is not working: {info.error or 'no ofport'}")
                    got = (info.external_ids.get(ID_CONTAINER), info.external_ids.get(ID_IFNAME))
                    if got != (env.container_id, env.ifname):
                        problems.append(f"OVS port {host_if} belongs to {got}")
                with self.host_rtnl() as host:
                    exists, up = netlink.link_state(host, host_if)
                if not exists:
                    problems.append(f"host interface {host_if} is missing")
                elif not up:
                    problems.append(f"host interface {host_if} is down")
                return problems

            async def pod_check() -> list[str]:
                state = await asyncio.to_thread(netlink.inspect_pod, pod_ns, env.ifname)
                if state is None:
                    return [f"{env.ifname} is missing in {env.netns}"]
                problems = []
                if expected.mac and state.mac != expected.mac.lower():
                    problems.append(f"{env.ifname} has MAC {state.mac}, expected {expected.mac}")
                if expected.mtu and state.mtu != expected.mtu:
                    problems.append(f"{env.ifname} has MTU {state.mtu}, expected {expected.mtu}")
                if not state.up:
                    problems.append(f"{env.ifname} is down")
                for ip in prev.ips:
                    if ip.interface == index and str(ip.address) not in state.addresses:
                        problems.append(f"{env.ifname} lacks address {ip.address}")
                for route in prev.routes:
                    want = (str(route.dst), str(route.gw) if route.gw else None)
                    if want not in state.routes:
                        problems.append(f"route {route.dst} via {route.gw or 'link'} is missing")
                return problems

            _, host_problems, pod_problems = await gather_all(ipam_check(), host_check(), pod_check())
        problems = pod_problems + host_problems
        if problems:
            raise CniError(
                Code.CHECK_FAILED,
                f"attachment {env.container_id}/{env.ifname} is broken",
                "; ".join(problems),
            )
        return b""

    # --- STATUS ---------------------------------------------------------------------------------

    async def status(self, req: Request) -> bytes:
        """Ready = agent reachable, ovsdb answering, bridge present, IPAM ready (if it can tell)."""
        env, conf = req.env, req.conf
        if not at_least(conf.cniVersion, "1.1.0"):
            raise CniError(Code.INCOMPATIBLE_VERSION, f"cniVersion {conf.cniVersion} does not allow STATUS")
        if conf.serverSocket and not self.via_server:
            raise CniError(
                Code.NOT_AVAILABLE,
                "the k-vswitch agent is not reachable",
                f"no CNI server answers on {conf.serverSocket}",
            )
        try:
            db = await self.ovsdb(conf.ovsdbSocket)
            has_bridge = await self.ovs_call("ovsdb lookup", db.bridge_exists(conf.bridge))
        except CniError as err:
            raise CniError(
                Code.NOT_AVAILABLE, "Open vSwitch is not reachable", err.details or err.msg
            ) from None
        if not has_bridge:
            raise CniError(
                Code.NOT_AVAILABLE_LIMITED,
                f"bridge {conf.bridge} does not exist",
                "no pod can be attached, and pods attached before have lost their ports",
            )
        if env.path:
            try:
                plugin = find_plugin(conf.ipam.type, env.path)
            except CniError as err:
                raise CniError(Code.NOT_AVAILABLE, err.msg, err.details) from None
            if await self.ipam.supports(plugin, env.raw, "1.1.0"):
                await self.ipam.call("STATUS", plugin, env.raw, req.raw, conf.cniVersion)
        return b""

    # --- GC -------------------------------------------------------------------------------------

    async def gc(self, req: Request) -> bytes:
        """Remove ports, veths and IPAM reservations of this network not in the valid list."""
        env, conf = req.env, req.conf
        if not at_least(conf.cniVersion, "1.1.0"):
            raise CniError(Code.INCOMPATIBLE_VERSION, f"cniVersion {conf.cniVersion} does not allow GC")
        attachments = conf.gc_attachments
        if attachments is None:
            raise CniError(Code.INVALID_CONFIG, "GC needs cni.dev/valid-attachments")
        valid = {(a.containerID, a.ifname) for a in attachments}
        stale: set[tuple[str, str]] = set()
        errors: list[BaseException] = []

        def keep(container_id: str, ifname: str) -> bool:
            return (container_id, ifname) in valid or self.busy((conf.name, container_id, ifname))

        db = await self.ovsdb(conf.ovsdbSocket)
        ports = await self.ovs_call(
            "ovsdb lookup", db.find_ports(None, {ID_OWNER: PLUGIN_NAME, ID_NETWORK: conf.name})
        )
        for port in ports:
            cid, ifname = port.external_ids.get(ID_CONTAINER, ""), port.external_ids.get(ID_IFNAME, "")
            if not keep(cid, ifname):
                stale.add((cid, ifname))
        with self.host_rtnl() as host:
            aliases = netlink.links_with_alias(host, f"{LINK_ALIAS_PREFIX} {conf.name} ")
            for alias in aliases.values():
                parts = alias.split(" ")
                if len(parts) == 4 and not keep(parts[2], parts[3]):
                    stale.add((parts[2], parts[3]))
            for cid, ifname in stale:
                try:
                    await self.unplug(db, host, host_ifname(conf.name, cid, ifname))
                except CniError as exc:
                    errors.append(exc)

        plugin = find_plugin(conf.ipam.type, env.path)
        if await self.ipam.supports(plugin, env.raw, "1.1.0"):
            await self.ipam.call("GC", plugin, env.raw, req.raw, conf.cniVersion)
        else:
            if conf.ipam.type == HOST_LOCAL:
                valid_ids = {cid for cid, _ in valid}
                for alloc in host_local_allocations(req.raw, conf.name):
                    if alloc.ifname and not keep(alloc.container_id, alloc.ifname):
                        stale.add((alloc.container_id, alloc.ifname))
                    elif not alloc.ifname and alloc.container_id not in valid_ids:
                        # Written by host-local < 0.8 (no ifname): it releases those by ID alone.
                        stale.add((alloc.container_id, "eth0"))
            results = await asyncio.gather(
                *(self.ipam_del(req, cid, ifname) for cid, ifname in sorted(stale)), return_exceptions=True
            )
            errors += [r for r in results if isinstance(r, BaseException)]
        log.info("GC %s: removed %d stale attachments", conf.name, len(stale))
        raise_first(errors)
        return b""


def raise_first(results: Sequence[Any]) -> None:
    for r in results:
        if isinstance(r, BaseException):
            raise r


def pod_routes(allocated: Result) -> list[Route]:
    """A default route per family via the IPAM gateway, plus the IPAM plugin's own routes."""
    gateways: dict[int, Any] = {}
    for ip in allocated.ips:
        if ip.gateway is not None:
            gateways.setdefault(ip.address.version, ip.gateway)
    routes = [Route(r.dst, r.gw or gateways.get(r.dst.version), r.extras) for r in allocated.routes]
    for family, gw in sorted(gateways.items()):
        if not any(r.dst.prefixlen == 0 and r.dst.version == family for r in routes):
            routes.insert(0, Route(ipaddress.ip_network("0.0.0.0/0" if family == 4 else "::/0"), gw))
    return routes


def _conf_dns(conf: NetConf) -> Dns:
    if conf.dns is None:
        return Dns()
    return Dns(list(conf.dns.nameservers), conf.dns.domain, list(conf.dns.search), list(conf.dns.options))


def run_once(environ: Mapping[str, str], stdin: bytes) -> Reply:
    """The in-process path: one call with fresh connections, closed afterwards."""
    logging.basicConfig(level=logging.WARNING, format="k-vswitch-cni: %(message)s")

    async def go() -> Reply:
        plugin = CniPlugin()
        try:
            return await plugin.handle(environ, stdin)
        finally:
            await plugin.close()

    return asyncio.run(go())
