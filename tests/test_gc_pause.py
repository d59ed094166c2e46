"""The cyclic collector's pauses (kvswitch.gc_pause): nested, overlapping across awaits, and never
turning on a collector that was off before the first of them."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest

from kvswitch.gc_pause import paused_gc


@pytest.fixture(autouse=True)
def _collector_restored() -> Iterator[None]:
    was = gc.isenabled()
    yield
    (gc.enable if was else gc.disable)()


def test_nested_pauses_end_with_the_outermost() -> None:
    gc.enable()
    with paused_gc():
        assert not gc.isenabled()
        with paused_gc():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()


def test_a_collector_that_was_off_stays_off() -> None:
    gc.disable()
    with paused_gc():
        pass
    assert not gc.isenabled()


def test_a_pause_that_raises_still_ends() -> None:
    gc.enable()
    with pytest.raises(RuntimeError), paused_gc():
        raise RuntimeError("in the middle")
    assert gc.isenabled()


async def test_overlapping_pauses_of_two_tasks_end_with_the_last() -> None:
    """Informers list concurrently: the first to finish must not turn the collector on under the
    other (the pauses end in another order than they began)."""
    gc.enable()
    first_in, second_in, first_out = asyncio.Event(), asyncio.Event(), asyncio.Event()
    seen: list[bool] = []

    async def first() -> None:
        with paused_gc():
            first_in.set()
            await second_in.wait()
        first_out.set()

    async def second() -> None:
        await first_in.wait()
        with paused_gc():
            second_in.set()
            await first_out.wait()
            seen.append(gc.isenabled())
        seen.append(gc.isenabled())

    await asyncio.gather(first(), second())
    assert seen == [False, True]
