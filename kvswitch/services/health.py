"""healthCheckNodePort: what kube-proxy answers for a Service with externalTrafficPolicy: Local.

A cloud load balancer probes every node on the Service's ``healthCheckNodePort`` and sends traffic
only to nodes that answer 200, i.e. that have a local endpoint. The body is kube-proxy's:
``{"service": {"namespace", "name"}, "localEndpoints": N, "serviceProxyHealthy": true}``; 503 when N
is 0. One listening socket per port, in the node's network namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from dataclasses import dataclass

from kvswitch.kernel.netns import sockets_in

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HealthCheck:
    namespace: str
    name: str
    local_endpoints: int


class HealthCheckServers:
    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._servers: dict[int, asyncio.Server] = {}
        self._state: dict[int, HealthCheck] = {}

    @property
    def ports(self) -> set[int]:
        return set(self._servers)

    async def sync(self, wanted: dict[int, HealthCheck]) -> None:
        """Serve exactly ``wanted`` (port → what to answer); a port that cannot be bound is logged."""
        self._state = dict(wanted)
        for port in set(self._servers) - wanted.keys():
            server = self._servers.pop(port)
            server.close()
            with contextlib.suppress(Exception):
                await server.wait_closed()
        for port in wanted.keys() - set(self._servers):
            try:
                self._servers[port] = await self._listen(port)
            except OSError as exc:
                log.error("healthCheckNodePort %d cannot be served: %s", port, exc)

    async def _listen(self, port: int) -> asyncio.Server:
        (sock,) = await asyncio.to_thread(sockets_in, self.netns, [(socket.AF_INET, socket.SOCK_STREAM, 0)])
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("0.0.0.0", port))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, TimeoutError):
                await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
                check = self._state.get(port)
                count = check.local_endpoints if check else 0
                body = json.dumps(
                    {
                        "service": {
                            "namespace": check.namespace if check else "",
                            "name": check.name if check else "",
                        },
                        "localEndpoints": count,
                        "serviceProxyHealthy": True,
                    }
                ).encode()
                status = "200 OK" if count > 0 else "503 Service Unavailable"
                writer.write(
                    f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
                    f"X-Content-Type-Options: nosniff\r\nContent-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
            writer.close()

        return await asyncio.start_server(answer, sock=sock)

    async def close(self) -> None:
        await self.sync({})
