"""kvswitch.ovs against a real ovsdb-server/ovs-vswitchd: ovsdb calls, flow model, reconciler."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import pytest
from kvswitch_testbed import Node, Pod, TestBed
from kvswitch_testbed.netns import arun, run

from kvswitch.ovs.flows import Canonicalizer, Flow, parse_dump, parse_dump_index
from kvswitch.ovs.openflow import SENTINEL_FLOW, FlowConflict, FlowReconciler, Ofctl, OfctlError
from kvswitch.ovs.ovsdb import AsyncOvsdb, Ovsdb, OvsdbError
from kvswitch.ovs.pipeline import (
    ROUND_EXTERNAL_ID,
    Category,
    Owner,
    cookie_category,
    cookie_round,
    make_cookie,
)

BR = "k-vswitch0"
A = Owner(Category.TEST, "a")
B = Owner(Category.TEST, "b")


@dataclass
class Switch:
    node: Node
    db: Ovsdb
    ofctl: Ofctl
    a: Pod
    b: Pod
    port_a: int
    port_b: int

    def raw_dump(self) -> str:
        return self.node.ovs.ofctl("dump-flows", "--no-stats", BR).stdout

    def stats(self) -> dict[str, int]:
        """n_packets per flow (keyed by match+actions), to see which flows were touched."""
        out = {}
        for line in self.node.ovs.ofctl("dump-flows", BR).stdout.splitlines():
            m = re.search(r"n_packets=(\d+).*?(priority=\S+ actions=\S+)", line)
            if m:
                out[m.group(2)] = int(m.group(1))
        return out

    def forward(self) -> dict[Owner, list[Flow]]:
        """Port-to-port flows so the two pods reach each other (ARP included)."""
        return {
            A: [Flow(table=0, priority=100, match=f"in_port={self.port_a}", actions=f"output:{self.port_b}")],
            B: [Flow(table=0, priority=100, match=f"in_port={self.port_b}", actions=f"output:{self.port_a}")],
        }


@pytest.fixture
def switch(bed: TestBed) -> Iterator[Switch]:
    node = bed.add_node()
    db = Ovsdb(node.ovs.db_remote)
    db.ensure_bridge(BR, datapath_type="netdev")
    node.ovs.wait_bridge(BR)
    a, b = bed.add_pod(node, "a"), bed.add_pod(node, "b")
    bed.plug(a, BR, "10.9.0.2/24")
    bed.plug(b, BR, "10.9.0.3/24")
    sw = Switch(
        node, db, Ofctl(BR, str(node.ovs.workdir)), a, b, db.wait_ofport("v-a"), db.wait_ofport("v-b")
    )
    yield sw
    db.close()


async def can_ping(sw: Switch, attempts: int = 1) -> bool:
    """One ping; with ``attempts`` > 1, retried (datapath caches and ARP settle within a second)."""
    for _ in range(attempts):
        r = await arun(["ping", "-c", "1", "-W", "1", "10.9.0.3"], sw.a.netns, check=False)
        if r.returncode == 0:
            return True
    return False


class TestOvsdb:
    def test_ensure_bridge_is_idempotent_and_converges_settings(self, switch: Switch) -> None:
        db = switch.db
        before = switch.node.ovs.vsctl("get", "bridge", BR, "_uuid").stdout
        db.ensure_bridge(BR, datapath_type="netdev", external_ids={"owner": "k-vswitch"})
        db.ensure_bridge(BR, datapath_type="netdev", external_ids={"owner": "k-vswitch"})
        assert switch.node.ovs.vsctl("get", "bridge", BR, "_uuid").stdout == before
        assert db.list_bridges().count(BR) == 1
        assert switch.node.ovs.vsctl("get", "bridge", BR, "fail_mode").stdout.strip() == "secure"
        assert db.get_external_ids("Bridge", BR) == {"owner": "k-vswitch"}
        switch.node.ovs.vsctl("set", "bridge", BR, "fail_mode=standalone")
        db.ensure_bridge(BR, datapath_type="netdev")
        assert switch.node.ovs.vsctl("get", "bridge", BR, "fail_mode").stdout.strip() == "secure"

    def test_ports_internal_and_tunnels_idempotent_with_external_ids(self, switch: Switch) -> None:
        db = switch.db
        for _ in range(2):
            db.ensure_port(BR, "gw0", "internal", external_ids={"k-vswitch/role": "gateway"})
            db.ensure_port(BR, "tun-vxlan", "vxlan", ofport_request=100)
            db.ensure_port(BR, "tun-gre", "gre")
        assert db.wait_ofport("gw0") > 0
        assert db.wait_ofport("tun-vxlan") == 100
        info = db.port_info("tun-gre")
        assert info is not None and info.type == "gre"
        assert info.options == {"remote_ip": "flow", "key": "flow"}
        db.ensure_port(BR, "gw0", "internal", iface_external_ids={"iface-id": "x"})
        gw = db.port_info("gw0")
        assert gw is not None and gw.external_ids == {"k-vswitch/role": "gateway"}  # merged, not replaced
        assert gw.iface_external_ids == {"iface-id": "x"}
        assert [p.name for p in db.find_ports(**{"k-vswitch/role": "gateway"})] == ["gw0"]
        assert [p.name for p in db.find_ports(BR, **{"iface-id": "x"})] == ["gw0"]
        assert db.find_ports("other-bridge", **{"iface-id": "x"}) == []
        assert "gw0" in switch.node.ovs.vsctl("list-ports", BR).stdout.split()
        assert db.delete_port("gw0") is True
        assert db.delete_port("gw0") is False
        assert "gw0" not in switch.node.ovs.vsctl("list-ports", BR).stdout.split()

    def test_wait_ofport_reports_the_interface_error(self, switch: Switch) -> None:
        switch.db.ensure_port(BR, "no-such-dev", "")
        with pytest.raises(OvsdbError, match=r"no-such-dev.*No such device"):
            switch.db.wait_ofport("no-such-dev", timeout=3)
        switch.db.delete_port("no-such-dev")

    def test_external_ids_set_and_remove(self, switch: Switch) -> None:
        switch.db.set_external_ids("Port", "v-a", {"pod": "default/a", "x": "1"})
        switch.db.set_external_ids("Port", "v-a", {"x": None})
        assert switch.db.get_external_ids("Port", "v-a") == {"pod": "default/a"}
        with pytest.raises(OvsdbError, match="does not exist"):
            switch.db.set_external_ids("Port", "nope", {"x": "1"})

    async def test_async_client_does_not_block_the_loop(self, switch: Switch) -> None:
        adb = await AsyncOvsdb.connect(switch.node.ovs.db_remote)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.005)

        t = asyncio.create_task(ticker())
        try:
            await adb.ensure_port(BR, "gw1", "internal")
            # Waiting for a port that never appears must not freeze the event loop.
            with pytest.raises(OvsdbError, match="timed out"):
                await adb.wait_ofport("ghost", 0.5)
            assert ticks > 20
            assert await adb.wait_ofport("gw1") > 0
        finally:
            t.cancel()
            await adb.close()


class TestFlowModel:
    def test_rejects_text_ovs_ofctl_cannot_take(self) -> None:
        with pytest.raises(ValueError):
            Flow(table=0, match="ip, nw_dst=1.2.3.4", actions="drop")
        with pytest.raises(ValueError):
            Flow(table=255, actions="drop")
        with pytest.raises(ValueError):
            Flow(table=0, actions="")

    async def test_live_flows_parse_back_to_the_canonical_model(self, switch: Switch) -> None:
        authored = [
            Flow(table=0, priority=100, match="in_port=1,ip,nw_dst=10.0.0.0/24", actions="resubmit(,10)"),
            Flow(
                table=10,
                priority=200,
                match="ip,tcp,nw_src=10.0.0.1,tp_dst=80",
                actions="ct(commit,zone=5,table=20)",
            ),
            Flow(
                table=20,
                priority=5,
                match="arp,arp_op=1,arp_tpa=10.0.0.1",
                actions="move:NXM_OF_ETH_SRC[]->NXM_OF_ETH_DST[],mod_dl_src:02:00:00:00:00:01,"
                "load:0x2->NXM_OF_ARP_OP[],output:IN_PORT",
            ),
            Flow(
                table=30, priority=10, match="ip,reg0=5/0xff,ct_state=+trk+est-new", actions="goto_table:40"
            ),
            Flow(table=40, actions="drop"),
        ]
        await switch.ofctl.bundle(["add " + f.render(0x42) for f in authored])
        live = {f.key: f for f in await switch.ofctl.dump()}
        canon = Canonicalizer().canonical(authored)
        for f in authored:
            m, a = canon[(f.table, f.priority, f.match, f.actions)]
            got = live[(f.table, f.priority, m)]
            assert (got.actions, got.cookie) == (a, 0x42)
        assert len(live) == len(authored)

    def test_cookie_layout(self) -> None:
        c = make_cookie(7, A)
        assert cookie_round(c) == 7 and cookie_category(c) == Category.TEST
        assert make_cookie(7, A) != make_cookie(7, B) and make_cookie(8, A) != c


class TestReconciler:
    async def test_install_is_idempotent(self, switch: Switch) -> None:
        rec = FlowReconciler(switch.ofctl)
        assert await rec.set_many(switch.forward()) == 2
        assert await rec.set_many(switch.forward()) == 0
        assert await can_ping(switch)
        assert not (await rec.resync()).changed

    async def test_bad_flow_rolls_back_the_whole_bundle(self, switch: Switch) -> None:
        rec = FlowReconciler(switch.ofctl)
        await rec.set_many(switch.forward())
        before = switch.raw_dump()
        good = Flow(table=5, priority=1, match="ip", actions="drop")
        for bad, culprit in [
            (Flow(table=5, priority=2, match="ip", actions="group:77"), "group:77"),  # OpenFlow-level
            (Flow(table=5, priority=3, match="ip,no_such_field=1", actions="drop"), "no_such_field"),  # parse
        ]:
            with pytest.raises(OfctlError, match="table unchanged") as err:
                await rec.set_flows(Owner(Category.TEST, "c"), [good, bad])
            assert err.value.flow is not None and culprit in err.value.flow
            assert switch.raw_dump() == before
            assert rec.desired(Owner(Category.TEST, "c")) == []
        # a failed change to an existing owner also leaves its flows and our memory as they were
        with pytest.raises(OfctlError):
            await rec.set_flows(
                A,
                [Flow(table=0, priority=100, match=f"in_port={switch.port_a}", actions="output:4000000000")],
            )
        assert switch.raw_dump() == before
        assert rec.desired(A) == switch.forward()[A]
        assert await can_ping(switch)

    async def test_owner_change_touches_only_that_owners_flows(self, switch: Switch) -> None:
        rec = FlowReconciler(switch.ofctl)
        keep_a = Flow(table=1, priority=1, match="ip,nw_dst=10.1.1.1", actions="drop")
        await rec.set_many(switch.forward())
        await rec.set_flows(Owner(Category.TEST, "a-extra"), [keep_a])
        assert await can_ping(switch)
        counters = switch.stats()
        assert all(counters[k] > 0 for k in counters if "in_port" in k)
        changed = Owner(Category.TEST, "c")
        await rec.set_flows(changed, [Flow(table=2, priority=1, match="ip", actions="drop")])
        n = await rec.set_flows(
            changed,
            [
                Flow(table=2, priority=1, match="ip", actions="output:1"),
                Flow(table=2, priority=2, match="arp", actions="drop"),
            ],
        )
        assert n == 2  # one modify, one add
        after = switch.stats()
        for k, v in counters.items():
            assert after[k] == v, f"flow {k} of another owner was rewritten"
        # modify_strict keeps the flow (and its counters): only actions changed
        assert await rec.delete_owner(changed) == 2
        assert all("table=2" not in line for line in switch.raw_dump().splitlines())

    async def test_flow_conflicts_between_owners_are_refused(self, switch: Switch) -> None:
        rec = FlowReconciler(switch.ofctl)
        f = Flow(table=3, priority=1, match="ip", actions="drop")
        await rec.set_flows(A, [f])
        with pytest.raises(FlowConflict):
            await rec.set_flows(B, [f])
        # moving a flow between owners in one batch is fine and is not deleted by the old owner
        await rec.set_many({A: [], B: [f]})
        live = [x for x in await switch.ofctl.dump() if x.table == 3]
        assert len(live) == 1 and live[0].cookie == rec.cookie(B)

    async def test_streamed_bundle_is_one_atomic_change(self, switch: Switch) -> None:
        """set_streamed writes each owner's lines as they are produced, in chunks; whatever fails
        on the way (the producer, a conflict, a line OVS refuses) leaves the bridge and the
        reconciler's memory as they were."""
        from kvswitch.ovs.groups import Group
        from kvswitch.ovs.openflow import _BundleStream

        rec = FlowReconciler(switch.ofctl)
        await rec.set_many(switch.forward())
        before = switch.raw_dump()
        owners = [Owner(Category.TEST, f"s{i}") for i in range(300)]

        def flows(i: int, actions: str = "drop") -> list[Flow]:
            return [
                Flow(table=6, priority=i + 1, match=f"ip,nw_dst=10.7.{i // 250}.{i % 250}", actions=actions)
            ]

        def group(i: int) -> list[Group]:
            bucket = "bucket=bucket_id:0,weight:100,actions=drop"
            return [Group(group_id=i + 1, type="select", selection_method="dp_hash", buckets=(bucket,))]

        def produce(owner: Owner) -> tuple[list[Flow], list[Group]]:
            i = owners.index(owner)
            return flows(i), group(i)

        def failing(owner: Owner) -> tuple[list[Flow], list[Group]]:
            if owner == owners[250]:
                raise RuntimeError("translation failed")
            return produce(owner)

        def conflicting(owner: Owner) -> tuple[list[Flow], list[Group]]:
            return (switch.forward()[A], []) if owner == owners[250] else produce(owner)

        def refused(owner: Owner) -> tuple[list[Flow], list[Group]]:
            i = owners.index(owner)
            return (flows(i, "group:9999"), []) if i == 250 else produce(owner)

        chunk = _BundleStream.CHUNK
        _BundleStream.CHUNK = 64  # several writes before the failure
        try:
            with pytest.raises(RuntimeError, match="translation failed"):
                await rec.set_streamed(owners, failing)
            with pytest.raises(FlowConflict):
                await rec.set_streamed(owners, conflicting)
            with pytest.raises(OfctlError, match="table unchanged") as err:
                await rec.set_streamed(owners, refused)
            assert err.value.flow is not None and "group:9999" in err.value.flow
            assert switch.raw_dump() == before and await switch.ofctl.dump_groups() == {}
            assert rec.owners == [A, B] and rec.desired_groups() == []
            assert await rec.set_streamed(owners, produce) == 600  # 300 groups, 300 flows
        finally:
            _BundleStream.CHUNK = chunk
        assert len(await switch.ofctl.dump_groups()) == 300
        assert len([x for x in await switch.ofctl.dump() if x.table == 6]) == 300
        assert not (await rec.resync()).changed
        assert await rec.set_streamed(owners, produce) == 0  # nothing changed: no ovs-ofctl at all
        assert await rec.set_streamed(owners[:10], lambda o: ([], [])) == 20
        assert len(await switch.ofctl.dump_groups()) == 290
        assert await can_ping(switch)

    async def test_resync_repairs_drift(self, switch: Switch) -> None:
        rec = FlowReconciler(switch.ofctl)
        await rec.set_many(switch.forward())
        extra = [
            Flow(
                table=20,
                priority=5,
                match="arp,arp_tpa=10.9.0.1,arp_op=1",
                actions="mod_dl_src:02:00:00:00:00:01,load:0x2->NXM_OF_ARP_OP[],output:IN_PORT",
            )
        ]
        await rec.set_flows(Owner(Category.TEST, "arp"), extra)
        desired_dump = switch.raw_dump()
        assert not (await rec.resync()).changed  # non-canonical authored text is not drift
        ovs = switch.node.ovs
        ovs.ofctl("del-flows", "--strict", BR, f"table=0,priority=100,in_port={switch.port_b}")
        ovs.ofctl("add-flow", BR, "table=7,priority=1,ip actions=drop")  # a stranger's flow
        ovs.ofctl("mod-flows", "--strict", BR, f"table=0,priority=100,in_port={switch.port_a},actions=drop")
        assert not await can_ping(switch)
        report = await rec.resync()
        assert (report.added, report.deleted) == (2, 1)
        assert switch.raw_dump() == desired_dump
        assert await can_ping(switch, attempts=3)

    async def test_resync_keeps_the_event_loop_running(
        self, switch: Switch, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Canonicalisation (an ovs-ofctl process) and the comparison run off the loop: the agent's
        loop also serves CNI calls. A slowed-down ovs-ofctl must not stall a ticker."""
        rec = FlowReconciler(switch.ofctl)
        authored = [
            Flow(table=5, priority=1, match="ip,tcp", actions="mod_dl_src:02:00:00:00:00:01,resubmit(,6)")
        ]
        await rec.set_flows(A, authored)  # not OVS's text: resync has to ask ovs-ofctl
        asked = []
        real = rec._canon._ask_ovs

        def slow_ovs(
            keys: list[tuple[int, int, str, str]],
        ) -> Mapping[tuple[int, int, str, str], tuple[str, str]]:
            time.sleep(0.3)
            asked.append(keys)
            return real(keys)

        monkeypatch.setattr(rec._canon, "_ask_ovs", slow_ovs)
        loop = asyncio.get_running_loop()
        gaps: list[float] = []

        async def ticker() -> None:
            last = loop.time()
            while True:
                await asyncio.sleep(0.01)
                gaps.append(loop.time() - last)
                last = loop.time()

        t = asyncio.create_task(ticker())
        try:
            assert not (await rec.resync()).changed
            await asyncio.sleep(0.05)  # the ticker notes a stall that lasted until resync returned
        finally:
            t.cancel()
        assert asked and gaps
        assert max(gaps) < 0.15, f"the loop stalled for {max(gaps):.3f}s during resync"
        assert len(gaps) > 10

    async def test_new_round_replaces_flows_without_losing_a_packet(self, switch: Switch) -> None:
        adb = await AsyncOvsdb.connect(switch.node.ovs.db_remote)
        try:
            old = FlowReconciler(switch.ofctl)
            assert await old.start(adb, BR) == 1
            await old.set_many(switch.forward())
            stale = Flow(table=9, priority=1, match="ip", actions="drop")
            await old.set_flows(Owner(Category.TEST, "gone-after-restart"), [stale])
            ping = asyncio.create_task(
                arun(["ping", "-i", "0.005", "-c", "400", "-W", "1", "10.9.0.3"], switch.a.netns, check=False)
            )
            await asyncio.sleep(0.5)
            new = FlowReconciler(switch.ofctl)  # the restarted agent: empty memory
            assert await new.start(adb, BR) == 2
            ids = await adb.get_external_ids("Bridge", BR)
            assert ids[ROUND_EXTERNAL_ID] == "2"
            for owner, flows in switch.forward().items():
                await new.set_flows(owner, flows)
                # never an empty table: old flows stay until replaced in place
                assert len(await switch.ofctl.dump()) >= 3
            rounds = {cookie_round(f.cookie) for f in await switch.ofctl.dump()}
            assert rounds == {1, 2}  # the stale flow of round 1 is still there...
            report = await new.finish_startup(adb)
            result = await ping
            assert report.deleted == 1  # ...until startup finishes
            assert " 0% packet loss" in result.stdout, result.stdout
            live = await switch.ofctl.dump()
            assert {cookie_round(f.cookie) for f in live} == {2}
            assert sorted(f.key for f in live) == sorted(f.key for f in new.desired())
            assert await FlowReconciler(switch.ofctl).start(adb, BR) == 3
        finally:
            await adb.close()

    async def test_vswitchd_restart_replays_flows(self, switch: Switch) -> None:
        rec = FlowReconciler(switch.ofctl)
        await rec.start(None, BR)
        await rec.set_many(switch.forward())
        async with rec.watching(check_interval=0.05):
            switch.node.ovs.kill_vswitchd()
            switch.node.ovs.start_vswitchd()
            for _ in range(100):
                if rec.replays and await can_ping(switch):
                    break
                await asyncio.sleep(0.05)
        assert rec.replays >= 1
        assert await can_ping(switch)
        assert not (await rec.resync()).changed

    async def test_flow_restore_wait_is_cleared_after_replay(self, switch: Switch) -> None:
        adb = await AsyncOvsdb.connect(switch.node.ovs.db_remote)
        try:
            rec = FlowReconciler(switch.ofctl)
            await rec.start(adb, BR)
            await rec.set_many(switch.forward())
            switch.node.ovs.kill_vswitchd()
            await adb.set_other_config({"flow-restore-wait": "true"})
            switch.node.ovs.start_vswitchd()
            switch.node.ovs.wait_bridge(BR)
            # what a restarted agent does: new round, all owners, then finish
            rec2 = FlowReconciler(switch.ofctl)
            await rec2.start(adb, BR)
            await rec2.set_many(switch.forward())
            await rec2.finish_startup(adb)
            other = await adb.get_other_config()
            assert "flow-restore-wait" not in other
            assert await can_ping(switch, attempts=3)
            assert {f.key for f in await switch.ofctl.dump()} == {f.key for f in rec2.desired()}
            assert SENTINEL_FLOW.key in {f.key for f in await switch.ofctl.dump()}
        finally:
            await adb.close()


def test_parse_dump_handles_ovs_output_shapes() -> None:
    text = (
        "OFPST_FLOW reply (OF1.5) (xid=0x2):\n"
        " cookie=0x5, duration=1.2s, table=3, n_packets=0, n_bytes=0, idle_age=0, actions=drop\n"
        " table=5, idle_timeout=50, ip actions=drop\n"
        " priority=0 actions=NORMAL\n"
        " cookie=0xff, table=9, priority=7,tcp,tp_dst=80 actions=ct(commit,zone=1)\n"
    )
    flows = parse_dump(text)
    assert [(f.cookie, f.table, f.priority, f.match, f.actions) for f in flows] == [
        (5, 3, 32768, "", "drop"),
        (0, 5, 32768, "ip", "drop"),
        (0, 0, 0, "", "NORMAL"),
        (0xFF, 9, 7, "tcp,tp_dst=80", "ct(commit,zone=1)"),
    ]


def test_run_helper_available() -> None:
    assert run(["ovs-ofctl", "--version"]).returncode == 0


def test_fast_dump_index_agrees_with_the_line_parser() -> None:
    common = (
        " cookie=0x5, table=3, actions=drop\n"
        " table=5, priority=0 actions=drop\n"
        " priority=0 actions=NORMAL\n"
        " cookie=0xff, table=9, priority=7,tcp,tp_dst=80 actions=ct(commit,zone=1)\n"
        " table=6, ip actions=drop\n"
    )
    odd = common + " table=8, idle_timeout=50, priority=3,ip actions=drop\n"
    for text in (common, odd):
        expected = {f.key: (f.cookie, f.actions) for f in parse_dump(text)}
        assert parse_dump_index(text) == expected
    assert (8, 3, "ip") in parse_dump_index(odd)
