"""Reachability with real packets: ICMP via ping, TCP and UDP with a payload echoed back.

TCP/UDP endpoints are sockets opened inside the pods' namespaces by this process (see
:func:`kvswitch_testbed.netns.netns_socket`), so a whole N x N matrix runs on one event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import cast

from kvswitch_testbed.netns import arun, netns_socket


async def ping(
    src_netns: str, dst_ip: str, count: int = 1, timeout: float = 1.0, interval: float = 0.2
) -> bool:
    proc = await arun(
        ["ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-W", str(timeout), dst_ip],
        src_netns,
        check=False,
        timeout=count * (interval + timeout) + 5,
    )
    return proc.returncode == 0


@dataclass
class EchoServer:
    """A TCP+UDP echo server bound inside a namespace."""

    netns: str
    ip: str
    port: int
    _tcp: asyncio.Server | None = None
    _udp: asyncio.DatagramTransport | None = None

    async def start(self) -> EchoServer:
        loop = asyncio.get_running_loop()
        tsock = netns_socket(self.netns, socket.AF_INET, socket.SOCK_STREAM)
        tsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tsock.bind((self.ip, self.port))
        tsock.setblocking(False)

        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            writer.close()

        self._tcp = await asyncio.start_server(echo, sock=tsock)
        usock = netns_socket(self.netns, socket.AF_INET, socket.SOCK_DGRAM)
        usock.bind((self.ip, self.port))
        usock.setblocking(False)

        class Echo(asyncio.DatagramProtocol):
            transport: asyncio.DatagramTransport

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = cast(asyncio.DatagramTransport, transport)

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                self.transport.sendto(data, addr)

        self._udp, _ = await loop.create_datagram_endpoint(Echo, sock=usock)
        return self

    async def stop(self) -> None:
        if self._tcp:
            self._tcp.close()
            await self._tcp.wait_closed()
        if self._udp:
            self._udp.close()


async def tcp_echo(src_netns: str, dst_ip: str, port: int, size: int = 4096, timeout: float = 2.0) -> bool:
    """Connect from ``src_netns``, send ``size`` random bytes, require the same bytes back."""
    payload = secrets.token_bytes(size)
    sock = netns_socket(src_netns, socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (dst_ip, port)), timeout)
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            writer.write(payload)
            await writer.drain()
            got = await asyncio.wait_for(reader.readexactly(size), timeout)
        finally:
            writer.close()
        return got == payload
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        sock.close()
        return False


async def udp_echo(
    src_netns: str,
    dst_ip: str,
    port: int,
    size: int = 512,
    timeout: float = 1.0,
    attempts: int = 3,
    bind: str | None = None,
) -> bool:
    """Send a datagram and require it echoed; retried because UDP may lose the first packet."""
    payload = secrets.token_bytes(size)
    loop = asyncio.get_running_loop()
    sock = netns_socket(src_netns, socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        if bind:
            sock.bind((bind, 0))
        await loop.sock_connect(sock, (dst_ip, port))
        for _ in range(attempts):
            await loop.sock_sendall(sock, payload)
            try:
                got = await asyncio.wait_for(loop.sock_recv(sock, 65536), timeout)
            except TimeoutError:
                continue
            return got == payload
        return False
    except OSError:
        return False
    finally:
        sock.close()


Endpoint = tuple[str, str, str]  # (label, netns, ip)
Check = Callable[[Endpoint, Endpoint], Awaitable[bool]]


def icmp_check() -> Check:
    async def check(src: Endpoint, dst: Endpoint) -> bool:
        return await ping(src[1], dst[2], count=1, timeout=1.0)

    return check


def tcp_check(port: int) -> Check:
    async def check(src: Endpoint, dst: Endpoint) -> bool:
        return await tcp_echo(src[1], dst[2], port)

    return check


def udp_check(port: int) -> Check:
    async def check(src: Endpoint, dst: Endpoint) -> bool:
        return await udp_echo(src[1], dst[2], port)

    return check


async def connectivity_matrix(
    endpoints: Sequence[Endpoint], check: Check, *, concurrency: int = 16
) -> dict[tuple[str, str], bool]:
    """Run ``check`` for every ordered pair of distinct endpoints."""
    sem = asyncio.Semaphore(concurrency)

    async def one(src: Endpoint, dst: Endpoint) -> tuple[tuple[str, str], bool]:
        async with sem:
            return (src[0], dst[0]), await check(src, dst)

    pairs = [(s, d) for s, d in itertools.product(endpoints, endpoints) if s is not d]
    return dict(await asyncio.gather(*(one(s, d) for s, d in pairs)))


async def full_matrix(
    endpoints: Sequence[Endpoint], port: int = 7777
) -> dict[str, dict[tuple[str, str], bool]]:
    """ICMP, TCP and UDP matrices with echo servers started on every endpoint."""
    servers = [await EchoServer(ns, ip, port).start() for _, ns, ip in endpoints]
    try:
        return {
            "icmp": await connectivity_matrix(endpoints, icmp_check()),
            "tcp": await connectivity_matrix(endpoints, tcp_check(port)),
            "udp": await connectivity_matrix(endpoints, udp_check(port)),
        }
    finally:
        for s in servers:
            await s.stop()


def format_matrix(labels: Sequence[str], results: dict[tuple[str, str], bool]) -> str:
    width = max(len(label) for label in labels)
    lines = [" " * width + " | " + " ".join(f"{label:>{width}}" for label in labels)]
    lines.append("-" * len(lines[0]))
    for src in labels:
        cells = []
        for dst in labels:
            mark = "-" if src == dst else ("ok" if results.get((src, dst)) else "XX")
            cells.append(f"{mark:>{width}}")
        lines.append(f"{src:>{width}} | " + " ".join(cells))
    return "\n".join(lines)
