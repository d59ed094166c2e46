"""Reachability with real packets: ICMP via ping, TCP and UDP with a payload echoed back; for
Services, servers that answer with their name and the client address they saw (:class:`WhoAmI`).

TCP/UDP endpoints are sockets opened inside the pods' namespaces by this process (see
:func:`kvswitch_testbed.netns.netns_socket`), so a whole N x N matrix runs on one event loop
(:class:`LoopThread` keeps such a loop on a thread of its own for synchronous callers).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import secrets
import socket
import threading
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

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


# --- Services: which backend answered, and which client address it saw ---------------------------

T = TypeVar("T")


class WhoAmI:
    """A backend for Service probes, bound to ``ip:port`` in ``netns`` for TCP and UDP.

    TCP: sends ``name peer-ip`` and a newline on accept, then echoes; UDP: answers every datagram with
    ``name peer-ip``. ``peer-ip`` is the source address the backend saw: the client's, or a NAT's.
    """

    def __init__(self, netns: str, ip: str, port: int, name: str) -> None:
        self.netns, self.ip, self.port, self.name = netns, ip, port, name
        self._tcp: asyncio.Server | None = None
        self._udp: asyncio.DatagramTransport | None = None

    async def start(self) -> WhoAmI:
        loop = asyncio.get_running_loop()
        tsock = netns_socket(self.netns, socket.AF_INET, socket.SOCK_STREAM)
        tsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tsock.bind((self.ip, self.port))
        tsock.setblocking(False)
        name = self.name

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peer = writer.get_extra_info("peername")[0]
            writer.write(f"{name} {peer}\n".encode())
            with contextlib.suppress(ConnectionError):
                await writer.drain()
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            writer.close()

        self._tcp = await asyncio.start_server(serve, sock=tsock)
        usock = netns_socket(self.netns, socket.AF_INET, socket.SOCK_DGRAM)
        usock.bind((self.ip, self.port))
        usock.setblocking(False)

        class Answer(asyncio.DatagramProtocol):
            transport: asyncio.DatagramTransport

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = cast(asyncio.DatagramTransport, transport)

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                self.transport.sendto(f"{name} {addr[0]}\n".encode(), addr)

        self._udp, _ = await loop.create_datagram_endpoint(Answer, sock=usock)
        return self

    async def stop(self) -> None:
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()
            self._tcp = None
        if self._udp is not None:
            self._udp.close()
            self._udp = None


@dataclass(frozen=True)
class Answer:
    """What a :class:`WhoAmI` said: its name and the client address it saw."""

    backend: str
    peer: str

    @classmethod
    def parse(cls, line: bytes) -> Answer:
        backend, _, peer = line.decode(errors="replace").strip().partition(" ")
        return cls(backend, peer)


async def ask_tcp(netns: str, ip: str, port: int, timeout: float = 2.0) -> Answer:
    """Connect from ``netns`` and read the backend's line; raises ``ConnectionRefusedError`` (RST or
    ICMP port unreachable), ``TimeoutError`` or another ``OSError``."""
    loop = asyncio.get_running_loop()
    sock = netns_socket(netns, socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (ip, port)), timeout)
        data = b""
        while not data.endswith(b"\n"):
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 256), timeout)
            if not chunk:
                raise ConnectionResetError(errno.ECONNRESET, f"{ip}:{port} closed without an answer")
            data += chunk
        return Answer.parse(data)
    finally:
        sock.close()


async def ask_udp(netns: str, ip: str, port: int, timeout: float = 0.5, attempts: int = 4) -> Answer:
    """Send a datagram from ``netns`` (retried: UDP may lose one) and read the answer; raises
    ``ConnectionRefusedError`` on an ICMP port unreachable, ``TimeoutError`` when nothing came."""
    loop = asyncio.get_running_loop()
    sock = netns_socket(netns, socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, (ip, port))
        for _ in range(attempts):
            await loop.sock_sendall(sock, b"?")
            with contextlib.suppress(TimeoutError):
                return Answer.parse(await asyncio.wait_for(loop.sock_recv(sock, 256), timeout))
        raise TimeoutError(f"no UDP answer from {ip}:{port}")
    finally:
        sock.close()


Outcome = Answer | str  # an answer, or what went wrong: "refused", "timeout", an errno name
Target = tuple[str, str, int]  # (label, ip, port): a Service frontend


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, OSError) and exc.errno:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return type(exc).__name__


async def ask(proto: str, netns: str, ip: str, port: int, timeout: float = 2.0) -> Outcome:
    """One probe, ``proto`` ``tcp`` or ``udp``; never raises for network errors."""
    try:
        if proto == "tcp":
            return await ask_tcp(netns, ip, port, timeout)
        return await ask_udp(netns, ip, port, timeout=timeout / 4)
    except OSError as exc:  # TimeoutError and ConnectionRefusedError are OSErrors
        return describe_error(exc)


async def service_matrix(
    clients: Sequence[Endpoint],
    targets: Sequence[Target],
    protos: Sequence[str] = ("tcp", "udp"),
    *,
    concurrency: int = 16,
) -> dict[tuple[str, str, str], Outcome]:
    """Every client (``(label, netns, ip)``: a pod or a node) asks every target once per protocol;
    keyed by ``(proto, client label, target label)``."""
    sem = asyncio.Semaphore(concurrency)

    async def one(proto: str, client: Endpoint, target: Target) -> tuple[tuple[str, str, str], Outcome]:
        async with sem:
            return (proto, client[0], target[0]), await ask(proto, client[1], target[1], target[2])

    jobs = [one(p, c, t) for p in protos for c in clients for t in targets]
    return dict(await asyncio.gather(*jobs))


def format_service_matrix(
    clients: Sequence[Endpoint],
    targets: Sequence[str],
    results: dict[tuple[str, str], Outcome],
    expected: Callable[[str, str, Outcome], bool],
) -> str:
    """Rows are clients, columns targets; a cell names the backend that answered, ``*`` when it saw
    another source than the client's own address (SNAT), ``XX(why)`` when ``expected`` says no."""
    cells: dict[tuple[str, str], str] = {}
    for label, _, ip in clients:
        for target in targets:
            got = results.get((label, target), "missing")
            if not expected(label, target, got):
                cells[label, target] = f"XX({got.backend if isinstance(got, Answer) else got})"
            elif isinstance(got, Answer):
                cells[label, target] = got.backend + ("" if got.peer == ip else "*")
            else:
                cells[label, target] = got
    width = max(len(x) for x in [*targets, *(c[0] for c in clients), *cells.values()])
    lines = [" " * width + " | " + " ".join(f"{t:>{width}}" for t in targets)]
    lines.append("-" * len(lines[0]))
    for label, _, _ in clients:
        lines.append(f"{label:>{width}} | " + " ".join(f"{cells[label, t]:>{width}}" for t in targets))
    return "\n".join(lines)


async def _cancel_other_tasks() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class LoopThread:
    """An event loop on a thread of its own: probe servers live there while synchronous code (a
    test, the sandbox) runs coroutines on it with :meth:`run`."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="probes", daemon=True)

    def start(self) -> LoopThread:
        self._thread.start()
        return self

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = 120.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        """Cancel what still runs there (servers' open connections), then end the loop."""
        if self._thread.is_alive():
            self.run(_cancel_other_tasks(), timeout=10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
        if not self.loop.is_running():
            self.loop.close()

    def __enter__(self) -> LoopThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
