"""The client side of :mod:`snapsync.protocol`: one method per operation, one session per call.

Failures come back typed: :class:`TransientError` when the transport says the connection itself
failed (retried by the caller), :class:`RemoteRefused` when the server refused, :class:`UnexpectedAnswer`
when it answered in another role than this side needs (the key's ``authorized_keys`` line) or in a
shape it cannot read, and :class:`BackendError` with the server's message otherwise (a full disk, a
failed receive); a failure from a server in the wrong role says so too. Every answer is checked
here, so a caller never meets a field that is not there.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from snapsync.backends.base import SnapshotInfo
from snapsync.backends.receiver import Copy, PartialDelete, PartialReceive
from snapsync.errors import BackendError, CommandFailed, RemoteRefused, TransientError, printable
from snapsync.protocol import MAX_NAMES, RESTORE_OPTION, Refused, check_name, encode_request
from snapsync.host.safefs import KINDS
from snapsync.host.streams import Meter, Proc, cut_off, finish, pump
from snapsync.replication.transport import Transport

CALL_TIMEOUT = 600.0


class UnexpectedAnswer(BackendError):
    """The far end answered, but not as this side needs: another role, or a shape it cannot read.
    It fails that target (or pull, or restore), never the run."""


_ENTRIES: dict[str, Callable[[dict[str, Any]], object]] = {
    "receive": Copy.from_json,  # a receiving root lists copies
    "send": lambda entry: SnapshotInfo.from_json("", entry),  # a sending one, snapshots
}


@dataclass(frozen=True)
class _Listed:
    role: str
    restore: bool
    """Whether the server hands out what it lists (``send``): always for the send role."""
    paths: dict[str, list[dict[str, Any]]]
    resume: dict[str, str]


def _parses(role: str, listed: dict[str, list[Any]]) -> bool:
    """Whether every entry is what a server in ``role`` lists (and so what the caller will read)."""
    parse = _ENTRIES[role]
    try:
        for entries in listed.values():
            for entry in entries:
                if not isinstance(entry, dict):
                    return False
                parse(entry)
    except (KeyError, TypeError, ValueError, AttributeError):
        return False
    return True


@dataclass(frozen=True)
class FileSeen:
    """A file as one snapshot on the far side holds it (a ``stat`` answer's entry)."""

    name: str
    created: datetime
    kind: str
    size: int
    mtime_ns: int

    @classmethod
    def from_json(cls, data: object) -> FileSeen:
        if not isinstance(data, dict) or set(data) != {"name", "created", "kind", "size", "mtime_ns"}:
            raise ValueError("not a version")
        size, mtime = data["size"], data["mtime_ns"]
        if type(size) is not int or type(mtime) is not int or size < 0 or abs(mtime) >= 1 << 63 or data["kind"] not in KINDS:
            raise ValueError("not a version")
        created = datetime.strptime(str(data["created"]), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        return cls(check_name(data["name"]), created, str(data["kind"]), size, mtime)


SIZE_FIGURES = frozenset({"used", "written", "exclusive", "shared", "referenced"})


def _figures(value: object) -> dict[str, int]:
    if not isinstance(value, dict) or set(value) - SIZE_FIGURES or not all(type(v) is int and 0 <= v < 1 << 63 for v in value.values()):
        raise ValueError("not figures")
    return {str(k): int(v) for k, v in value.items()}


class Peer:
    def __init__(self, transport: Transport, role: str = "receive", *, restore: bool = False) -> None:
        """``role``: the one this side needs, as the far end's ``serve --role`` (for a local target,
        the one started). ``restore``: this side reads copies back (a restore, a drill), which a
        receive-role server serves too when its key may restore (``--allow-restore``)."""
        self.transport = transport
        self.role = role
        self.restore = restore

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
            message = f"{where}: {op}: {printable(str(response.get('error')))}"
            role = response.get("role")
            if isinstance(role, str) and not self._serves(role, response.get("restore") is True):
                message += f"; {self._role_problem(role)}"  # the cause, whatever the server found wrong in its role
            if response.get("kind") == "refused":
                return RemoteRefused(message)
            deleted = response.get("deleted")
            if op == "delete" and isinstance(deleted, list) and all(isinstance(n, str) for n in deleted):
                return PartialDelete(message, deleted)  # it went on past a refusal: these did go
            received = response.get("received")
            if op == "receive" and isinstance(received, list) and received and all(isinstance(n, str) for n in received):
                return PartialReceive(message, received)  # a chain that stopped: these arrived whole
            return BackendError(message)
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
        """Entries per path, and the ZFS resume token of each path that has an interrupted receive.

        Entries are copies for the receive role, snapshots for the send role; each one parses as
        such, and the server answers in the role this side needs, or :class:`UnexpectedAnswer`."""
        listed = self._list(paths)
        if listed.role != self.role:
            raise self._wrong_role(listed.role)
        return listed.paths, listed.resume

    def _serves(self, role: str, restore: bool) -> bool:
        return role == self.role or (self.restore and role == "receive" and restore)

    def readable(self, paths: Sequence[str]) -> dict[str, set[str]]:
        """Per path, the names a ``send`` session hands out (complete, read-only snapshots or copies),
        from a send-role server or a receive-role one that serves restores."""
        listed = self._list(paths)
        if not self._serves(listed.role, listed.restore):
            raise self._wrong_role(listed.role)
        if listed.role == "receive":
            return {p: {str(c["name"]) for c in cs if c["read_only"] and not c["partial"]} for p, cs in listed.paths.items()}
        return {
            p: {str(s["name"]) for s in ss if s.get("kind", "snapshot") == "snapshot" and s.get("read_only", True)}
            for p, ss in listed.paths.items()
        }

    def _list(self, paths: Sequence[str]) -> _Listed:
        """One ``list``, checked: every entry parses as what the answering role lists."""
        response = self.call("list", paths=list(paths))
        listed, resume = response.get("paths"), response.get("resume") or {}
        if not isinstance(listed, dict) or not all(isinstance(v, list) for v in listed.values()):
            raise self._unexpected("list", "no list of entries per path")
        if not isinstance(resume, dict) or not all(isinstance(t, str) for t in resume.values()):
            raise self._unexpected("list", "resume tokens that are not strings")
        role = response.get("role")
        if role is None:  # a server older than role-naming answers: the entries tell
            role = next((r for r in (self.role, "receive", "send") if _parses(r, listed)), self.role)
        if not isinstance(role, str) or role not in _ENTRIES:
            raise self._unexpected("list", f"an unknown role {printable(str(role), 40)!r}")
        if not _parses(role, listed):
            raise self._unexpected("list", f"entries that are not {'copies' if role == 'receive' else 'snapshots'}")
        restore = response.get("restore", role == "send") is True
        return _Listed(role, restore, listed, resume)

    def _wrong_role(self, role: str) -> UnexpectedAnswer:
        return UnexpectedAnswer(f"target {self.name} ({self.transport.describe()}): {self._role_problem(role)}")

    def _role_problem(self, role: str) -> str:
        """What is wrong with a server in ``role`` for this side, and where to fix it."""
        if self.restore and role == "receive":
            return (
                f"this host's key there may only receive copies, not read them back: add {RESTORE_OPTION} to its "
                f"line in the backup host's authorized_keys (snapsync authorize --role receive {RESTORE_OPTION} ...)"
            )
        if self.role == "receive":
            return (
                f"the backup host answers as role {role}; its authorized_keys line for this host must use "
                f"--role receive for replication"
            )
        return f"the source host answers as role {role}; its authorized_keys line for this host must use --role {self.role} to be pulled from"

    def _unexpected(self, op: str, what: str) -> UnexpectedAnswer:
        return UnexpectedAnswer(
            f"target {self.name} ({self.transport.describe()}): {op}: cannot read the answer: {what} "
            f"(not snapsync serve, or another version of it)"
        )

    def sizes(self, paths: Sequence[str]) -> dict[str, tuple[dict[str, dict[str, int]], str | None]]:
        """What each copy of ``paths`` costs on the far side (names checked, figures whole bytes), and
        the far filesystem's note where it cannot count (btrfs quotas off there)."""
        response = self.call("sizes", paths=list(paths))
        sizes, notes = response.get("sizes"), response.get("notes", {})
        try:
            if not isinstance(sizes, dict) or not isinstance(notes, dict) or set(sizes) - set(paths) or set(notes) - set(paths):
                raise ValueError
            return {p: ({check_name(n): _figures(f) for n, f in sizes.get(p, {}).items()},
                        printable(str(notes[p]), 300) if p in notes else None) for p in paths}
        except (AttributeError, TypeError, ValueError, Refused):
            raise self._unexpected("sizes", "no figures per copy") from None

    def stat(self, path: str, file: str) -> tuple[list[FileSeen], int]:
        """``file`` in each readable snapshot or copy of ``path``, newest first, checked entry by entry
        (the far side is not trusted to answer in shape); and how many it could not read in place."""
        response = self.call("stat", path=path, file=file)
        found, unreadable = response.get("found"), response.get("unreadable", 0)
        if not isinstance(found, list) or len(found) > MAX_NAMES or type(unreadable) is not int or unreadable < 0:
            raise self._unexpected("stat", "no list of versions")
        try:
            return [FileSeen.from_json(entry) for entry in found], unreadable
        except (KeyError, TypeError, ValueError, Refused):
            raise self._unexpected("stat", "a version that is not name, created, kind, size and mtime_ns") from None

    def delete(self, path: str, names: Sequence[str], *, allow_writable: bool = False, partial: bool = False) -> list[str]:
        """Delete copies; ``partial=True`` with no names abandons a ZFS resumable receive."""
        if not names and not partial:
            return []
        deleted = self.call("delete", path=path, names=list(names), allow_writable=allow_writable, partial=partial).get("deleted")
        if not isinstance(deleted, list) or not all(isinstance(n, str) for n in deleted):
            raise self._unexpected("delete", "no list of deleted names")
        return deleted

    def hold(self, path: str, tag: str, names: Sequence[str]) -> None:
        self.call("hold", path=path, tag=tag, names=list(names))

    def receive(
        self, path: str, name: str, guid: str, compress: str, senders: Sequence[Proc], meter: Meter, force: bool = False,
        then: Sequence[tuple[str, str]] = (),
    ) -> dict[str, Any]:
        """One snapshot's stream into a receive session; with ``then``, a chain: the streams of those
        snapshots follow, each built on the one before (:class:`PartialReceive` if it stops part way)."""
        args: dict[str, Any] = {"path": path, "name": name, "guid": guid, "compress": compress}
        if force:
            args["force"] = True
        if then:
            args["then"] = [{"name": n, "guid": g} for n, g in then]
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
        if not isinstance(header.get("name"), str) or not isinstance(header.get("guid"), str):
            proc.kill()
            proc.wait()
            proc.close()
            raise self._unexpected("send", "no snapshot name and guid before the stream")
        return proc, header


def _decode(raw: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(raw.decode().strip().splitlines()[-1]) if raw.strip() else None
    except (UnicodeDecodeError, ValueError, IndexError):
        return None
    return data if isinstance(data, dict) else None
