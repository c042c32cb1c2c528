"""The agent's parts without processes: catalog fingerprints, the outlier decision,
the wire framing, and a Hub shared by two clients (probes deduplicated, ejections
sent to all)."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import pytest
from aiohttp import web

from proxy.agent.hub import Hub
from proxy.agent.link import LocalLink
from proxy.agent.outliers import OutlierGroup
from proxy.agent.wire import encode, read_message, spec_key
from proxy.config import HealthConfig, OutlierConfig
from proxy.discovery.catalog import check_fingerprints, tags_changed
from tests.helpers import eventually, port_of, start_backend


def check(node: str, check_id: str, status: str = "passing", service: str = "",
          modify: int = 1) -> dict[str, Any]:
    return {"Node": node, "CheckID": check_id, "Status": status, "ServiceName": service,
            "ServiceID": f"{service}-1" if service else "", "ServiceTags": [],
            "ModifyIndex": modify}


def test_fingerprints_split_service_and_node_checks() -> None:
    by_service, by_node, nodes_of = check_fingerprints([
        check("n1", "serfHealth"), check("n1", "service:web-1", service="web"),
        check("n2", "service:web-2", "critical", service="web"),
        check("n2", "service:db-1", service="db"),
    ])
    assert sorted(by_service) == ["db", "web"]
    assert len(by_service["web"]) == 2
    assert list(by_node) == ["n1"]
    assert nodes_of == {"web": {"n1", "n2"}, "db": {"n2"}}


def test_fingerprints_refuse_what_is_not_a_list_of_checks() -> None:
    with pytest.raises(ValueError):
        check_fingerprints({"not": "a list"})
    with pytest.raises(ValueError):
        check_fingerprints(["a string"])


@pytest.mark.parametrize(("old", "new", "changed"), [
    (None, {"web": []}, set()),  # first answer: nothing to compare with
    ({"web": ["a"]}, {"web": ["a"]}, set()),
    ({"web": ["a"]}, {"web": ["a", "b"]}, {"web"}),  # tags changed
    ({}, {"web": []}, {"web"}),  # appeared
    ({"web": []}, {}, {"web"}),  # went away
    ({"other": []}, {"other": ["x"]}, set()),  # not watched
])
def test_catalog_changes_name_the_watched_services_that_moved(
        old: dict[str, Any] | None, new: dict[str, Any], changed: set[str]) -> None:
    assert tags_changed(old, new, {"web"}) == changed


def outlier(**kw: Any) -> OutlierConfig:
    return OutlierConfig.model_validate({"consecutive_failures": 3, **kw})


def test_an_ejection_is_decided_once_and_grows_with_each_ejection() -> None:
    group = OutlierGroup(outlier(base_ejection_time="10s", max_ejection_time="25s"))
    assert group.report("a", 4, now=0.0) == ("a", 10.0, 1)
    assert group.report("a", 4, now=1.0) is None  # already ejected: other workers' reports
    assert group.report("a", 4, now=11.0) == ("a", 20.0, 2)
    assert group.report("a", 4, now=40.0) == ("a", 25.0, 3)  # capped
    assert [b for b, _, _ in group.active(now=41.0)] == ["a"]


def test_ejections_stay_within_max_ejection_percent_but_one_is_always_allowed() -> None:
    group = OutlierGroup(outlier(max_ejection_percent=50))
    assert group.report("a", 4, now=0.0) is not None
    assert group.report("b", 4, now=0.0) is not None
    assert group.report("c", 4, now=0.0) is None  # 2 of 4 is the cap
    tiny = OutlierGroup(outlier(max_ejection_percent=10))
    assert tiny.report("a", 2, now=0.0) is not None  # floor(0.2) = 0, but one may go


async def test_the_wire_frames_messages_and_refuses_broken_ones() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(encode(["watch", [["k", {"service": "web"}]]]) + encode(["fresh", "s"]))
    reader.feed_data(struct.pack(">I", 2) + b"{}")
    reader.feed_eof()
    assert await read_message(reader) == ["watch", [["k", {"service": "web"}]]]
    assert await read_message(reader) == ["fresh", "s"]
    with pytest.raises(ValueError, match="JSON array"):
        await read_message(reader)
    assert await read_message(reader) is None  # EOF between frames
    assert spec_key({"a": 1, "b": 2}) == spec_key({"b": 2, "a": 1})


async def test_one_probe_for_two_workers_and_both_hear_the_verdict() -> None:
    probes = 0
    status = 200

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        nonlocal probes
        probes += 1
        return web.Response(status=status)

    server, listener = await start_backend(handler)
    port = port_of(listener)
    hub = Hub()
    one, two = LocalLink(hub), LocalLink(hub)
    heard: dict[str, list[Any]] = {"one": [], "two": []}
    check_spec = {"check": HealthConfig.model_validate({
        "path": "/h", "interval": "50ms", "jitter": "1ms", "fall": 2, "rise": 1,
    }).model_dump(mode="json"), "tls": None}
    try:
        one.set_health("app@1", check_spec, [["b1", "127.0.0.1", port, True, False]],
                       heard["one"].append)
        two.set_health("app@2", check_spec, [["b1", "127.0.0.1", port, True, False]],
                       heard["two"].append)
        assert len(hub.targets) == 1  # one (check, address): one prober
        status = 500

        async def both_down() -> bool:
            return all(h and h[-1][3] is False for h in heard.values())

        await eventually(both_down, timeout=5)
        assert heard["one"][-1][:3] == ["health", "app@1", "b1"]
        assert "health check answered 500 (2 times)" in heard["two"][-1][4]
        one.drop_health("app@1")
        assert len(hub.targets) == 1  # still wanted by the other
        two.drop_health("app@2")
        assert hub.targets == {}
    finally:
        await hub.close()
        listener.close()
        await server.shutdown(0.1)


async def test_an_ejection_reported_by_one_worker_reaches_every_worker() -> None:
    hub = Hub()
    links = [LocalLink(hub) for _ in range(3)]
    heard: list[list[Any]] = [[] for _ in links]
    spec = outlier(base_ejection_time="30s").model_dump(mode="json")
    try:
        for link, sink in zip(links, heard, strict=True):
            link.subscribe_outliers("app", spec, sink.append)
        links[0].report_outlier("app", "b1", 4)
        links[2].report_outlier("app", "b1", 4)  # the same streak seen elsewhere

        async def all_heard() -> bool:
            return all(sink for sink in heard)

        await eventually(all_heard, timeout=2)
        await asyncio.sleep(0)  # a second ejection, if any, would be delivered by now
        assert all(len(sink) == 1 and sink[0][:3] == ["eject", "app", "b1"]
                   for sink in heard)
        late = LocalLink(hub)  # a worker that starts now is told of it
        told: list[Any] = []
        late.subscribe_outliers("app", spec, told.append)
        await eventually(lambda: _true(bool(told)), timeout=2)
        assert told[0][2] == "b1" and 29 < told[0][3] <= 30
    finally:
        await hub.close()


async def _true(value: bool) -> bool:
    return value


def test_a_drain_reaches_every_worker_and_a_restarted_agent_learns_it_back() -> None:
    hub = Hub()
    one: list[Any] = []
    two: list[Any] = []
    first, second = hub.attach(one.append, "one"), hub.attach(two.append, "two")
    hub.handle(first, ["drain", "app", "b1", True])
    assert one[-1] == two[-1] == ["drained", [["app", "b1"]]]
    hub.handle(second, ["drain", "app", "b1", True])  # no change: only the sender hears
    assert len(one) == 1 and two[-1] == ["drained", [["app", "b1"]]]
    # an agent restarted empty: a reconnecting worker sends what it knew (union kept)
    fresh = Hub()
    heard: list[Any] = []
    worker = fresh.attach(heard.append, "worker")
    fresh.handle(worker, ["drains", [["app", "b1"]]])
    fresh.handle(worker, ["drains", []])  # a worker that knew nothing removes nothing
    assert heard[-1] == ["drained", [["app", "b1"]]]
    fresh.handle(worker, ["drain", "app", "b1", False])
    assert heard[-1] == ["drained", []]


async def test_asks_for_traffic_do_not_pile_up_when_the_agent_is_silent() -> None:
    from proxy.agent.link import Link

    class Silent(Link):
        sent: list[Any] = []

        def _send(self, message: Any) -> None:
            self.sent.append(message)  # never answered

    link = Silent()
    for _ in range(40):
        assert await link.traffic(timeout=0.001) is None
    assert len(link.sent) == 32  # then answered None without asking again
