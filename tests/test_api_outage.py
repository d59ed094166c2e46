"""How the daemons' own API calls ride out an API server in trouble (kvswitch.kube) and how the agent
finds deletions no watch reported (kvswitch.handlers.relist), against the fake API server through
kubernetes-asyncio. The daemons themselves, end to end: test_e2e_outage.py.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import kopf
import pytest
from kubernetes_asyncio import client
from kvswitch_testbed.apiserver import ApiServer, login
from kvswitch_testbed.cluster import CRD_FILE

from kvswitch.handlers.relist import Kind, KnownObjects, RelistSweeper, Stub, key_of, stub_of
from kvswitch.kube import (
    MAX_BACKOFF,
    Backoffs,
    VSwitchConfigs,
    call_api,
    is_transient,
    list_objects,
    ride_out_api_outages,
)

PODS = "/api/v1/pods"


@pytest.fixture
async def server() -> AsyncIterator[ApiServer]:
    async with ApiServer(crds=[CRD_FILE], kopf_peering=False).serving() as srv:
        yield srv


@pytest.fixture
async def api(server: ApiServer, tmp_path: Path) -> AsyncIterator[client.ApiClient]:
    async with await login(server.url, tmp_path / "kubeconfig") as api_client:
        yield api_client


def pod(name: str, node: str = "node1") -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "i"}]},
    }


def vsc(name: str) -> dict[str, Any]:
    spec = {
        "clusterCIDR": "10.244.0.0/16",
        "podCIDR": "10.244.1.0/24",
        "serviceCIDR": "10.96.0.0/12",
        "overlayType": "vxlan",
        "overlayIP": "10.250.0.11",
    }
    return {
        "apiVersion": "kvswitch.io/v1alpha1",
        "kind": "VSwitchConfig",
        "metadata": {"name": name},
        "spec": spec,
    }


def test_backoffs_never_end_and_stay_short() -> None:
    first = list(itertools.islice(Backoffs(), 200))
    assert first[:3] == [0.25, 0.5, 1.0]
    assert all(1.0 <= b <= MAX_BACKOFF for b in first[3:]) and len(set(first[3:])) > 1  # jittered
    assert list(itertools.islice(Backoffs(), 3)) == [0.25, 0.5, 1.0]  # anew for every request
    assert not hasattr(Backoffs(), "__len__")  # kopf: unsized backoffs never escalate
    settings = kopf.OperatorSettings()
    ride_out_api_outages(settings)
    assert isinstance(settings.networking.error_backoffs, Backoffs)
    assert settings.networking.connect_timeout == settings.watching.connect_timeout == 5.0


def test_what_is_worth_retrying() -> None:
    assert all(is_transient(client.ApiException(status=s)) for s in (429, 500, 502, 503, 504))
    assert not any(is_transient(client.ApiException(status=s)) for s in (400, 403, 404, 409, 422))
    assert is_transient(ConnectionRefusedError()) and is_transient(TimeoutError())
    assert not is_transient(ValueError())


async def test_calls_wait_for_a_server_answering_500_then_429_then_gone_then_back(
    server: ApiServer, api: client.ApiClient
) -> None:
    configs = VSwitchConfigs(api)
    server.fail_requests(500)
    call = asyncio.create_task(configs.create(vsc("node1")))
    await asyncio.sleep(1.0)
    assert not call.done() and server.emulator.faulted >= 3
    server.fail_requests(429, retry_after=3)  # longer than any backoff of ours
    seen = server.emulator.faulted
    async with asyncio.timeout(5):
        while server.emulator.faulted == seen:  # the first 429
            await asyncio.sleep(0.01)
    seen = server.emulator.faulted
    await asyncio.sleep(2.5)
    assert server.emulator.faulted == seen, "Retry-After: 3 is honoured"
    await server.pause()
    server.clear_faults()
    await asyncio.sleep(1.5)
    assert not call.done()
    started = time.monotonic()
    await server.resume()
    created = await asyncio.wait_for(call, 10)
    assert time.monotonic() - started < MAX_BACKOFF + 1
    assert created["metadata"]["name"] == "node1" and server.get(VSC_REF, "node1") is not None
    # every other call of the client goes through the same retries
    server.fail_requests(503)
    patched = asyncio.create_task(configs.patch_status("node1", {"observedGeneration": 1}))
    got = asyncio.create_task(configs.get("node1"))
    await asyncio.sleep(0.5)
    server.clear_faults()
    await asyncio.wait_for(patched, 5)
    assert (await asyncio.wait_for(got, 5) or {})["metadata"]["name"] == "node1"


VSC_REF = "kvswitch.io/v1alpha1/vswitchconfigs"


async def test_what_is_not_worth_retrying_fails_at_once(server: ApiServer, api: client.ApiClient) -> None:
    configs = VSwitchConfigs(api)
    assert await configs.get("nothing") is None  # 404: an answer, not a failure
    await configs.delete("nothing")
    await configs.create(vsc("node1"))
    with pytest.raises(client.ApiException) as err:
        await asyncio.wait_for(configs.create(vsc("node1")), 2)
    assert err.value.status == 409

    async def bad() -> Any:
        raise client.ApiException(status=422)

    with pytest.raises(client.ApiException):
        await asyncio.wait_for(call_api("a bad request", bad), 1)


async def test_list_objects_gives_plain_objects(server: ApiServer, api: client.ApiClient) -> None:
    server.create("v1/pods", pod("a"))
    server.create("v1/pods", pod("b", node="node2"))
    items = await list_objects(api, PODS)
    assert [(o["metadata"]["name"], o["spec"]["nodeName"]) for o in items] == [("a", "node1"), ("b", "node2")]
    assert isinstance(items[0], dict) and "resourceVersion" in items[0]["metadata"]


def test_known_objects_forget_only_what_a_list_lacks_and_no_event_touched_since() -> None:
    known = KnownObjects()
    known.record("pods", pod("a"), deleted=False)
    known.record("pods", pod("b"), deleted=False)
    known.record("pods", pod("c"), deleted=False)
    mark = known.mark()  # the list request goes out now
    known.record("pods", pod("d"), deleted=False)  # an event after it: the list may predate d
    known.record("pods", pod("c"), deleted=True)
    gone = known.take_missing("pods", ["default/a"], mark)
    assert [key_of(s) for s in gone] == ["default/b"]
    assert gone[0] == {"metadata": {"name": "b", "namespace": "default"}, "spec": {"nodeName": "node1"}}
    assert known.keys("pods") == {"default/a", "default/d"}
    assert stub_of({"metadata": {"name": "n1"}}) == {"metadata": {"name": "n1"}}
    assert known.take_missing("nodes", [], known.mark()) == []


async def test_a_sweep_feeds_a_deletion_for_each_object_gone_from_the_api(
    server: ApiServer, api: client.ApiClient
) -> None:
    known = KnownObjects()
    for name in ("a", "b", "c"):
        known.record(PODS, server.create("v1/pods", pod(name)), deleted=False)
    known.record("/api/v1/namespaces", {"metadata": {"name": "gone"}}, deleted=False)
    forgotten: list[tuple[str, Stub]] = []

    def kind(path: str) -> Kind:
        async def forget(stub: Stub) -> None:
            forgotten.append((path, stub))

        return Kind(lambda: list_objects(api, path), forget)

    sweeper = RelistSweeper(
        known, {PODS: kind(PODS), "/api/v1/namespaces": kind("/api/v1/namespaces")}, delay=0.05
    )
    server.delete("v1/pods", "b", "default")  # deleted while "the watch was away"
    assert await sweeper.sweep() == 2
    assert [(p, key_of(s)) for p, s in forgotten] == [(PODS, "default/b"), ("/api/v1/namespaces", "/gone")]
    assert known.keys(PODS) == {"default/a", "default/c"}
    # triggers coalesce: a burst of listing events makes one sweep (one more if one comes during it)
    server.delete("v1/pods", "c", "default")
    for _ in range(50):
        sweeper.trigger()
    await asyncio.sleep(0.5)
    assert sweeper.sweeps == 2 and forgotten[-1][1]["metadata"]["name"] == "c"
    # a sweep that cannot list (the API went away again) waits for it; close() ends it
    await server.pause()
    sweeper.trigger()
    await asyncio.sleep(0.5)
    await sweeper.close()
    await server.resume()
    assert sweeper.sweeps == 2
