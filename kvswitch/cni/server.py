"""The CNI server: serves ``k-vswitch-cni`` calls on a unix socket from a warm process.

The node agent hosts it as an asyncio task (``asyncio.create_task(server.serve_forever())``,
cancel to stop); ``k-vswitch-cni-server`` runs it standalone; :class:`ServerThread` hosts it on
a private event loop in a thread (tests, benchmarks). Calls run concurrently; one CniPlugin
holds the ovsdb connections for all of them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
import threading
import time
from pathlib import Path

from kvswitch import metrics
from kvswitch.cni.client import MAX_MESSAGE, Reply, decode_request, encode_reply
from kvswitch.cni.contract import DEFAULT_SERVER_SOCKET
from kvswitch.cni.plugin import AttachHook, CniPlugin
from kvswitch.cni.spec import CniError, Code

log = logging.getLogger(__name__)


class CniServer:
    """Listen on ``socket_path`` and answer each connection with one CNI call's reply."""

    def __init__(
        self,
        socket_path: str | os.PathLike[str] = DEFAULT_SERVER_SOCKET,
        *,
        host_netns: str | None = None,
        max_concurrent: int = 64,
        stop_grace: float = 10.0,
        defer_veth_delete: bool = True,
        attached: AttachHook | None = None,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.attached = attached
        self.host_netns = host_netns
        self.defer_veth_delete = defer_veth_delete
        self.stop_grace = stop_grace
        self._max_concurrent = max_concurrent
        self._server: asyncio.Server | None = None
        self._plugin: CniPlugin | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._sem: asyncio.Semaphore | None = None
        self._inode: int | None = None

    @property
    def serving(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        """Bind the socket (replacing a stale one, refusing a live one) and start serving."""
        if self._server is not None:
            return
        self.socket_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.socket_path.exists() or self.socket_path.is_symlink():
            if _answers(self.socket_path):
                raise RuntimeError(f"another CNI server is serving {self.socket_path}")
            self.socket_path.unlink()
        self._plugin = CniPlugin(
            host_netns=self.host_netns,
            via_server=True,
            defer_veth_delete=self.defer_veth_delete,
            attached=self.attached,
        )
        self._sem = asyncio.Semaphore(self._max_concurrent)
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.socket_path))
        os.chmod(self.socket_path, 0o600)
        self._inode = self.socket_path.stat().st_ino
        log.info("CNI server listening on %s", self.socket_path)

    async def stop(self) -> None:
        """Stop accepting, let calls in flight finish (then cancel them), release everything."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        if self._inflight:
            _, pending = await asyncio.wait(set(self._inflight), timeout=self.stop_grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=self.stop_grace)
        with contextlib.suppress(OSError):
            if self.socket_path.stat().st_ino == self._inode:  # never remove a successor's socket
                self.socket_path.unlink()
        if self._plugin is not None:
            await self._plugin.close()
            self._plugin = None
        log.info("CNI server on %s stopped", self.socket_path)

    async def drain(self) -> None:
        """Wait until work that outlives its reply (deferred veth deletions) is done."""
        if self._plugin is not None:
            await self._plugin.drain()

    async def serve_forever(self) -> None:
        """Serve until cancelled; stops cleanly on the way out."""
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.shield(self.stop())

    async def __aenter__(self) -> CniServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._inflight.add(task)
        try:
            reply = await self._answer(reader)
            writer.write(encode_reply(reply))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            log.warning("client went away: %s", exc)
        finally:
            self._inflight.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader) -> Reply:
        chunks: list[bytes] = []
        size = 0
        while chunk := await reader.read(1 << 16):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_MESSAGE:
                return _error_reply(CniError(Code.IO_FAILURE, "request too large"))
        try:
            env, stdin = decode_request(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as exc:
            return _error_reply(CniError(Code.IO_FAILURE, "malformed request from k-vswitch-cni", str(exc)))
        assert self._plugin is not None and self._sem is not None
        command = metrics.cni_command(env.get("CNI_COMMAND"))
        async with self._sem:
            started = time.perf_counter()
            reply = await self._plugin.handle(env, stdin)
        metrics.CNI_DURATION.labels(command=command).observe(time.perf_counter() - started)
        if reply.code != 0:
            metrics.CNI_ERRORS.labels(command=command, code=metrics.cni_error_code(reply.stdout)).inc()
        log.debug(
            "%s %s/%s: exit %d in %.1f ms",
            env.get("CNI_COMMAND"),
            env.get("CNI_CONTAINERID", "-"),
            env.get("CNI_IFNAME", "-"),
            reply.code,
            (time.perf_counter() - started) * 1000,
        )
        return reply


def _error_reply(err: CniError) -> Reply:
    return Reply(1, err.to_json().encode() + b"\n")


def _answers(path: Path) -> bool:
    """True when something accepts connections on the unix socket ``path``."""
    try:
        if not stat.S_ISSOCK(path.stat().st_mode):
            return False
    except OSError:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


class ServerThread:
    """A :class:`CniServer` on its own event loop in a daemon thread; ``with`` starts and stops it."""

    def __init__(self, server: CniServer) -> None:
        self.server = server
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self, timeout: float = 10.0) -> ServerThread:
        self._thread = threading.Thread(target=self._run, name="kvs-cni-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"CNI server on {self.server.socket_path} did not start in {timeout}s")
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            try:
                await self.server.start()
            except BaseException as exc:
                self._error = exc
                self._ready.set()
                return
            self._task = asyncio.current_task()
            self._ready.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                pass
            finally:
                await self.server.stop()

        asyncio.run(main())

    def drain(self, timeout: float = 30.0) -> None:
        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(self.server.drain(), self._loop).result(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        if self._loop is not None and self._task is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._task.cancel)
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """``k-vswitch-cni-server``: run the CNI server standalone (the agent normally hosts it)."""
    parser = argparse.ArgumentParser(prog="k-vswitch-cni-server", description=main.__doc__)
    parser.add_argument("--socket", default=DEFAULT_SERVER_SOCKET, help="unix socket to listen on")
    parser.add_argument("--host-netns", default=None, help="path of the node's network namespace")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")

    async def run() -> None:
        server = CniServer(args.socket, host_netns=args.host_netns)
        task = asyncio.create_task(server.serve_forever())
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
