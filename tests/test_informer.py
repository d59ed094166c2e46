"""The agent's lean informer (kvswitch.handlers.informer) against the fake API server through
kubernetes-asyncio: paginated lists, the watch from the list's version, resuming a broken stream,
listing again on 410 Gone with the deletions nobody reported, riding out an API server that fails
or goes away. The agent end to end on top of it: test_e2e.py, test_e2e_outage.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client
from kvswitch_testbed.apiserver import ApiServer, login

from kvswitch.handlers.informer import Informer

PODS = "/api/v1/pods"


@pytest.fixture
async def server() -> AsyncIterator[ApiServer]:
    async with ApiServer(kopf_peering=False, bookmark_interval=0.2).serving() as srv:
        yield srv


@pytest.fixture
async def api(server: ApiServer, tmp_path: Path) -> AsyncIterator[client.ApiClient]:
    async with await login(server.url, tmp_path / "kubeconfig") as api_client:
        yield api_client


def pod(name: str, **labels: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "default", "labels": labels},
        "spec": {"nodeName": "node1", "containers": [{"name": "c", "image": "i"}]},
    }


class Mirror:
    """What a handler learns: the objects' labels by key, and every call in order."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, str]] = {}
        self.calls: list[tuple[str, str | None]] = []

    def __call__(self, key: str, obj: dict[str, Any] | None) -> None:
        self.calls.append((key, None if obj is None else obj["metadata"].get("resourceVersion")))
        if obj is None:
            self.objects.pop(key, None)
        else:
            self.objects[key] = dict(obj["metadata"].get("labels") or {})

    def api_state(self, server: ApiServer) -> dict[str, dict[str, str]]:
        return {
            f"default/{o['metadata']['name']}": dict(o["metadata"].get("labels") or {})
            for o in server.list_objects("v1/pods", "default")
        }


async def until(check: Callable[[], Any], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.02)


async def test_lists_in_pages_then_watches_from_the_listed_version(
    server: ApiServer, api: client.ApiClient
) -> None:
    for i in range(7):
        server.create("v1/pods", pod(f"p{i}", app="a"), "default")
    mirror = Mirror()
    informer = Informer(api, PODS, mirror, page_size=3)
    original, tokens = informer._page, []

    async def page(token: str) -> dict[str, Any]:
        tokens.append(token)
        listed = await original(token)
        assert len(listed["items"]) <= 3
        return listed

    informer._page = page  # type: ignore[method-assign]
    await informer.list_all()
    assert mirror.objects == mirror.api_state(server) and len(mirror.calls) == 7
    assert len(tokens) == 3 and tokens[0] == "" and all(tokens[1:])
    assert set(informer.held) == set(mirror.objects)
    # changes between the list and the watch are not missed; then changes as they come
    server.patch("v1/pods", "p0", {"metadata": {"labels": {"app": "b"}}}, "default")
    informer.start()
    try:
        server.delete("v1/pods", "p1", "default")
        server.create("v1/pods", pod("new", app="c"), "default")
        await until(lambda: mirror.objects == mirror.api_state(server))
        assert informer.lists == 1 and informer.watches == 1
        assert mirror.calls[7:] == [
            ("default/p0", mirror.calls[7][1]),
            ("default/p1", None),
            ("default/new", mirror.calls[9][1]),
        ]
        assert "default/p1" not in informer.held
    finally:
        await informer.stop()


