"""Crafted SCTP: the kernels here have no SCTP sockets, so an INIT chunk is built by hand, sent on a
raw IP socket and caught by a raw socket at the destination (raw sockets see every protocol)."""

from __future__ import annotations

import asyncio
import os
import socket
import struct

from kvswitch_testbed.netns import netns_socket

IPPROTO_SCTP = 132


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def init_packet(src_port: int, dst_port: int, tag: int) -> bytes:
    """SCTP common header + INIT chunk (RFC 9260 §3.3.2) with a valid CRC32c."""
    init = struct.pack("!IIHHI", tag, 65535, 1, 1, tag)  # initiate tag, a_rwnd, streams, initial TSN
    chunk = struct.pack("!BBH", 1, 0, 4 + len(init)) + init
    header = struct.pack("!HHII", src_port, dst_port, 0, 0)
    crc = crc32c(header + chunk)
    return struct.pack("!HHII", src_port, dst_port, 0, 0)[:8] + struct.pack("<I", crc) + chunk


class SctpCatcher:
    """Records SCTP packets (source IP, destination port, tag) arriving in a namespace."""

    def __init__(self, netns: str) -> None:
        self.sock = netns_socket(netns, socket.AF_INET, socket.SOCK_RAW, IPPROTO_SCTP)
        self.sock.setblocking(False)
        self.seen: set[tuple[str, int, int]] = set()
        self.sources: set[tuple[str, int, int]] = set()  # (source IP, source port, tag)

    def drain(self) -> None:
        while True:
            try:
                pkt, (src, _) = self.sock.recvfrom(65535)
            except BlockingIOError:
                return
            ihl = (pkt[0] & 0x0F) * 4
            if len(pkt) >= ihl + 20:
                src_port, dst_port = struct.unpack("!HH", pkt[ihl : ihl + 4])
                tag = struct.unpack("!I", pkt[ihl + 16 : ihl + 20])[0]
                self.seen.add((src, dst_port, tag))
                self.sources.add((src, src_port, tag))

    def close(self) -> None:
        self.sock.close()


async def sctp_reaches(
    src_netns: str,
    dst_ip: str,
    port: int,
    catcher: SctpCatcher,
    timeout: float = 0.5,
    bind: str | None = None,
) -> bool:
    """Send INITs from ``src_netns``; True when the catcher at the destination saw one."""
    tag = int.from_bytes(os.urandom(4), "big") | 1
    sock = netns_socket(src_netns, socket.AF_INET, socket.SOCK_RAW, IPPROTO_SCTP)
    try:
        if bind:
            sock.bind((bind, 0))
        for _ in range(3):
            sock.sendto(init_packet(40000 + tag % 20000, port, tag), (dst_ip, 0))
            deadline = asyncio.get_running_loop().time() + timeout / 3
            while asyncio.get_running_loop().time() < deadline:
                catcher.drain()
                if any(p == port and t == tag for _, p, t in catcher.seen):
                    return True
                await asyncio.sleep(0.01)
        return False
    finally:
        sock.close()
