"""The wire protocol between snapsync and ``snapsync serve``: one JSON request line per session.

A session is one process on the far side (an ssh forced command, or a local subprocess). The client
writes a single request line; for ``receive`` the send stream follows on the same stdin (with
``then``, a chain: the streams of several snapshots, each built on the one before). The server
answers with a single JSON line on stdout, except ``send``, which answers with a header line and then
the stream itself. The server's exit status says whether the session succeeded (0), failed (1) or
was refused (2), so ssh passes the outcome through even when stdout carries a stream.

Everything a request names is validated here, before the server touches a file: relative paths made
of plain components (no ``..``, no leading dot, no shell metacharacters), snapshot names that our
naming scheme can produce, and a bounded size. Pure: no I/O.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

VERSION = 1
MAX_REQUEST = 64 * 1024
"""Bytes in one request line, newline included; longer requests are refused unread."""

MAX_NAMES = 4096
MAX_CHAIN = 512
"""Snapshots in one chained receive: a week of hourly ones is 168; the request stays below MAX_REQUEST."""

Role = Literal["receive", "send"]
OPS: dict[Role, frozenset[str]] = {
    "receive": frozenset({"hello", "list", "sizes", "receive", "resume", "delete"}),
    "send": frozenset({"hello", "list", "sizes", "send", "hold", "stat"}),
}
READ_OPS = frozenset({"send", "stat"})
"""What ``--allow-restore`` adds to the receive role: reading its copies back, nothing that changes them."""
RESTORE_OPTION = "--allow-restore"
"""``serve`` option: a receive-role key may also have its own copies sent back (restores, drills)."""


def allowed_ops(role: Role, restore: bool = False) -> frozenset[str]:
    """What a server in ``role`` answers. Restoring adds reading (``send``, ``stat``) and nothing else:
    reading copies back deletes or overwrites nothing, so the key can do no more harm to its backups than before."""
    return OPS[role] | READ_OPS if restore and role == "receive" else OPS[role]

_COMPONENT = re.compile(r"[A-Za-z0-9_%][A-Za-z0-9._%+=@:-]{0,764}")
_SNAPSHOT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]{0,254}")
_GUID = re.compile(r"[0-9a-f]{1,64}")
_TOKEN = re.compile(r"[0-9a-f]+(-[0-9a-f]+){3}")
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
_KEY_SAFE = "._-+=@:"


class Refused(ValueError):
    """A request the server will not carry out; the message goes back to the client verbatim."""


def dataset_key(dataset: str) -> str:
    """Where a dataset's copies live below a target's group directory: its path, component by component.

    ``/persist/var/lib/forgejo`` becomes ``persist/var/lib/forgejo``, so a person browsing the backup
    finds what they expect. Characters outside a conservative set are percent-encoded, and a leading
    dot too (names starting with a dot are the server's own), so every key passes :func:`check_path`.
    """
    parts = [p for p in dataset.split("/") if p]
    if not parts:
        return "%2F"
    out = []
    for part in parts:
        encoded = quote(part, safe=_KEY_SAFE).replace("~", "%7E")
        if not (encoded[0].isascii() and (encoded[0].isalnum() or encoded[0] in "_%")):
            encoded = f"%{ord(encoded[0]):02X}{encoded[1:]}"
        out.append(encoded)
    return "/".join(out)


def check_path(value: object, what: str = "path") -> str:
    """A relative path below the server's root: plain components only."""
    if not isinstance(value, str) or not value:
        raise Refused(f"{what} must be a non-empty string")
    if len(value) > 8192:
        raise Refused(f"{what} is longer than 8192 characters")
    if value.startswith("/"):
        raise Refused(f"{what} {value!r} is absolute; paths are relative to the served root")
    for part in value.split("/"):
        if part in ("", ".", ".."):
            raise Refused(f"{what} {value!r} has an empty, '.' or '..' component")
        if not _COMPONENT.fullmatch(part):
            raise Refused(
                f"{what} {value!r}: component {part!r} has characters outside [A-Za-z0-9._%+=@:-], "
                "does not start with [A-Za-z0-9_%], or is longer than 765"
            )
    return value


MAX_FILE = 4096
"""Characters in a file's path inside a snapshot (``stat``): Linux's PATH_MAX."""


def check_file(value: object) -> str:
    """A file's path inside a snapshot, as its owner named it: any bytes but ``/`` and NUL per component
    (non-UTF-8 ones as Python's surrogate escapes), none of them empty, ``.`` or ``..``."""
    if not isinstance(value, str) or not value or len(value) > MAX_FILE:
        raise Refused(f"file must be a relative path of 1 to {MAX_FILE} characters")
    if value.startswith("/") or "\x00" in value:
        raise Refused("file must be a relative path without NUL")
    for part in value.split("/"):
        if part in ("", ".", ".."):
            raise Refused("file has an empty, '.' or '..' component")
        try:
            if len(part.encode("utf-8", "surrogateescape")) > 255:
                raise Refused("file has a component longer than 255 bytes")
        except UnicodeEncodeError:
            raise Refused("file is not a path this host can name") from None
    return value


def check_name(value: object, what: str = "snapshot name") -> str:
    if not isinstance(value, str) or not _SNAPSHOT.fullmatch(value):
        raise Refused(f"{what} {value!r} is not a snapshot name (letters, digits and ._:+-)")
    return value


def check_guid(value: object, what: str = "guid") -> str:
    if not isinstance(value, str) or not _GUID.fullmatch(value):
        raise Refused(f"{what} {value!r} is not a hex identifier")
    return value


def check_tag(value: object) -> str:
    if not isinstance(value, str) or not _TAG.fullmatch(value):
        raise Refused(f"hold tag {value!r} is not a plain name")
    return value


def check_token(value: object) -> str:
    """A ZFS ``receive_resume_token``: four dash-separated hex fields."""
    if not isinstance(value, str) or len(value) > 32768 or not _TOKEN.fullmatch(value):
        raise Refused("token is not a ZFS receive_resume_token")
    return value


def check_base(value: object) -> str | None:
    """An incremental base: a snapshot name, or ``#name`` for a ZFS bookmark."""
    if value is None:
        return None
    if isinstance(value, str) and value.startswith("#"):
        return "#" + check_name(value[1:], "base bookmark")
    return check_name(value, "base")


def _flag(args: dict[str, Any], key: str) -> bool:
    value = args.get(key, False)
    if not isinstance(value, bool):
        raise Refused(f"{key} must be true or false")
    return value


def check_names(value: object, what: str = "names") -> list[str]:
    if not isinstance(value, list) or len(value) > MAX_NAMES:
        raise Refused(f"{what} must be a list of at most {MAX_NAMES} snapshot names")
    return [check_name(v) for v in value]


@dataclass(frozen=True)
class Request:
    op: str
    args: dict[str, Any]


def parse_request(line: bytes, role: Role, restore: bool = False) -> Request:
    """Decode and validate one request line for a server in ``role`` (see :func:`allowed_ops`); raise
    :class:`Refused`."""
    if len(line) > MAX_REQUEST:
        raise Refused(f"request longer than {MAX_REQUEST} bytes")
    try:
        data = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Refused(f"malformed request: {e}") from None
    except RecursionError:
        raise Refused("malformed request: nested too deeply") from None
    if not isinstance(data, dict):
        raise Refused("malformed request: expected a JSON object")
    version = data.get("v")
    if type(version) is not int or version != VERSION:
        raise Refused(f"protocol version {version!r} not supported (this server speaks {VERSION})")
    op = data.get("op")
    ops = allowed_ops(role, restore)
    if not isinstance(op, str) or op not in ops:
        hint = f"; this key reads its copies back only with serve {RESTORE_OPTION}" if isinstance(op, str) and op in READ_OPS else ""
        raise Refused(f"operation {op!r} is not allowed for role {role!r} (allowed: {', '.join(sorted(ops))}){hint}")
    args = {k: v for k, v in data.items() if k not in ("v", "op")}
    validate = _VALIDATORS[str(op)]
    return Request(str(op), validate(args))


def _only(args: dict[str, Any], allowed: set[str]) -> None:
    extra = set(args) - allowed
    if extra:
        raise Refused(f"unknown request field(s): {', '.join(sorted(extra))}")


def _v_hello(args: dict[str, Any]) -> dict[str, Any]:
    _only(args, set())
    return {}


def _v_list(args: dict[str, Any]) -> dict[str, Any]:
    _only(args, {"paths"})
    paths = args.get("paths")
    if not isinstance(paths, list) or not paths or len(paths) > 256:
        raise Refused("paths must be a list of 1 to 256 relative paths")
    return {"paths": [check_path(p) for p in paths]}


def _compress(args: dict[str, Any]) -> str:
    compress = args.get("compress", "none")
    if compress not in ("none", "zstd"):
        raise Refused(f"compress must be 'none' or 'zstd', not {compress!r}")
    return str(compress)


def check_then(value: object, first: str) -> list[dict[str, str]]:
    """A chained receive's further snapshots (``{"name", "guid"}``), in stream order: distinct names,
    none the first."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_CHAIN:
        raise Refused(f"then must be a list of at most {MAX_CHAIN} snapshots")
    out = []
    for entry in value:
        if not isinstance(entry, dict) or set(entry) != {"name", "guid"}:
            raise Refused("each of then must be an object with exactly name and guid")
        out.append({"name": check_name(entry["name"]), "guid": check_guid(entry["guid"])})
    names = [first, *(e["name"] for e in out)]
    if len(set(names)) != len(names):
        raise Refused("a chained receive names a snapshot twice")
    return out


def _v_receive(args: dict[str, Any]) -> dict[str, Any]:
    _only(args, {"path", "name", "guid", "compress", "force", "then"})
    name = check_name(args.get("name"))
    return {
        "path": check_path(args.get("path")),
        "name": name,
        "guid": check_guid(args.get("guid")),
        "compress": _compress(args),
        "force": _flag(args, "force"),
        "then": check_then(args.get("then"), name),
    }


def _v_resume(args: dict[str, Any]) -> dict[str, Any]:
    _only(args, {"path", "compress"})
    return {"path": check_path(args.get("path")), "compress": _compress(args)}


def _v_delete(args: dict[str, Any]) -> dict[str, Any]:
    _only(args, {"path", "names", "allow_writable", "partial"})
    flags = {k: _flag(args, k) for k in ("allow_writable", "partial")}
    return {"path": check_path(args.get("path")), "names": check_names(args.get("names")), **flags}


def _v_send(args: dict[str, Any]) -> dict[str, Any]:
    _only(args, {"path", "name", "base", "compress", "token"})
    token = args.get("token")
    return {
        "path": check_path(args.get("path")),
        "name": check_name(args.get("name")) if token is None or args.get("name") is not None else None,
        "base": check_base(args.get("base")),
        "compress": _compress(args),
        "token": None if token is None else check_token(token),
    }


def _v_hold(args: dict[str, Any]) -> dict[str, Any]:
    _only(args, {"path", "tag", "names"})
    return {"path": check_path(args.get("path")), "tag": check_tag(args.get("tag")), "names": check_names(args.get("names"))}


def _v_stat(args: dict[str, Any]) -> dict[str, Any]:
    _only(args, {"path", "file"})
    return {"path": check_path(args.get("path")), "file": check_file(args.get("file"))}


_VALIDATORS = {
    "stat": _v_stat,
    "sizes": _v_list,  # the same paths as a list
    "hello": _v_hello,
    "list": _v_list,
    "receive": _v_receive,
    "resume": _v_resume,
    "delete": _v_delete,
    "send": _v_send,
    "hold": _v_hold,
}


def encode_request(op: str, **args: Any) -> bytes:
    line = json.dumps({"v": VERSION, "op": op, **args}, separators=(",", ":")).encode() + b"\n"
    if len(line) > MAX_REQUEST:
        raise ValueError(f"request {op} is {len(line)} bytes, over the protocol's {MAX_REQUEST}")
    return line


def encode_response(ok: bool, **fields: Any) -> bytes:
    return json.dumps({"v": VERSION, "ok": ok, **fields}, separators=(",", ":")).encode() + b"\n"
