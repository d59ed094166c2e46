"""The fake API server's outages and faults, against real HTTP clients: a stop and a start with the
same data (pause/resume), answers of 500 and 429 for a while, watch streams cut in the middle of an
event. The end-to-end tests of the daemons riding these out are in test_e2e_outage.py.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException
from kvswitch_testbed.apiserver import ApiServer, ApiServerThread, login


@pytest.fixture
async def server() -> AsyncIterator[ApiServer]:
    async with ApiServer(kopf_peering=False).serving() as srv:
        yield srv


def node(name: str) -> dict[str, Any]:
    return {"metadata": {"name": name}}


async def get(url: str, path: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    async with aiohttp.ClientSession(url) as session, session.get(path) as rsp:
        return rsp.status, await rsp.json(), dict(rsp.headers)


class Stream:
    """A raw watch stream: complete lines as events, plus whatever came after the last newline."""

    def __init__(self, url: str, query: str, path: str = "/api/v1/nodes") -> None:
        self.url, self.target = url, f"{path}?{query}"
        self.events: list[dict[str, Any]] = []
        self.tail = b""
        self.error: BaseException | None = None  # how the stream ended, None for a clean end
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Stream:
        self._session = aiohttp.ClientSession(self.url)
        rsp = await self._session.get(self.target, timeout=aiohttp.ClientTimeout(total=30))
        assert rsp.status == 200
        self._task = asyncio.create_task(self._read(rsp))
        return self

    async def _read(self, rsp: aiohttp.ClientResponse) -> None:
        buffer = b""
        try:
            async for chunk in rsp.content.iter_any():
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                self.events += [json.loads(line) for line in lines if line]
                self.tail = buffer
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            self.error = exc
        finally:
            self.tail = buffer
            rsp.release()

    async def ended(self, timeout: float = 5.0) -> None:
        assert self._task is not None
        await asyncio.wait_for(asyncio.shield(self._task), timeout)

    async def wait_events(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        async with asyncio.timeout(timeout):
            while len(self.events) < count:
                await asyncio.sleep(0.01)
        return self.events

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._session is not None:
            await self._session.close()


def names(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["type"], e["object"]["metadata"].get("name", "")) for e in events]


async def refused(url: str) -> bool:
    try:
        await get(url, "/api/v1/nodes")
    except aiohttp.ClientConnectorError as exc:
        return isinstance(exc.os_error, ConnectionRefusedError)
    return False


async def test_pause_refuses_and_drops_then_resume_serves_the_same_store_on_the_same_addresses(
    server: ApiServer,
) -> None:
    # a second address whose socket the server makes again on resume (as Cluster does in a netns)
    second = await server.listen("127.0.0.2", 0, sock_factory=lambda: socket.socket())
    first = server.url
    server.create("v1/nodes", node("before"))
    _, listed, _ = await get(first, "/api/v1/nodes")
    rv = listed["metadata"]["resourceVersion"]
    async with Stream(second, f"watch=true&resourceVersion={rv}") as stream:
        await asyncio.sleep(0.1)
        assert server.open_watches("v1/nodes") == 1
        await server.pause()
        await stream.ended()
        assert stream.error is not None, "a stopped server drops its watch streams, no clean end"
        assert server.open_watches() == 0
    assert await refused(first) and await refused(second)

    # the cluster's state moves on while nobody can reach the server
    server.create("v1/nodes", node("during"))
    server.delete("v1/nodes", "before")
    await server.resume()
    for url in (first, second):
        status, listed, _ = await get(url, "/api/v1/nodes")
        assert status == 200 and [n["metadata"]["name"] for n in listed["items"]] == ["during"]
    # A restarted kube-apiserver's watch cache starts empty: resuming from an older version is 410.
    async with Stream(first, f"watch=true&resourceVersion={rv}") as stream:
        await stream.ended()
        assert [(e["type"], e["object"]["code"]) for e in stream.events] == [("ERROR", 410)]
    # Listing again gives a version to watch from.
    async with Stream(first, f"watch=true&resourceVersion={listed['metadata']['resourceVersion']}") as s:
        server.create("v1/nodes", node("after"))
        assert names(await s.wait_events(1)) == [("ADDED", "after")]


async def test_resume_keeping_the_watch_cache_replays_what_a_watch_missed(server: ApiServer) -> None:
    server.create("v1/nodes", node("gone"))
    _, listed, _ = await get(server.url, "/api/v1/nodes")
    rv = listed["metadata"]["resourceVersion"]
    await server.pause()
    await server.pause()  # idempotent
    server.create("v1/nodes", node("new"))
    server.delete("v1/nodes", "gone")
    await server.resume(keep_watch_cache=True)
    async with Stream(server.url, f"watch=true&resourceVersion={rv}") as stream:
        assert names(await stream.wait_events(2)) == [("ADDED", "new"), ("DELETED", "gone")]


async def test_a_bare_socket_without_factory_cannot_be_paused(server: ApiServer) -> None:
    sock = socket.socket()
    await server.listen("127.0.0.3", 0, sock=sock)
    with pytest.raises(RuntimeError, match="sock_factory"):
        await server.pause()
    assert not server.paused
    assert (await get(server.urls[-1], "/api/v1/nodes"))[0] == 200


async def test_500_and_429_with_retry_after_for_every_request_until_cleared(
    server: ApiServer, tmp_path: Path
) -> None:
    server.fail_requests(500)
    status, body, _ = await get(server.url, "/api/v1/nodes")
    assert status == 500 and body["kind"] == "Status" and body["reason"] == "InternalError"
    assert body["code"] == 500
    assert (await get(server.url, "/api"))[0] == 500  # discovery too: the whole server is in trouble

    server.fail_requests(429, retry_after=2)
    status, body, headers = await get(server.url, "/apis/networking.k8s.io/v1/networkpolicies")
    assert status == 429 and headers["Retry-After"] == "2"
    assert body["reason"] == "TooManyRequests" and body["details"] == {"retryAfterSeconds": 2}
    # what kubernetes-asyncio (and kopf's own client) see
    async with await login(server.url, tmp_path / "kubeconfig") as api:
        with pytest.raises(ApiException) as err:
            await client.CoreV1Api(api).list_node()
        retry = err.value.headers
        assert err.value.status == 429 and retry is not None and retry["Retry-After"] == "2"
        assert server.emulator.faulted == 4
        server.clear_faults()
        assert (await client.CoreV1Api(api).list_node()).items == []


async def test_a_fault_leaves_open_watches_alone_until_their_connections_are_dropped(
    server: ApiServer,
) -> None:
    async with Stream(server.url, "watch=true") as stream:
        await asyncio.sleep(0.1)
        server.fail_requests(503)
        server.create("v1/nodes", node("n1"))
        assert names(await stream.wait_events(1)) == [("ADDED", "n1")]
        assert server.drop_connections() == 1
        await stream.ended()
        assert stream.error is not None
    assert (await get(server.url, "/api/v1/nodes"))[0] == 503
    server.clear_faults()


async def test_watch_streams_cut_in_the_middle_of_an_event(server: ApiServer) -> None:
    _, listed, _ = await get(server.url, "/api/v1/nodes")
    rv = listed["metadata"]["resourceVersion"]
    async with (
        Stream(server.url, f"watch=true&resourceVersion={rv}") as nodes,
        Stream(server.url, "watch=true&resourceVersion=0", path="/api/v1/namespaces") as nss,
    ):
        await nss.wait_events(4)  # the system namespaces: initial events are never cut
        queue: asyncio.Queue[Any] = asyncio.Queue()
        watcher = server.emulator.subscribe("v1/nodes", queue)  # an in-process subscriber: not a stream
        try:
            assert server.cut_watches("v1/nodes") == 1
            server.create("v1/nodes", node("cut"))
            await nodes.ended()
            assert (await queue.get()).obj["metadata"]["name"] == "cut"
        finally:
            server.emulator.unsubscribe(watcher)
        assert nodes.events == [] and nodes.tail, "half of the event, then the connection closed"
        assert not nodes.tail.endswith(b"\n") and nodes.tail.startswith(b'{"type":"ADDED"')
        assert isinstance(nodes.error, aiohttp.ClientPayloadError), "no clean end of the chunked body"
        assert server.emulator.cuts == 1
        # the unarmed stream of another resource is untouched
        server.create("v1/namespaces", {"metadata": {"name": "fine"}})
        assert names(await nss.wait_events(5))[-1] == ("ADDED", "fine")
    # the client resumes from its last version and gets the event whole
    async with Stream(server.url, f"watch=true&resourceVersion={rv}") as again:
        assert names(await again.wait_events(1)) == [("ADDED", "cut")]
        # cuts arm only the streams open at the time; clear_faults disarms
        assert server.cut_watches() == 1
        server.clear_faults()
        server.create("v1/nodes", node("whole"))
        assert names(await again.wait_events(2))[-1] == ("ADDED", "whole")


def test_the_thread_wrapper_pauses_and_resumes() -> None:
    with ApiServerThread(kopf_peering=False) as api:
        url = api.url
        api.pause()
        api.create("v1/nodes", node("quiet"))
        assert asyncio.run(refused(url))
        api.resume()
        status, listed, _ = asyncio.run(get(url, "/api/v1/nodes"))
        assert status == 200 and [n["metadata"]["name"] for n in listed["items"]] == ["quiet"]
        api.fail_requests(429, retry_after=1)
        assert asyncio.run(get(url, "/api/v1/nodes"))[0] == 429
        api.clear_faults()
        assert api.open_watches() == 0 and api.drop_connections() == 0
