"""``snapsync serve``: the far end of replication, run as an ssh forced command (or a local subprocess).

One session answers one request (see :mod:`snapsync.protocol`). The role fixed on the command line
decides which operations exist at all, and ``--root`` confines every path: a key for the receive
role can add copies below its root and prune them, nothing else (with ``--allow-restore`` it may also
read those copies back: restores, drills, ``versions --targets``); a key for the send role can read
snapshots below its root. Both roles act through the root's receiver and source backend from
:mod:`snapsync.backends`, and change nothing on the filesystem themselves. No shell is ever
involved: sshd runs the forced command, and the backends run their tools and ``zstd`` with
argument lists.
"""

from __future__ import annotations

import os
import select
import sys
import time
from pathlib import PurePosixPath
from typing import Any, NoReturn

from snapsync.backends import receiver_for, source_for_place
from snapsync.backends.base import StorageBackend
from snapsync.backends.receiver import PartialDelete, PartialReceive
from snapsync.errors import EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, BackendError, DatasetMissing, SnapsyncError, UsageError
from snapsync.host.safefs import kind_of, lookup
from snapsync.host.streams import Proc, finish
from snapsync.plan.holds import is_pull_tag
from snapsync.protocol import MAX_REQUEST, RESTORE_OPTION, VERSION, Refused, Role, encode_response, parse_request

REQUEST_TIMEOUT = 60.0
STALL_TIMEOUT = 600.0


def read_request(fd: int = 0, timeout: float = REQUEST_TIMEOUT) -> bytes:
    """One line from ``fd`` without reading past it: the send stream follows on the same descriptor.

    Bounded in time as in size: a client that never finishes its line must not hold the session
    (and the directory lock a receive takes) forever."""
    buf = bytearray()
    deadline = time.monotonic() + timeout
    while len(buf) < MAX_REQUEST:  # the newline counts too
        if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            raise Refused(f"no complete request line within {timeout:g}s")
        byte = os.read(fd, 1)
        if not byte:
            if not buf:
                raise Refused("no request (empty input)")
            raise Refused("request line not terminated by a newline")
        if byte == b"\n":
            return bytes(buf)
        buf += byte
    raise Refused(f"request longer than {MAX_REQUEST} bytes")


def _say(payload: bytes) -> None:
    view = memoryview(payload)
    while view:
        view = view[os.write(1, view) :]


def _kind(error: Exception) -> str:
    text = str(error)
    if "No space left on device" in text or "ENOSPC" in text:
        return "no_space"
    return "failed"


