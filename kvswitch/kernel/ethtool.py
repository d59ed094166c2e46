"""The one ethtool setting k-vswitch needs, as a plain ioctl (no ethtool binary, no library)."""

from __future__ import annotations

import array
import fcntl
import socket
import struct

SIOCETHTOOL = 0x8946
ETHTOOL_STXCSUM = 0x17


def tx_checksum_off(sock: socket.socket, ifname: str) -> None:
    """``ethtool -K IFNAME tx off``: OVS's userspace datapath does not fill in offloaded checksums.

    ``sock`` is any AF_INET datagram socket of the namespace that holds ``ifname``.
    """
    value = array.array("I", [ETHTOOL_STXCSUM, 0])
    ifr = struct.pack("16sP", ifname.encode(), value.buffer_info()[0])
    fcntl.ioctl(sock.fileno(), SIOCETHTOOL, ifr)
