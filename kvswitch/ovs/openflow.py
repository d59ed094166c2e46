"""The async OpenFlow driver: desired flows per owner, reconciled into a bridge in atomic bundles.

* Per-owner changes diff only that owner's previous desired state against the new one and send
  adds/modifies/deletes in ONE ``ovs-ofctl --bundle`` transaction: all or nothing.
* :meth:`FlowReconciler.resync` compares the whole desired state with a dump of the live table and
  repairs drift: missing or altered flows are re-added, unknown flows deleted, in one bundle.
* Restarts: cookies carry a round number kept in the bridge's external_ids. A new round's flows
  replace the old ones in place (same key); :meth:`finish_startup` then removes whatever the
  previous round left, so traffic never meets an empty table.
* A sentinel flow tells :meth:`watch` when the bridge lost its flows (ovs-vswitchd restarted, the
  bridge was recreated, someone ran del-flows) and triggers a full replay.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import re
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass

from kvswitch import metrics
from kvswitch.ovs.flows import Canonicalizer, Flow, FlowKey, LiveFlow, parse_dump, parse_dump_index
from kvswitch.ovs.groups import Group, parse_group_dump
from kvswitch.ovs.ovsdb import AsyncOvsdb
from kvswitch.ovs.pipeline import (
    ROUND_EXTERNAL_ID,
    SENTINEL_OWNER,
    Category,
    Owner,
    Table,
    cookie_category,
    make_cookie,
)

log = logging.getLogger(__name__)

SENTINEL_FLOW = Flow(table=Table.SENTINEL, priority=0, actions="drop")


class OfctlError(RuntimeError):
    """ovs-ofctl failed; for a rejected bundle, ``flow`` names the offending flow when known."""

    def __init__(self, message: str, flow: str | None = None) -> None:
        super().__init__(message if flow is None else f"{message} (flow: {flow})")
        self.flow = flow


class FlowConflict(ValueError):
    """Two owners claimed the same (table, priority, match)."""


@dataclass(frozen=True)
class Ofctl:
    """Runs ovs-ofctl against one bridge; ``target`` is a bridge name or ``unix:<mgmt socket>``."""

    target: str
    rundir: str | None = None

    def _env(self) -> dict[str, str] | None:
        return {**os.environ, "OVS_RUNDIR": self.rundir} if self.rundir else None

    async def _run(self, *args: str, input: str | None = None) -> str:
        # Output goes to an anonymous file, read in one go: streaming a 100k-flow dump through
        # the event loop in 64 KiB pipe reads costs more than the dump itself.
        with tempfile.TemporaryFile() as out:
            proc = await asyncio.create_subprocess_exec(
                "ovs-ofctl", "-O", "OpenFlow15", *args,
                stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.PIPE,
                env=self._env(),
            )  # fmt: skip
            _, err = await proc.communicate(input.encode() if input is not None else None)
            if proc.returncode != 0:
                raise OfctlError(f"ovs-ofctl {args[0]} {self.target}: {err.decode().strip()}")
            out.seek(0)
            return out.read().decode()

    async def bundle(self, lines: list[str]) -> None:
        """Apply ``add``/``modify_strict``/``delete_strict`` lines atomically."""
        if not lines:
            return
        started = time.perf_counter()
        try:
            await self._run("--bundle", "add-flows", self.target, "-", input="\n".join(lines) + "\n")
        except OfctlError as exc:
            metrics.BUNDLE_ERRORS.inc()
            raise OfctlError(f"bundle of {len(lines)} flow changes rejected, table unchanged: {exc}",
                             _culprit(str(exc), lines)) from None  # fmt: skip
        finally:
            metrics.BUNDLE_DURATION.observe(time.perf_counter() - started)
            metrics.BUNDLE_SIZE.observe(len(lines))

    async def bundle_with_groups(
        self, group_adds: list[str], flow_lines: list[str], group_dels: list[str]
    ) -> None:
        """Groups and flows in one atomic bundle: groups a flow needs first, dead groups last."""
        if not group_adds and not group_dels:
            await self.bundle(flow_lines)
            return
        lines = [*group_adds, *("flow " + line for line in flow_lines), *group_dels]
        started = time.perf_counter()
        try:
            await self._run("bundle", self.target, "-", input="\n".join(lines) + "\n")
        except OfctlError as exc:
            metrics.BUNDLE_ERRORS.inc()
            raise OfctlError(f"bundle of {len(lines)} group/flow changes rejected, table unchanged: {exc}",
                             _culprit(str(exc), lines)) from None  # fmt: skip
        finally:
            metrics.BUNDLE_DURATION.observe(time.perf_counter() - started)
            metrics.BUNDLE_SIZE.observe(len(lines))

    @contextlib.asynccontextmanager
    async def streamed_bundle(self) -> AsyncIterator[Callable[[list[str]], Awaitable[None]]]:
        """A ``bundle`` whose lines are written while they are produced: ovs-ofctl parses them
        as they come (a large change's translation overlaps its parsing) and sends the bundle at
        the end of the block. An exception in the block kills ovs-ofctl before it read the end:
        nothing reaches the switch. No line at all: no ovs-ofctl."""
        stream = _BundleStream(self)
        try:
            yield stream.send
        except BaseException:
            await stream.abort()
            raise
        await stream.finish()

    async def dump_groups(self) -> dict[int, str]:
        return parse_group_dump(await self._run("dump-groups", self.target))

    async def dump(self, *filters: str) -> list[Flow]:
        return parse_dump(await self._run("dump-flows", "--no-stats", self.target, *filters))

    async def dump_index(self, *filters: str) -> dict[FlowKey, LiveFlow]:
        text = await self._run("dump-flows", "--no-stats", self.target, *filters)
        return await asyncio.to_thread(parse_dump_index, text)  # 100k flows parse in ~0.2 s

    async def dump_with_stats(self, *filters: str) -> str:
        """``dump-flows`` text with each flow's counters (n_packets, n_bytes)."""
        return await self._run("dump-flows", self.target, *filters)

    async def ensure_meter(self, meter: int, rate: int, burst: int) -> bool:
        """A drop meter of ``rate`` packets/s (``burst`` packets); True when added or changed."""
        text = await self._run("dump-meters", self.target)
        config = re.search(rf"^meter={meter} (.*)\n(.*)$", text, re.M)
        if (
            config
            and "pktps burst" in config.group(1)
            and f"rate={rate} burst_size={burst}" in config.group(2)
        ):
            return False
        spec = f"meter={meter},pktps,burst,band=type=drop,rate={rate},burst_size={burst}"
        await self._run("mod-meter" if config else "add-meter", self.target, spec)
        return True

    async def reachable(self) -> bool:
        try:
            await self._run("show", self.target)
        except OfctlError:
            return False
        return True


class _BundleStream:
    """Lines written to ``ovs-ofctl bundle <target> -`` in chunks (see Ofctl.streamed_bundle)."""

    CHUNK = 4096  # lines per write

    def __init__(self, ofctl: Ofctl) -> None:
        self.ofctl = ofctl
        self.lines: list[str] = []  # everything sent, for the error's culprit
        self._pending: list[str] = []
        self._proc: asyncio.subprocess.Process | None = None
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed by finish or abort)
        self._started = 0.0

    async def send(self, lines: list[str]) -> None:
        self._pending.extend(lines)
        if len(self._pending) >= self.CHUNK:
            await self._flush()

    async def _flush(self) -> None:
        if not self._pending:
            return
        if self._proc is None:
            self._started = time.perf_counter()
            self._proc = await asyncio.create_subprocess_exec(
                "ovs-ofctl", "-O", "OpenFlow15", "bundle", self.ofctl.target, "-",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=self._stderr,
                env=self.ofctl._env(),
            )  # fmt: skip
        assert self._proc.stdin is not None
        self.lines.extend(self._pending)
        text, self._pending = "\n".join(self._pending) + "\n", []
        try:
            self._proc.stdin.write(text.encode())
            await self._proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass  # ovs-ofctl stopped reading (a line it cannot parse): finish() reports why

    async def finish(self) -> None:
        try:
            await self._flush()
            if self._proc is None:
                return
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                await self._proc.stdin.wait_closed()
            if await self._proc.wait() != 0:
                self._stderr.seek(0)
                err = self._stderr.read().decode().strip()
                metrics.BUNDLE_ERRORS.inc()
                raise OfctlError(
                    f"bundle of {len(self.lines)} group/flow changes rejected, table unchanged: "
                    f"ovs-ofctl bundle {self.ofctl.target}: {err}",
                    _culprit(err, self.lines),
                )
        finally:
            self._stderr.close()
            if self._proc is not None:
                metrics.BUNDLE_DURATION.observe(time.perf_counter() - self._started)
                metrics.BUNDLE_SIZE.observe(len(self.lines))

    async def abort(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()  # before it read the end of its input: it sent nothing
            await self._proc.wait()
        self._stderr.close()


def _culprit(stderr: str, lines: list[str]) -> str | None:
    """The flow ovs-ofctl complained about: by line number (parse errors) or by its echo (OpenFlow errors)."""
    m = re.search(r"-:(\d+):", stderr)
    if m and 0 < int(m.group(1)) <= len(lines):
        return lines[int(m.group(1)) - 1]
    m = re.search(r"Error \w+ for: OFPT_FLOW_MOD [^:]*: (.*)", stderr)
    return m.group(1).strip() if m else None


@dataclass
class ResyncReport:
    added: int = 0
    deleted: int = 0
    unchanged: int = 0

    @property
    def changed(self) -> bool:
        return bool(self.added or self.deleted)


class _Batch:
    """One atomic change of a reconciler, being staged: the lines it needs and, once OVS took it,
    :meth:`commit` into the reconciler's memory. Staging has no side effects, so a conflict
    found half-way leaves everything as it was."""

    def __init__(
        self, rec: FlowReconciler, flow_owners: Collection[Owner], group_owners: Collection[Owner]
    ) -> None:
        self.rec = rec
        self.flow_owners, self.group_owners = set(flow_owners), set(group_owners)
        self.staged: dict[Owner, dict[FlowKey, Flow]] = {}
        self.staged_groups: dict[Owner, dict[int, Group]] = {}
        self.claimed: dict[FlowKey, Owner] = {}
        self.group_dels: list[str] = []
        self.size = 0  # flow and group changes

    def stage_groups(self, owner: Owner, groups: Iterable[Group]) -> list[str]:
        """``owner``'s groups become ``groups``: the add/modify lines (deletes: :attr:`group_dels`)."""
        rec, out = self.rec, []
        new_groups = self.staged_groups[owner] = {g.group_id: g for g in groups}
        old_groups = rec._groups.get(owner, {})
        for gid, group in new_groups.items():
            holder = rec._group_owner.get(gid)
            if holder is not None and holder != owner and holder not in self.group_owners:
                raise FlowConflict(f"{owner} and {holder} both claim group {gid}")
            before = old_groups.get(gid)
            if before is None:
                # add_or_mod: after a restart the previous round's group may hold this id
                out.append("group add_or_mod " + group.render())
            elif before != group:
                out.append("group modify " + group.render())
        dels = [f"group delete group_id={gid}" for gid in old_groups if gid not in new_groups]
        self.group_dels += dels
        self.size += len(out) + len(dels)
        return out

    def stage_flows(self, owner: Owner, flows: Iterable[Flow]) -> list[str]:
        """``owner``'s flows become ``flows``: the add/modify lines (deletes: :meth:`deletes`)."""
        rec, claimed = self.rec, self.claimed
        new = self.staged[owner] = {f.key: f for f in flows}
        for key in new:
            holder = rec._key_owner.get(key)
            if holder is not None and holder != owner and holder not in self.flow_owners:
                raise FlowConflict(f"{owner} and {holder} both claim flow {key}")
            if claimed.setdefault(key, owner) != owner:
                raise FlowConflict(f"{owner} and {claimed[key]} both claim flow {key}")
        old = rec._desired.get(owner, {})
        cookie = rec.cookie(owner)
        out = []
        for key, flow in new.items():
            prev = old.get(key)
            if prev is None:
                out.append("add " + flow.render(cookie))
            elif prev.actions != flow.actions:
                out.append("modify_strict " + flow.render(cookie))
        self.size += len(out)
        return out

    def deletes(self) -> list[str]:
        """The staged owners' flows that are gone (a key that moved to another staged owner is
        replaced by its add, not deleted)."""
        out = [
            "delete_strict " + f.spec()
            for owner in self.staged
            for k, f in self.rec._desired.get(owner, {}).items()
            if k not in self.claimed
        ]
        self.size += len(out)
        return out

    def commit(self) -> None:
        rec = self.rec
        for owner, new_groups in self.staged_groups.items():
            for gid in rec._groups.get(owner, {}):
                if rec._group_owner.get(gid) == owner:
                    del rec._group_owner[gid]
            for gid in new_groups:
                rec._group_owner[gid] = owner
            if new_groups:
                rec._groups[owner] = new_groups
            else:
                rec._groups.pop(owner, None)
        counts: dict[tuple[int, Category], int] = {}
        for owner, new in self.staged.items():
            rec._count(owner, rec._desired.get(owner, {}), new, counts)
            for key in rec._desired.get(owner, {}):
                if rec._key_owner.get(key) == owner:
                    del rec._key_owner[key]
            for key in new:
                rec._key_owner[key] = owner
            if new:
                rec._desired[owner] = new
            else:
                rec._desired.pop(owner, None)
        rec._publish_counts(counts)


class FlowReconciler:
    """Keeps a bridge's flow table equal to the desired flows of all owners."""

    def __init__(self, ofctl: Ofctl, round_: int = 1) -> None:
        self.ofctl = ofctl
        self.round = round_
        self._desired: dict[Owner, dict[FlowKey, Flow]] = {}
        self._groups: dict[Owner, dict[int, Group]] = {}  # select groups (the service proxy's)
        self._group_owner: dict[int, Owner] = {}
        self._key_owner: dict[FlowKey, Owner] = {}
        self._cookies: dict[Owner, int] = {}
        self._canon = Canonicalizer()
        self._lock = asyncio.Lock()
        self.replays = 0
        self._flow_counts: dict[tuple[int, Category], int] = {}  # desired flows by (table, category)
        self._owner_tables: dict[Owner, collections.Counter[int]] = {}  # each owner's flows by table

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self, ovsdb: AsyncOvsdb | None, bridge: str) -> int:
        """Begin a new round (previous + 1, stored on the bridge) and install the sentinel."""
        if ovsdb is not None:
            ids = await ovsdb.get_external_ids("Bridge", bridge)
            previous = int(ids.get(ROUND_EXTERNAL_ID, "0") or 0)
            self.round = previous % 0xFFFF + 1
            await ovsdb.set_external_ids("Bridge", bridge, {ROUND_EXTERNAL_ID: str(self.round)})
        self._cookies.clear()
        await self.set_flows(SENTINEL_OWNER, [SENTINEL_FLOW])
        return self.round

    async def finish_startup(self, ovsdb: AsyncOvsdb | None = None) -> ResyncReport:
        """All owners are known: remove what earlier rounds left, then let vswitchd forward."""
        report = await self.resync()
        if ovsdb is not None:
            await ovsdb.set_other_config({"flow-restore-wait": None})
        return report

    def cookie(self, owner: Owner) -> int:
        c = self._cookies.get(owner)
        if c is None:
            c = self._cookies[owner] = make_cookie(self.round, owner)
        return c

    def canonical(self, flows: Iterable[Flow]) -> set[tuple[int, int, str, str]]:
        """(table, priority, match, actions) of ``flows`` as OVS prints them (blocking: may ask
        ovs-ofctl; call from a thread)."""
        flows = list(flows)
        canon = self._canon.canonical(flows)
        out = set()
        for f in flows:
            match, actions = canon.get((f.table, f.priority, f.match, f.actions), (f.match, f.actions))
            out.add((f.table, f.priority, match, actions))
        return out

    @property
    def owners(self) -> list[Owner]:
        return list(self._desired)

    def desired(self, owner: Owner | None = None) -> list[Flow]:
        if owner is not None:
            return list(self._desired.get(owner, {}).values())
        return [f for flows in self._desired.values() for f in flows.values()]

    # --- incremental ----------------------------------------------------------------------

    async def set_flows(self, owner: Owner, flows: Iterable[Flow]) -> int:
        """Make ``owner``'s flows exactly ``flows``; returns the number of flow changes sent."""
        return await self.set_many({owner: flows})

    async def delete_owner(self, owner: Owner) -> int:
        return await self.set_many({owner: ()})

    def desired_groups(self, owner: Owner | None = None) -> list[Group]:
        if owner is not None:
            return list(self._groups.get(owner, {}).values())
        return [g for groups in self._groups.values() for g in groups.values()]

    async def set_many(
        self,
        changes: Mapping[Owner, Iterable[Flow]],
        groups: Mapping[Owner, Iterable[Group]] | None = None,
    ) -> int:
        """Several owners in one atomic bundle; memory is updated only if OVS accepted it.
        ``groups`` replaces the groups of the owners it names (their flows may use them)."""
        groups = groups or {}
        async with self._lock:
            batch = _Batch(self, changes.keys(), groups.keys())
            group_adds = [line for owner, gs in groups.items() for line in batch.stage_groups(owner, gs)]
            lines = [line for owner, fs in changes.items() for line in batch.stage_flows(owner, fs)]
            lines += batch.deletes()
            await self.ofctl.bundle_with_groups(group_adds, lines, batch.group_dels)
            batch.commit()
        if batch.size:
            await self.after_change()
        return batch.size

    async def set_streamed(
        self, owners: Collection[Owner], produce: Callable[[Owner], tuple[Iterable[Flow], Iterable[Group]]]
    ) -> int:
        """Like :meth:`set_many` for every owner in ``owners`` (flows and groups), each produced
        by ``produce`` only when its turn comes and written to ovs-ofctl at once: for a large
        batch (a full sync of 10k Services) the production overlaps ovs-ofctl's parsing. Still
        one atomic bundle; an error on the way (a conflict, ``produce`` raising) sends nothing."""
        async with self._lock:
            batch = _Batch(self, owners, owners)
            async with self.ofctl.streamed_bundle() as send:
                for owner in owners:
                    flows, groups = produce(owner)
                    group_lines = batch.stage_groups(owner, groups)
                    await send([*group_lines, *("flow " + line for line in batch.stage_flows(owner, flows))])
                await send([*("flow " + line for line in batch.deletes()), *batch.group_dels])
            batch.commit()
        if batch.size:
            await self.after_change()
        return batch.size

    async def after_change(self) -> None:
        """Called (outside the lock) after a change reached the bridge; for subclasses."""

    def _count(
        self,
        owner: Owner,
        old: Mapping[FlowKey, Flow],
        new: Mapping[FlowKey, Flow],
        touched: dict[tuple[int, Category], int],
    ) -> None:
        """Keep the flows-per-table counts (and the pod count) in step with one owner's change;
        ``touched`` collects the (table, category) counts to publish (once per batch: a full sync
        changes 10k owners)."""
        if bool(old) != bool(new) and owner.category == Category.POD:
            metrics.PODS.inc(1 if new else -1)
        before = self._owner_tables.pop(owner, collections.Counter())
        after = collections.Counter(table for table, _, _ in new)
        if after:
            self._owner_tables[owner] = after
        for table in before.keys() | after.keys():
            key = (table, owner.category)
            touched[key] = self._flow_counts[key] = (
                self._flow_counts.get(key, 0) + after[table] - before[table]
            )

    @staticmethod
    def _publish_counts(counts: Mapping[tuple[int, Category], int]) -> None:
        for (table, category), n in counts.items():
            name = Table(table).name if table in Table._value2member_map_ else str(table)
            metrics.FLOWS.labels(table=name, owner=category.name.lower()).set(n)

    # --- full resync ----------------------------------------------------------------------

    async def resync(self) -> ResyncReport:
        """Compare every desired flow with the live table; fix what differs in one bundle."""
        async with self._lock:
            live = await self.ofctl.dump_index()
            live_groups = await self.ofctl.dump_groups()
            # Comparing a large table and asking ovs-ofctl for canonical text both take long: in a
            # worker thread, so the event loop (the agent's API events and CNI calls) keeps running.
            # The lock keeps the desired state still meanwhile.
            lines, report = await asyncio.to_thread(self._repairs, live)
            group_adds, group_dels = self._group_repairs(live_groups, report)
            await self.ofctl.bundle_with_groups(group_adds, lines, group_dels)
            metrics.RESYNCS.labels(result="repaired" if report.changed else "clean").inc()
            return report

    def _group_repairs(self, live: Mapping[int, str], report: ResyncReport) -> tuple[list[str], list[str]]:
        adds: list[str] = []
        desired = {g.group_id: g for groups in self._groups.values() for g in groups.values()}
        for gid, group in desired.items():
            text = group.render()
            if live.get(gid) == text:
                report.unchanged += 1
            else:
                adds.append("group add_or_mod " + text)
                report.added += 1
        dels = [f"group delete group_id={gid}" for gid in live if gid not in desired]
        report.deleted += len(dels)
        return adds, dels

    def _repairs(self, live: Mapping[FlowKey, LiveFlow]) -> tuple[list[str], ResyncReport]:
        """The bundle lines that turn ``live`` into the desired state (blocking: see resync)."""
        report = ResyncReport()
        seen: set[FlowKey] = set()
        unresolved: list[tuple[Flow, int]] = []
        for owner, flows in self._desired.items():
            cookie = self.cookie(owner)
            for key, flow in flows.items():
                if live.get(key) == (cookie, flow.actions):
                    seen.add(key)
                else:
                    unresolved.append((flow, cookie))
        report.unchanged = len(seen)
        lines: list[str] = []
        if unresolved:
            # Authored text differs from OVS's rendering, or the flow really is missing/changed.
            canon = self._canon.canonical(f for f, _ in unresolved)
            for flow, cookie in unresolved:
                match, actions = canon[(flow.table, flow.priority, flow.match, flow.actions)]
                ckey = (flow.table, flow.priority, match)
                seen.add(ckey)
                if live.get(ckey) == (cookie, actions):
                    report.unchanged += 1
                else:
                    lines.append("add " + flow.render(cookie))
                    report.added += 1
        for key in live.keys() - seen:
            if cookie_category(live[key][0]) == Category.LEARNED:
                continue  # written by OVS's learn action (session affinity), expires by itself
            table, priority, match = key
            lines.append(f"delete_strict table={table},priority={priority}{',' + match if match else ''}")
            report.deleted += 1
        return lines, report

    # --- watchdog -------------------------------------------------------------------------

    async def sentinel_present(self) -> bool:
        try:
            flows = await self.ofctl.dump(f"table={int(Table.SENTINEL)}")
        except OfctlError:
            return False
        cookie = self.cookie(SENTINEL_OWNER)
        return any(f.cookie == cookie for f in flows)

    async def watch(self, check_interval: float = 0.2, resync_interval: float = 60.0) -> None:
        """Replay everything when the sentinel vanishes; full resync every ``resync_interval``."""
        loop = asyncio.get_running_loop()
        next_resync = loop.time() + resync_interval
        while True:
            await asyncio.sleep(check_interval)
            try:
                if not await self.sentinel_present():
                    if not await self.ofctl.reachable():
                        continue  # vswitchd is down; try again on the next tick
                    log.warning("bridge %s lost its flows; replaying", self.ofctl.target)
                    await self.resync()
                    self.replays += 1
                    metrics.REPLAYS.inc()
                    next_resync = loop.time() + resync_interval
                elif loop.time() >= next_resync:
                    report = await self.resync()
                    if report.changed:
                        log.warning("resync repaired drift on %s: %s", self.ofctl.target, report)
                    next_resync = loop.time() + resync_interval
            except OfctlError as exc:
                log.warning("flow watchdog on %s: %s", self.ofctl.target, exc)

    @contextlib.asynccontextmanager
    async def watching(
        self, check_interval: float = 0.2, resync_interval: float = 60.0
    ) -> AsyncIterator[FlowReconciler]:
        task = asyncio.create_task(self.watch(check_interval, resync_interval))
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