class Server:
    def __init__(
        self, root: str, role: Role, snapshot_dir: str = ".snapsync", append_only: bool = False,
        stall: float = STALL_TIMEOUT, restore: bool = False,
    ) -> None:
        self.root = root
        self.role = role
        self.restore = restore
        self.append_only = append_only
        self.stall = stall
        self.receiver = receiver_for(root, append_only=append_only, stall=stall)
        self.backend = source_for_place(root, snapshot_dir)

    def handle(self, fd: int = 0) -> int:
        """Serve one request; always answer with one JSON line (or a header before a stream).

        A failure says the role too: a client whose key has another role than it needs is told so,
        not just that a path or an operation was refused."""
        about = {"role": self.role, "restore": self.readable}
        try:
            try:
                self.receiver.check_root()
            except BackendError as e:
                raise Refused(str(e)) from e
            request = parse_request(read_request(fd, min(REQUEST_TIMEOUT, self.stall)), self.role, self.restore)
            result = getattr(self, f"op_{request.op}")(fd=fd, **request.args)
        except Refused as e:
            return _refuse(e, **about)
        except SnapsyncError as e:
            print(f"snapsync serve: {e}", file=sys.stderr)
            done: dict[str, Any] = {"deleted": e.deleted} if isinstance(e, PartialDelete) else {}  # it went on past a refusal
            if isinstance(e, PartialReceive):
                done = {"received": e.received}  # these arrived whole before it stopped
            _say(encode_response(False, error=str(e), kind=_kind(e), **about, **done))
            return EXIT_PARTIAL
        except OSError as e:
            print(f"snapsync serve: {e}", file=sys.stderr)
            _say(encode_response(False, error=str(e), kind=_kind(e), **about))
            return EXIT_PARTIAL
        if result is not None:
            _say(encode_response(True, **result))
        return EXIT_OK

    def op_hello(self, fd: int) -> dict[str, Any]:
        from snapsync import __version__

        return {
            "protocol": VERSION,
            "version": __version__,
            "role": self.role,
            "restore": self.readable,
            "root": str(self.root),
            "backend": self.backend.kind,
            "append_only": self.append_only,
        }

    @property
    def readable(self) -> bool:
        """Whether ``send`` is served: the client of a restore or drill learns it from any answer."""
        return self.role == "send" or self.restore

    def op_list(self, fd: int, paths: list[str]) -> dict[str, Any]:
        """Copies (receive role) or snapshots (send role), saying which: the two look alike to a
        client whose key was authorized for the other role, and must not be taken for each other."""
        if self.role == "receive":
            listed = {p: self.receiver.listing(p) for p in paths}
            return {
                "role": self.role, "restore": self.readable,
                "paths": {p: [c.to_json() for c in copies] for p, (copies, _) in listed.items()},
                "resume": {p: token for p, (_, token) in listed.items() if token is not None},
            }
        snapshots: dict[str, list[dict[str, object]]] = {}
        for p in paths:
            dataset, backend = self._dataset(p)
            snapshots[p] = [s.to_json() for s in backend.list_snapshots(dataset)]
        return {"role": self.role, "restore": self.readable, "paths": snapshots}

    def op_sizes(self, fd: int, paths: list[str]) -> dict[str, Any]:
        """What each copy (or snapshot) of ``paths`` costs, as the filesystem here counts it (``list
        --sizes``): figures only, in either role, as ``list`` names the copies in either."""
        sizes: dict[str, dict[str, dict[str, int]]] = {}
        notes: dict[str, str] = {}
        for p in paths:
            try:
                dataset, backend = self._dataset(p)
            except DatasetMissing:
                sizes[p] = {}
                continue
            counted = backend.snapshot_sizes(dataset)
            sizes[p] = counted.sizes
            if counted.note:
                notes[p] = counted.note
        return {"sizes": sizes, "notes": notes}

    def op_receive(
        self, fd: int, path: str, name: str, guid: str, compress: str, force: bool, then: list[dict[str, str]],
    ) -> dict[str, Any]:
        if then and not self.receiver.capabilities.chained_send:
            raise Refused(f"this {self.receiver.kind} target receives one snapshot per stream; send the others one by one")
        return self.receiver.receive(path, name, guid, fd, compress, force, [(e["name"], e["guid"]) for e in then])

    def op_resume(self, fd: int, path: str, compress: str) -> dict[str, Any]:
        return self.receiver.resume(path, fd, compress)

    def op_delete(self, fd: int, path: str, names: list[str], allow_writable: bool, partial: bool) -> dict[str, Any]:
        if partial:
            return {"deleted": self.receiver.delete_partials(path, names)}
        if self.append_only:
            raise Refused("this server is append-only (serve --append-only): it never deletes; prune on the target itself")
        return {"deleted": self.receiver.delete(path, names, allow_writable)}

    def _dataset(self, rel: str) -> tuple[str, StorageBackend]:
        """The source dataset a send-role path names below the root, and the backend serving it: a
        receiving root's copies are served as snapshots (a host restoring from its backup host)."""
        dataset, backend = self.receiver.source(rel, self.backend)
        backend.check_dataset(dataset)
        return dataset, backend

    def op_send(self, fd: int, path: str, name: str | None, base: str | None, compress: str, token: str | None) -> None:
        if token is not None and not self.backend.capabilities.resumable_receive:
            raise Refused(f"resume tokens are a ZFS feature; this source is {self.backend.kind}")
        dataset, backend = self._dataset(path)
        if token is not None:
            argv, name, guid = self._resume_send((dataset, backend), token)
        else:
            assert name is not None
            entries = backend.list_snapshots(dataset)
            snaps = {s.name: s for s in entries if s.kind == "snapshot"}
            marks = {s.name for s in entries if s.kind == "bookmark"}
            if name not in snaps or not snaps[name].read_only:
                raise Refused(f"{path}: no read-only snapshot named {name!r}")
            if base is not None and not (base[1:] in marks if base.startswith("#") else base in snaps and snaps[base].read_only):
                raise Refused(f"{path}: no read-only snapshot or bookmark named {base!r}")
            argv = backend.send_argv(dataset, name, base)
            guid = snaps[name].received_guid or snaps[name].guid
        _say(encode_response(True, name=name, guid=guid))
        procs: list[Proc] = []
        try:
            if compress == "zstd":
                procs.append(Proc.start(argv, stdout=-1, label=f"{backend.kind} send (source)"))
                assert procs[0].popen.stdout is not None
                procs.append(Proc.start(["zstd", "-1", "-T0", "-q", "-c"], stdin=procs[0].popen.stdout, stdout=1))
                procs[0].popen.stdout.close()
            else:
                procs.append(Proc.start(argv, stdout=1, label=f"{backend.kind} send (source)"))
            finish(procs)
        finally:
            for p in procs:
                p.close()
        return None

    def _resume_send(self, served: tuple[str, StorageBackend], token: str) -> tuple[list[str], str, str]:
        """The send that continues a token the puller holds, only if the token names a snapshot of
        the served dataset (a token can name any snapshot on this host; the root confines it)."""
        dataset, backend = served
        target, name, guid = backend.token_target(token)
        if target != dataset:
            raise Refused(f"resume token names snapshot {name!r} of {target!r}, which is not a snapshot of {dataset!r}")
        return backend.resume_argv(token), name, guid

    def op_stat(self, fd: int, path: str, file: str) -> dict[str, Any]:
        """``file`` as each read-only snapshot (or copy) of ``path`` holds it, newest first: what
        ``versions --targets`` shows. Read as ``send`` would hand it out, nothing followed out of a snapshot."""
        dataset, backend = self._dataset(path)
        relative = PurePosixPath(file)
        found, unreadable = [], 0
        snapshots = [s for s in backend.list_snapshots(dataset) if s.kind == "snapshot" and s.read_only]
        for snap in sorted(snapshots, key=lambda s: (s.created, s.name), reverse=True):
            files = backend.snapshot_files(dataset, snap.name)  # None for a copy kept unmounted (ZFS)
            unreadable += files is None
            st = lookup(files, relative) if files is not None else None
            if st is not None:
                found.append({"name": snap.name, "created": snap.created.strftime("%Y-%m-%dT%H:%M:%SZ"),
                              "kind": kind_of(st.st_mode), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
        return {"found": found, "unreadable": unreadable}

    def op_hold(self, fd: int, path: str, tag: str, names: list[str]) -> dict[str, Any]:
        if not is_pull_tag(tag):
            raise Refused(f"hold tag {tag!r}: a pulling host's holds are named 'pull:<host>.<pull>'")
        dataset, backend = self._dataset(path)
        backend.set_holds(dataset, tag, names)
        return {"held": names}


def _refuse(error: Exception, **about: object) -> int:
    print(f"snapsync serve: refused: {error}", file=sys.stderr)
    _say(encode_response(False, error=str(error), kind="refused", **about))
    return EXIT_USAGE


def serve(
    root: str, role: Role, snapshot_dir: str = ".snapsync", append_only: bool = False, stall: float = STALL_TIMEOUT,
    restore: bool = False,
) -> int:
    if restore and role != "receive":
        return _refuse(Refused(f"{RESTORE_OPTION} is an option of the receive role (the send role hands out snapshots already)"))
    try:
        server = Server(root, role, snapshot_dir, append_only, stall, restore)
    except SnapsyncError as e:  # a --root that is neither a directory path nor a dataset name
        return _refuse(e)
    return server.handle(0)


def main(argv: list[str]) -> int:
    """``snapsync serve`` without loading the whole CLI: a session starts per request, so its
    start-up time is paid per snapshot sent (about 60 ms instead of 190 ms). Options and help are
    those of the ``serve`` command in :mod:`snapsync.cli.app`; anything unusual goes there."""
    import argparse

    class Quiet(argparse.ArgumentParser):
        def error(self, message: str) -> NoReturn:
            raise SystemExit(2)

    parser = Quiet(prog="snapsync serve", add_help=False)
    parser.add_argument("--root", required=True)
    parser.add_argument("--role", choices=("receive", "send"), required=True)
    parser.add_argument("--snapshot-dir", default=".snapsync")
    parser.add_argument("--append-only", action="store_true")
    parser.add_argument(RESTORE_OPTION, dest="restore", action="store_true")
    parser.add_argument("--stall-timeout", type=float, default=STALL_TIMEOUT)
    try:
        args, rest = parser.parse_known_args(argv)
    except SystemExit:
        return -1
    if rest or not 0 < args.stall_timeout <= 86400:
        return -1
    return serve(args.root, args.role, args.snapshot_dir, args.append_only, args.stall_timeout, args.restore)


def authorized_keys_line(key_line: str, command: list[str]) -> str:
    """The ``authorized_keys`` entry that confines ``key_line`` to ``command`` (``restrict`` = no pty,
    no forwarding of any kind)."""
    import shlex

    forced = " ".join(shlex.quote(a) for a in command)
    if '"' in forced or "\\" in forced:
        raise UsageError(f"forced command {forced!r} would need escaping inside authorized_keys; use simpler paths")
    return f'command="{forced}",restrict {key_line.strip()}'

