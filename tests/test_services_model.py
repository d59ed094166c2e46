"""Services and EndpointSlices parsed as the proxy needs them; kube-proxy's endpoint choice."""

from __future__ import annotations

from typing import Any

import pytest

from kvswitch.services.model import (
    Endpoint,
    ServicePort,
    UntranslatableService,
    parse_service,
    parse_slice,
    select_endpoints,
)


def svc(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"clusterIP": "10.96.0.10", "ports": [{"port": 80, "targetPort": 8080}]}
    return {"metadata": {"namespace": "ns", "name": "web"}, "spec": {**base, **spec}}


class TestParseService:
    def test_defaults(self) -> None:
        s = parse_service(svc())
        assert s.key == "ns/web"
        assert s.cluster_ips == ("10.96.0.10",)
        assert s.ports == (ServicePort("", "TCP", 80, None),)
        assert s.affinity_timeout is None and not s.external_local and not s.internal_local

    def test_nodeport_external_and_lb_ips(self) -> None:
        obj = svc(
            type="LoadBalancer",
            ports=[
                {"name": "http", "port": 80, "nodePort": 30080},
                {"name": "dns", "port": 53, "protocol": "UDP"},
            ],
            externalIPs=["192.0.2.10"],
            externalTrafficPolicy="Local",
            healthCheckNodePort=31000,
        )
        obj["status"] = {"loadBalancer": {"ingress": [{"ip": "192.0.2.20"}, {"hostname": "lb.example"}]}}
        s = parse_service(obj)
        assert s.ports[0] == ServicePort("http", "TCP", 80, 30080)
        assert s.ports[1].protocol == "UDP"
        assert s.external_ips == ("192.0.2.10", "192.0.2.20")
        assert s.external_local and s.health_check_node_port == 31000

    def test_nodeport_ignored_on_clusterip(self) -> None:
        assert parse_service(svc(ports=[{"port": 80, "nodePort": 30080}])).ports[0].node_port is None

    def test_headless_and_external_name_have_no_frontends(self) -> None:
        assert parse_service(svc(clusterIP="None", clusterIPs=["None"])).cluster_ips == ()
        assert parse_service(svc(type="ExternalName", externalName="x.example")).ports == ()

    def test_affinity(self) -> None:
        assert parse_service(svc(sessionAffinity="ClientIP")).affinity_timeout == 10800
        cfg = {"clientIP": {"timeoutSeconds": 5}}
        assert parse_service(svc(sessionAffinity="ClientIP", sessionAffinityConfig=cfg)).affinity_timeout == 5

    @pytest.mark.parametrize(
        ("spec", "field"),
        [
            ({"type": "Weird"}, "spec.type"),
            ({"ports": [{"port": 80, "protocol": "ICMP"}]}, "spec.ports[0].protocol"),
            ({"ports": [{"port": 0}]}, "spec.ports[0].port"),
            ({"ports": [{"port": 80}, {"port": 80}]}, "spec.ports[1]"),
            ({"clusterIP": "10.96.0.300"}, "spec.clusterIPs[0]"),
            ({"externalIPs": ["nope"]}, "spec.externalIPs[0]"),
            ({"sessionAffinity": "Cookie"}, "spec.sessionAffinity"),
            (
                {"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 0}}},
                "timeoutSeconds",
            ),
            ({"externalTrafficPolicy": "Nearest"}, "spec.externalTrafficPolicy"),
        ],
    )
    def test_untranslatable_names_the_field(self, spec: dict[str, Any], field: str) -> None:
        with pytest.raises(UntranslatableService, match=field.replace("[", r"\[").replace("]", r"\]")):
            parse_service(svc(**spec))


def slice_obj(endpoints: list[dict[str, Any]], ports: list[dict[str, Any]], **meta: Any) -> dict[str, Any]:
    return {
        "metadata": {"namespace": "ns", "name": "web-abc", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": ports,
        **meta,
    }


class TestParseSlice:
    def test_endpoints_per_port_with_conditions(self) -> None:
        s = parse_slice(
            slice_obj(
                [
                    {"addresses": ["10.244.1.5"], "conditions": {"ready": True}, "nodeName": "n1"},
                    {
                        "addresses": ["10.244.2.6"],
                        "conditions": {"ready": False, "serving": True, "terminating": True},
                        "nodeName": "n2",
                    },
                    {"addresses": ["10.244.2.7"], "conditions": {}},
                ],
                [{"name": "http", "port": 8080, "protocol": "TCP"}],
            )
        )
        assert s is not None and s.service_key == "ns/web"
        eps = [e for _, _, e in s.endpoints]
        assert eps[0] == Endpoint("10.244.1.5", 8080, "n1", True, True, False)
        assert eps[1] == Endpoint("10.244.2.6", 8080, "n2", False, True, True)
        assert eps[2].ready and eps[2].serving  # nil conditions mean ready
        assert {(n, p) for n, p, _ in s.endpoints} == {("http", "TCP")}

    def test_ignored_slices(self) -> None:
        assert parse_slice(slice_obj([], [], addressType="IPv6")) is None
        no_label = slice_obj([], [])
        no_label["metadata"]["labels"] = {}
        assert parse_slice(no_label) is None


class TestSelectEndpoints:
    ready = Endpoint("10.0.0.1", 80, "a")
    remote = Endpoint("10.0.0.2", 80, "b")
    terminating = Endpoint("10.0.0.3", 80, "a", ready=False, serving=True, terminating=True)
    gone = Endpoint("10.0.0.4", 80, "a", ready=False, serving=False, terminating=True)
    unready = Endpoint("10.0.0.5", 80, "a", ready=False, serving=False)

    def test_ready_only_when_any(self) -> None:
        got = select_endpoints([self.remote, self.ready, self.terminating, self.unready], "a", False)
        assert got == [self.ready, self.remote]

    def test_terminating_serving_as_fallback(self) -> None:
        assert select_endpoints([self.terminating, self.gone, self.unready], "a", False) == [self.terminating]

    def test_local_only(self) -> None:
        assert select_endpoints([self.ready, self.remote], "b", True) == [self.remote]
        assert select_endpoints([self.ready], "b", True) == []
