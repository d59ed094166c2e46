"""Talk to the CNI server over its unix socket; standard library only (``_socket``, not ``socket``).

Wire format, one request per connection (the client half-closes after sending)::

    request: b"KVSCNI1 <len(env)>\\n" + env + stdin      env = b"\\0".join(b"KEY=VALUE", ...)
    reply:   b"KVSCNI1 <exit code> <len(stdout)>\\n" + stdout + stderr

Length-prefixed bytes rather than JSON so that the client never serialises anything: the
runtime's stdin goes through untouched and the reply is printed as the server wrote it.
"""

from __future__ import annotations

import _socket

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

MAGIC = b"KVSCNI1"
MAX_MESSAGE = 64 * 1024 * 1024
DEFAULT_TIMEOUT = 240.0


class Reply:
    """What the plugin process must do: print ``stdout``, log ``stderr``, exit with ``code``."""

    __slots__ = ("code", "stderr", "stdout")

    def __init__(self, code: int, stdout: bytes, stderr: bytes = b"") -> None:
        self.code = code
        self.stdout = stdout
        self.stderr = stderr

    def __repr__(self) -> str:
        return f"Reply(code={self.code}, stdout={self.stdout!r}, stderr={self.stderr!r})"


class ServerUnavailable(Exception):
    """Nobody listens on the socket: the caller may run the request itself."""


class ServerLost(Exception):
    """The server took the request and then broke off: it may have been half-done there."""


def encode_request(env: Mapping[str, str], stdin: bytes) -> bytes:
    block = b"\0".join(f"{k}={v}".encode() for k, v in env.items())
    return MAGIC + b" " + str(len(block)).encode() + b"\n" + block + stdin


def decode_request(data: bytes) -> tuple[dict[str, str], bytes]:
    head, sep, rest = data.partition(b"\n")
    parts = head.split(b" ")
    if not sep or len(parts) != 2 or parts[0] != MAGIC or not parts[1].isdigit():
        raise ValueError("not a k-vswitch CNI request")
    n = int(parts[1])
    if n > len(rest):
        raise ValueError("truncated k-vswitch CNI request")
    env: dict[str, str] = {}
    for item in rest[:n].split(b"\0") if n else []:
        key, eq, value = item.decode(errors="surrogateescape").partition("=")
        if not eq:
            raise ValueError(f"bad environment entry {key!r}")
        env[key] = value
    return env, rest[n:]


def encode_reply(reply: Reply) -> bytes:
    return MAGIC + f" {reply.code} {len(reply.stdout)}\n".encode() + reply.stdout + reply.stderr


def decode_reply(data: bytes) -> Reply:
    head, sep, rest = data.partition(b"\n")
    parts = head.split(b" ")
    if not sep or len(parts) != 3 or parts[0] != MAGIC:
        raise ValueError("not a k-vswitch CNI reply")
    code, n = int(parts[1]), int(parts[2])
    if n > len(rest):
        raise ValueError("truncated k-vswitch CNI reply")
    return Reply(code, rest[:n], rest[n:])


def call(path: str, env: Mapping[str, str], stdin: bytes, timeout: float = DEFAULT_TIMEOUT) -> Reply:
    """Send one CNI call to the server at ``path``.

    Raises :class:`ServerUnavailable` when it cannot connect (nothing was sent, running the call
    in-process is safe) and :class:`ServerLost` when the connection broke after sending.
    """
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as exc:
            raise ServerUnavailable(f"{path}: {exc.strerror or exc}") from None
        try:
            sock.sendall(encode_request(env, stdin))
            sock.shutdown(_socket.SHUT_WR)
            chunks = []
            size = 0
            while chunk := sock.recv(1 << 16):
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_MESSAGE:
                    raise ServerLost("reply too large")
            return decode_reply(b"".join(chunks))
        except (OSError, ValueError) as exc:
            raise ServerLost(f"{path}: {exc}") from None
    finally:
        sock.close()
