"""``k-vswitch-cni``: the executable a container runtime runs for every pod (CNI 1.1.0).

It stays thin so that a pod start does not pay for Python libraries: it reads the call, forwards
it to the CNI server the node agent hosts on a unix socket (libraries loaded, ovsdb connection
open) and prints the reply. Only when no server answers does it load the implementation and run
the call itself, so pods can still be wired while the agent restarts. Imports here must stay
standard library (a test checks ``-X importtime``).
"""

from __future__ import annotations

import os
import sys

from kvswitch.cni import client, contract, spec


def peek(stdin: bytes) -> dict[str, object]:
    """The netconf as far as this thin layer needs it ({} when it does not decode)."""
    try:
        conf = spec.loads(stdin.decode())
    except (ValueError, UnicodeDecodeError):
        return {}
    return conf if isinstance(conf, dict) else {}


def server_socket(conf: dict[str, object]) -> str:
    """The socket named by the netconf's ``serverSocket`` ("" disables the server)."""
    path = conf.get("serverSocket")
    return path if isinstance(path, str) else contract.DEFAULT_SERVER_SOCKET


def run_in_process(env: dict[str, str], stdin: bytes) -> client.Reply:
    """Load the full implementation (site-packages too, when started with -S) and run the call."""
    try:
        if sys.flags.no_site:
            import site

            site.main()
        from kvswitch.cni.plugin import run_once

        return run_once(env, stdin)
    except Exception as exc:  # the runtime must get a CNI error, never a traceback alone
        err = spec.CniError(spec.Code.INTERNAL, "k-vswitch-cni failed to run in-process", repr(exc))
        return client.Reply(1, err.to_json().encode() + b"\n")


def handle(env: dict[str, str], stdin: bytes) -> client.Reply:
    if env.get("CNI_COMMAND") == "VERSION":
        try:
            return client.Reply(0, spec.version_reply(stdin).encode() + b"\n")
        except spec.CniError as err:
            return client.Reply(1, err.to_json().encode() + b"\n")
    conf = peek(stdin)
    path = server_socket(conf)
    if path:
        try:
            return client.call(path, env, stdin)
        except client.ServerUnavailable:
            pass
        except client.ServerLost as exc:
            lost = spec.CniError(
                spec.Code.TRY_AGAIN_LATER, "lost the connection to the k-vswitch CNI server", str(exc)
            )
            version = conf.get("cniVersion")
            return client.Reply(
                1, lost.to_json(version if isinstance(version, str) else None).encode() + b"\n"
            )
    return run_in_process(env, stdin)


def main() -> int:
    env = spec.cni_env(os.environ)
    try:
        stdin = sys.stdin.buffer.read()
    except (OSError, AttributeError, ValueError) as exc:
        err = spec.CniError(
            spec.Code.IO_FAILURE, "cannot read the network configuration from stdin", str(exc)
        )
        reply = client.Reply(1, err.to_json().encode() + b"\n")
    else:
        try:
            reply = handle(env, stdin)
        except Exception as exc:  # a CNI error object, never only a traceback
            err = spec.CniError(spec.Code.INTERNAL, "k-vswitch-cni failed", repr(exc))
            reply = client.Reply(1, err.to_json().encode() + b"\n")
    sys.stdout.buffer.write(reply.stdout)
    sys.stdout.flush()
    if reply.stderr:
        sys.stderr.buffer.write(reply.stderr)
        sys.stderr.flush()
    return reply.code


if __name__ == "__main__":
    sys.exit(main())
