"""The client side of :mod:`snapsync.protocol`: one method per operation, one session per call.

Failures come back typed: :class:`TransientError` when the transport says the connection itself
failed (retried by the caller), :class:`RemoteRefused` when the server refused, and
:class:`BackendError` with the server's message otherwise (a full disk, a failed receive).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

from snapsync.errors import BackendError, CommandFailed, RemoteRefused, TransientError
from snapsync.protocol import encode_request
from snapsync.host.streams import Meter, Proc, cut_off, finish, pump
from snapsync.replication.transport import Transport

CALL_TIMEOUT = 600.0


class Peer:
    def __init__(self, transport: Transport, role: str = "receive") -> None:
        self.transport = transport
        self.role = role

    @property
    def name(self) -> str:
        return self.transport.name

    def connected(self) -> AbstractContextManager[None]:
        """Share one connection among this run's sessions (ssh multiplexing); nothing for local."""
        return self.transport.multiplexed()

    def _fail(self, op: str, proc: Proc, returncode: int, raw: bytes) -> BackendError:
        stderr = proc.stderr_tail()
        response = _decode(raw)
        where = f"target {self.name} ({self.transport.describe()})"
        if response is not None and not response.get("ok", False):
            message = f"{where}: {op}: {response.get('error')}"
            return RemoteRefused(message) if response.get("kind") == "refused" else BackendError(message)
        tail = " | ".join(stderr.strip().splitlines()[-3:]) or "(no output)"
        if self.transport.transient(returncode, stderr):
            if not stderr.strip():  # ssh's own exit with nothing said: the session's connection went away
                return TransientError(
                    f"{where}: {op}: ssh connection lost (exit {returncode}): the session ended without an exit status"
                )
            return TransientError(f"{where}: {op}: connection failed: {tail}")
        if returncode == 0:
            return BackendError(f"{where}: {op}: no answer from snapsync serve: {tail}")
        return BackendError(f"{where}: {op}: session exited {returncode}: {tail}")

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        """A request without a stream; returns the server's answer or raises."""
        proc = Proc.start(self.transport.argv(self.role), stdin=subprocess.PIPE, stdout=subprocess.PIPE, label="ssh")
        try:
            try:
                raw, _ = proc.popen.communicate(encode_request(op, **args), timeout=CALL_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise TransientError(f"target {self.name}: {op}: no answer within {CALL_TIMEOUT:g}s") from None
            response = _decode(raw)
            if proc.popen.returncode != 0 or response is None or not response.get("ok"):
                raise self._fail(op, proc, proc.popen.returncode, raw)
            return response
        finally:
            proc.close()

    def hello(self) -> dict[str, Any]:
        return self.call("hello")

    def list_paths(self, paths: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
        return self.listing(paths)[0]

    def listing(self, paths: Sequence[str]) -> tuple[dict[str, list[dict[str, Any]]], dict[str, str]]:
        """Entries per path, and the ZFS resume token of each path that has an interrupted receive."""
        response = self.call("list", paths=list(paths))
        return response["paths"], dict(response.get("resume") or {})

    def delete(self, path: str, names: Sequence[str], *, allow_writable: bool = False, partial: bool = False) -> list[str]:
        """Delete copies; ``partial=True`` with no names abandons a ZFS resumable receive."""
        if not names and not partial:
            return []
        deleted: list[str] = self.call(
            "delete", path=path, names=list(names), allow_writable=allow_writable, partial=partial
        )["deleted"]
        return deleted

    def hold(self, path: str, tag: str, names: Sequence[str]) -> None:
        self.call("hold", path=path, tag=tag, names=list(names))

    def receive(
        self, path: str, name: str, guid: str, compress: str, senders: Sequence[Proc], meter: Meter, force: bool = False
    ) -> dict[str, Any]:
        args: dict[str, Any] = {"path": path, "name": name, "guid": guid, "compress": compress}
        if force:
            args["force"] = True
        return self._stream("receive", args, senders, meter)

    def resume(self, path: str, compress: str, senders: Sequence[Proc], meter: Meter) -> dict[str, Any]:
        """Feed a ``zfs send -t`` stream into the target's interrupted receive; answers with its name."""
        return self._stream("resume", {"path": path, "compress": compress}, senders, meter)

    def _stream(self, op: str, args: dict[str, Any], senders: Sequence[Proc], meter: Meter) -> dict[str, Any]:
        """Stream the last sender's stdout into a receive session; check every process.

        The sender pipeline is started by the caller; this owns it from here on and waits for it.
        A sender that failed is the root cause even when the receiver also failed (it saw a cut
        stream), so its error wins.
        """
        feed = senders[-1].popen.stdout
        assert feed is not None
        session = Proc.start(self.transport.argv(self.role), stdin=subprocess.PIPE, stdout=subprocess.PIPE, label="ssh")
        assert session.popen.stdin is not None and session.popen.stdout is not None
        try:
            try:
                session.popen.stdin.write(encode_request(op, **args))
                session.popen.stdin.flush()
                pump(feed.fileno(), session.popen.stdin.fileno(), meter)
            except BrokenPipeError:
                pass  # the session ended early; its answer and exit status say why
            finally:
                feed.close()  # a sender still writing now gets EPIPE instead of blocking forever
                try:
                    session.popen.stdin.close()
                except BrokenPipeError:
                    pass
            raw = session.popen.stdout.read()
            returncode = session.wait()
            sender_error: CommandFailed | None = None
            try:
                finish(senders)
            except CommandFailed as e:
                sender_error = e
            response = _decode(raw)
            session_failed = returncode != 0 or response is None or not response.get("ok")
            if sender_error is not None and not (session_failed and cut_off(sender_error.returncode, sender_error.stderr)):
                raise sender_error
            if session_failed or response is None:
                raise self._fail(op, session, returncode, raw)
            return response
        finally:
            for p in senders:
                p.kill()
                p.wait()
            session.kill()
            session.wait()
            session.close()

    def open_send(
        self, path: str, name: str | None, base: str | None, compress: str, token: str | None = None
    ) -> tuple[Proc, dict[str, Any]]:
        """Start a send session (pull); returns it with the header, its stdout positioned at the stream."""
        proc = Proc.start(self.transport.argv(self.role), stdin=subprocess.PIPE, stdout=subprocess.PIPE, label="ssh")
        assert proc.popen.stdin is not None and proc.popen.stdout is not None
        args: dict[str, Any] = {"path": path, "name": name, "base": base, "compress": compress}
        if token is not None:
            args["token"] = token
        try:
            proc.popen.stdin.write(encode_request("send", **args))
            proc.popen.stdin.close()
        except BrokenPipeError:
            pass
        fd = proc.popen.stdout.fileno()
        raw = bytearray()
        while not raw.endswith(b"\n") and len(raw) < 65536:
            byte = os.read(fd, 1)
            if not byte:
                break
            raw += byte
        header = _decode(bytes(raw))
        if header is None or not header.get("ok"):
            returncode = proc.wait()
            error = self._fail("send", proc, returncode, bytes(raw))
            proc.close()
            raise error
        return proc, header


def _decode(raw: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(raw.decode().strip().splitlines()[-1]) if raw.strip() else None
    except (UnicodeDecodeError, ValueError, IndexError):
        return None
    return data if isinstance(data, dict) else None