async def test_a_broken_stream_resumes_and_410_gone_lists_again_with_the_unreported_deletions(
    server: ApiServer, api: client.ApiClient
) -> None:
    for i in range(6):
        server.create("v1/pods", pod(f"p{i}"), "default")
    mirror = Mirror()
    informer = Informer(api, PODS, mirror, page_size=2)
    await informer.list_all()
    informer.start()
    try:
        await until(lambda: server.open_watches("v1/pods") == 1)
        # a stream cut in the middle of an event: resumed from the last version, the event replayed
        assert server.cut_watches("v1/pods") == 1
        server.patch("v1/pods", "p0", {"metadata": {"labels": {"cut": "yes"}}}, "default")
        await until(
            lambda: mirror.objects == mirror.api_state(server) and server.open_watches("v1/pods") == 1
        )
        assert informer.lists == 1 and informer.watches == 2 and server.emulator.cuts == 1
        # the API server goes away; meanwhile (written past it) a pod is deleted, one changed, one
        # created; it comes back with an empty watch cache: 410 Gone, a new list
        await server.pause()
        server.delete("v1/pods", "p1", "default")
        server.patch("v1/pods", "p2", {"metadata": {"labels": {"during": "outage"}}}, "default")
        server.create("v1/pods", pod("born"), "default")
        calls = len(mirror.calls)
        await asyncio.sleep(1.0)
        await server.resume()
        await until(lambda: mirror.objects == mirror.api_state(server))
        assert informer.lists == 2
        # only what changed is handed over again: not the unchanged pods
        assert sorted(mirror.calls[calls:]) == sorted(
            [("default/born", informer.held["default/born"]), ("default/p1", None),
             ("default/p2", informer.held["default/p2"])]
        )  # fmt: skip
        await until(lambda: server.open_watches("v1/pods") == 1)
        server.delete("v1/pods", "p3", "default")
        await until(lambda: mirror.objects == mirror.api_state(server))
    finally:
        await informer.stop()
    assert server.open_watches("v1/pods") == 0 or await _closes(server)


async def _closes(server: ApiServer) -> bool:
    await until(lambda: server.open_watches("v1/pods") == 0)
    return True


async def test_rides_out_failing_requests_and_an_expired_continue_token(
    server: ApiServer, api: client.ApiClient
) -> None:
    for i in range(5):
        server.create("v1/pods", pod(f"p{i}"), "default")
    mirror = Mirror()
    informer = Informer(api, PODS, mirror, page_size=2)
    server.fail_requests(500)
    listing = asyncio.create_task(informer.list_all())
    await asyncio.sleep(0.6)
    assert not listing.done()
    server.clear_faults()
    await asyncio.wait_for(listing, 5)
    assert mirror.objects == mirror.api_state(server)
    # a continue token that left the watch cache (410 Expired): the list starts over
    small = ApiServer(kopf_peering=False, watch_cache_size=2)
    await small.start()
    try:
        for i in range(4):
            small.create("v1/pods", pod(f"q{i}"), "default")
        async with client.ApiClient(await _configuration(small)) as other:
            informer = Informer(other, PODS, mirror := Mirror(), page_size=1)
            original = informer._page
            pages = 0

            async def page(token: str) -> dict[str, Any]:
                nonlocal pages
                pages += 1
                if pages == 2:  # while the first page is handed over, three writes
                    for i in range(3):
                        small.patch("v1/pods", "q3", {"metadata": {"labels": {"n": str(i)}}}, "default")
                return await original(token)

            informer._page = page  # type: ignore[method-assign]
            await informer.list_all()
            assert mirror.objects == mirror.api_state(small) and informer.lists == 1
            assert pages > 5  # started over
        assert small.errors == []
    finally:
        await small.stop()

    # a handler that raises is logged; the others go on
    def handler(key: str, obj: dict[str, Any] | None) -> None:
        if key.endswith("p1"):
            raise ValueError("untranslatable")

    failing = Informer(api, PODS, handler)
    await failing.list_all()
    assert set(failing.held) == set(mirror.api_state(server))


async def _configuration(server: ApiServer) -> client.Configuration:
    configuration = client.Configuration()
    configuration.host = server.url
    return configuration


async def test_objects_recorded_from_outside_during_a_list_are_not_taken_as_deleted(
    server: ApiServer, api: client.ApiClient
) -> None:
    server.create("v1/pods", pod("old"), "default")
    mirror = Mirror()
    informer = Informer(api, PODS, mirror)
    await informer.list_all()
    original = informer._page

    async def page(token: str) -> dict[str, Any]:
        listed = await original(token)
        # the pod is created after the list's snapshot and read by a GET meanwhile (an ADD)
        informer.record(server.create("v1/pods", pod("fresh"), "default"))
        return listed

    informer._page = page  # type: ignore[method-assign]
    await informer.list_all()
    assert "default/fresh" in informer.held and ("default/fresh", None) not in mirror.calls
