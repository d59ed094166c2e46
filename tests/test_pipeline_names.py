"""kvswitch/ovs/pipeline.py names every register and jump: no other module spells one, and the
names render exactly as OVS prints them (so desired and live flows compare as strings)."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

from kvswitch.ovs import pipeline
from kvswitch.ovs.flows import Canonicalizer, Flow
from kvswitch.ovs.pipeline import (
    FROM_GATEWAY,
    FROM_POD,
    FROM_TUNNEL,
    REG_OUT_PORT,
    REG_SCRATCH,
    REG_SOURCE,
    RegField,
    RegMark,
    Source,
    Table,
    arp_reply_any,
    goto,
    move,
    output,
)

PACKAGE = Path(pipeline.__file__).resolve().parents[1]
PIPELINE = Path(pipeline.__file__).resolve()

# What only pipeline.py may write: NXM register operands (also built at run time, NXM_NX_{...}),
# register matches and loads (reg1=..., ->reg1, reg{n}, a REG_ name spliced into text), and jumps.
FORBIDDEN = {
    "NXM register": re.compile(r"NXM_NX_REG|NXM_NX_\{"),
    "register match": re.compile(r"(?<![\w])reg\d+\s*="),
    "register load": re.compile(r"->\s*reg\d+"),
    "register built from a number": re.compile(r"(?<![\w])reg\{"),
    "register name spliced into flow text": re.compile(r"\{REG_\w+(?:\.(?:name|reg))?\}"),
    "goto_table": re.compile(r"goto_table:"),
}


def violations(text: str) -> list[tuple[int, str, str]]:
    """(line number, what, line) for every forbidden spelling in ``text``."""
    found = []
    for n, line in enumerate(text.splitlines(), start=1):
        for what, pattern in FORBIDDEN.items():
            if pattern.search(line):
                found.append((n, what, line.strip()))
    return found


def test_only_pipeline_spells_registers_and_jumps() -> None:
    modules = sorted(p for p in PACKAGE.rglob("*.py") if p.resolve() != PIPELINE)
    assert len(modules) > 20 and PACKAGE / "datapath.py" in modules
    report = [
        f"{path.relative_to(PACKAGE.parent)}:{n}: {what}: {line}"
        for path in modules
        for n, what, line in violations(path.read_text())
    ]
    assert not report, "use the names of kvswitch/ovs/pipeline.py instead:\n" + "\n".join(report)


@pytest.mark.parametrize(
    "text",
    [
        f"{FROM_POD.match},ip",
        FROM_TUNNEL.load,
        REG_OUT_PORT.load(7),
        RegField(3, 4, 7).match(2),
        output(REG_OUT_PORT),
        move("NXM_OF_ARP_TPA[]", REG_SCRATCH),
        'f"output:NXM_NX_{REG_OUT_PORT.upper()}[]"',
        'f"set_field:{v:#x}->reg{n}"',
        'f"set_field:{Source.POD:#x}->{REG_SOURCE}"',
        'f"ip,{REG_SOURCE.name}=0x1"',
        goto(Table.OUTPUT),
    ],
)
def test_the_scan_sees_what_pipeline_renders(text: str) -> None:
    """The patterns match the real spellings: whatever pipeline.py renders would be caught elsewhere."""
    assert violations(f"x = 1\n{text}\n")


def test_the_scan_leaves_other_fields_alone() -> None:
    text = "set_field:0a:58:0a:f4:01:05->eth_dst,move:NXM_NX_ARP_SHA[]->NXM_NX_ARP_THA[],resubmit(,10)"
    assert violations(text) == []


class TestRegisters:
    def test_named_fields_never_share_bits(self) -> None:
        """Each concern gets bits of its own: a new field overlapping another would corrupt it."""
        named = {name: v for name, v in vars(pipeline).items() if isinstance(v, RegField)}
        assert {"REG_SOURCE", "REG_OUT_PORT", "REG_SCRATCH"} <= named.keys()
        for (n1, a), (n2, b) in itertools.combinations(sorted(named.items()), 2):
            assert a.reg != b.reg or not a.mask & b.mask, f"{n1} and {n2} overlap"
        marks = [v for v in vars(pipeline).values() if isinstance(v, RegMark)]
        assert marks and all(m.field in named.values() for m in marks)

    def test_marks_of_the_source_register(self) -> None:
        assert (FROM_GATEWAY.match, FROM_TUNNEL.match, FROM_POD.match) == ("reg0=0x1", "reg0=0x2", "reg0=0x3")
        assert FROM_POD.load == "set_field:0x3->reg0"
        assert FROM_POD == REG_SOURCE.mark(Source.POD) == RegMark(REG_SOURCE, 3)
        assert REG_OUT_PORT.nxm == "NXM_NX_REG1[]" and output(REG_OUT_PORT) == "output:NXM_NX_REG1[]"

    def test_partial_fields(self) -> None:
        f = RegField(4, 4, 7)
        assert (f.match(3), f.load(3), f.nxm) == (
            "reg4=0x30/0xf0",
            "set_field:0x30/0xf0->reg4",
            "NXM_NX_REG4[4..7]",
        )
        assert RegField(5, 31, 31).nxm == "NXM_NX_REG5[31]"
        assert RegField(0, 0, 15).match(0) == "reg0=0/0xffff"
        assert RegField(2).load(0) == "set_field:0->reg2"

    @pytest.mark.parametrize(
        ("make", "message"),
        [
            (lambda: RegField(16), "no such register"),
            (lambda: RegField(0, 8, 7), "no such register"),
            (lambda: RegField(0, 0, 32), "no such register"),
            (lambda: RegField(0, 4, 7).mark(16), "does not fit"),
            (lambda: RegField(0).load(1 << 32), "does not fit"),
            (lambda: RegField(0).match(-1), "does not fit"),
        ],
    )
    def test_out_of_range_is_refused(self, make: object, message: str) -> None:
        assert callable(make)
        with pytest.raises(ValueError, match=message):
            make()

    def test_every_rendering_is_what_ovs_prints(self) -> None:
        """Round trip through ``ovs-ofctl parse-flows``: full and partial fields, single bits, zero."""
        fields = [REG_SOURCE, REG_OUT_PORT, RegField(3, 4, 7), RegField(5, 31, 31), RegField(6, 0, 15)]
        flows = []
        for i, f in enumerate(fields):
            for j, value in enumerate(sorted({0, 1, (1 << f.width) - 1})):
                same_width = RegField(7, 0, f.width - 1)
                flows.append(
                    Flow(
                        table=Table.CLASSIFIER,
                        priority=1000 + 10 * i + j,
                        match=f.match(value),
                        actions=f"{f.load(value)},{move(f, same_width)},{output(f)},{goto(Table.OUTPUT)}",
                    )
                )
        flows.append(
            Flow(
                table=Table.ARP_RESPONDER,
                priority=1,
                match="arp,arp_op=1",
                actions=arp_reply_any("02:00:00:00:00:01"),
            )
        )
        canon = Canonicalizer().canonical(flows)
        for flow in flows:
            assert canon[(flow.table, flow.priority, flow.match, flow.actions)] == (flow.match, flow.actions)
