"""snapsync.protocol on its own: what a server in each role accepts, what it refuses, and why. Pure."""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import unquote

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from snapsync.protocol import (
    MAX_NAMES,
    MAX_REQUEST,
    OPS,
    VERSION,
    Refused,
    Request,
    Role,
    check_file,
    check_path,
    dataset_key,
    encode_request,
    encode_response,
    parse_request,
)

NAME = "app_2026-03-01T12:00:00Z"
GUID = "0123456789abcdef0123456789abcdef"
TOKEN = "1-e6b6b1a3c-c0-789c636064000310a500c4ec50360710e72765a52697303030"


def line(**fields: Any) -> bytes:
    """A request line as a client would send it (version 1 unless given)."""
    return json.dumps({"v": VERSION, **fields}).encode() + b"\n"


def refused(raw: bytes, role: str, match: str) -> Refused:
    with pytest.raises(Refused, match=match) as info:
        parse_request(raw, role)  # type: ignore[arg-type]
    return info.value


# --- accepted requests, every op of every role -------------------------------------------------

VALID: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("receive", {"op": "hello"}, {}),
    ("receive", {"op": "list", "paths": ["app/persist/var", "app/%2F"]}, {"paths": ["app/persist/var", "app/%2F"]}),
    (
        "receive",
        {"op": "receive", "path": "app/persist/app", "name": NAME, "guid": GUID},
        {"path": "app/persist/app", "name": NAME, "guid": GUID, "compress": "none", "force": False, "then": []},
    ),
    (
        "receive",
        {"op": "receive", "path": "g/d", "name": NAME, "guid": "ab", "compress": "zstd"},
        {"path": "g/d", "name": NAME, "guid": "ab", "compress": "zstd", "force": False, "then": []},
    ),
    (
        "receive",
        {"op": "receive", "path": "g/d", "name": NAME, "guid": "1234567890", "force": True},
        {"path": "g/d", "name": NAME, "guid": "1234567890", "compress": "none", "force": True, "then": []},
    ),
    (
        "receive",
        {"op": "receive", "path": "g/d", "name": NAME, "guid": "ab", "then": [{"name": "snapsync_2026-11-27T00:00:00Z", "guid": "cd"}]},
        {"path": "g/d", "name": NAME, "guid": "ab", "compress": "none", "force": False, "then": [{"name": "snapsync_2026-11-27T00:00:00Z", "guid": "cd"}]},
    ),
    ("receive", {"op": "resume", "path": "g/d"}, {"path": "g/d", "compress": "none"}),
    (
        "receive",
        {"op": "delete", "path": "g/d", "names": [NAME, "other:1"]},
        {"path": "g/d", "names": [NAME, "other:1"], "allow_writable": False, "partial": False},
    ),
    (
        "receive",
        {"op": "delete", "path": "g/d", "names": [], "allow_writable": True, "partial": True},
        {"path": "g/d", "names": [], "allow_writable": True, "partial": True},
    ),
    ("send", {"op": "hello"}, {}),
    ("send", {"op": "list", "paths": ["persist/app"]}, {"paths": ["persist/app"]}),
    (
        "send",
        {"op": "send", "path": "persist/app", "name": NAME},
        {"path": "persist/app", "name": NAME, "base": None, "compress": "none", "token": None},
    ),
    (
        "send",
        {"op": "send", "path": "persist/app", "name": NAME, "base": "#app_2026-02-28T12:00:00Z"},
        {"path": "persist/app", "name": NAME, "base": "#app_2026-02-28T12:00:00Z", "compress": "none", "token": None},
    ),
    (
        "send",
        {"op": "send", "path": "persist/app", "token": TOKEN},
        {"path": "persist/app", "name": None, "base": None, "compress": "none", "token": TOKEN},
    ),
    (
        "send",
        {"op": "send", "path": "persist/app", "name": NAME, "base": "app_2026-02-28T12:00:00Z", "compress": "zstd"},
        {"path": "persist/app", "name": NAME, "base": "app_2026-02-28T12:00:00Z", "compress": "zstd", "token": None},
    ),
    (
        "send",
        {"op": "hold", "path": "persist/app", "tag": "nas-1.example:pull", "names": [NAME]},
        {"path": "persist/app", "tag": "nas-1.example:pull", "names": [NAME]},
    ),
    ("receive", {"op": "sizes", "paths": ["g/d"]}, {"paths": ["g/d"]}),
    ("send", {"op": "sizes", "paths": ["persist/app", "persist/db"]}, {"paths": ["persist/app", "persist/db"]}),
    ("send", {"op": "stat", "path": "persist/app", "file": "etc/app ini/ünï\udcff"}, {"path": "persist/app", "file": "etc/app ini/ünï\udcff"}),
]


@pytest.mark.parametrize(("role", "fields", "args"), VALID, ids=[f"{r}-{f['op']}-{i}" for i, (r, f, _) in enumerate(VALID)])
def test_valid_requests_are_accepted_with_normalized_args(role: str, fields: dict[str, Any], args: dict[str, Any]) -> None:
    assert parse_request(line(**fields), role) == Request(fields["op"], args)  # type: ignore[arg-type]


def test_every_op_of_each_role_is_covered_by_a_valid_example() -> None:
    covered = {(r, f["op"]) for r, f, _ in VALID}
    assert covered == {(r, op) for r, ops in OPS.items() for op in ops}


@pytest.mark.parametrize(("op", "args"), [(f["op"], a) for _, f, a in VALID if f["op"] != "hello"])
def test_encode_request_round_trips_through_parse(op: str, args: dict[str, Any]) -> None:
    role = next(r for r, ops in OPS.items() if op in ops)
    raw = encode_request(op, **args)
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1
    assert parse_request(raw, role) == Request(op, args)


def test_request_without_trailing_newline_parses_too() -> None:
    # the server strips the newline before parsing
    assert parse_request(b'{"v":1,"op":"hello"}', "receive") == Request("hello", {})


# --- role confinement --------------------------------------------------------------------------

OTHER_ROLE: list[tuple[Role, dict[str, Any]]] = [
    ("receive", {"op": "send", "path": "g/d", "name": NAME}),
    ("receive", {"op": "hold", "path": "g/d", "tag": "t", "names": [NAME]}),
    ("send", {"op": "delete", "path": "g/d", "names": [NAME]}),
    ("receive", {"op": "stat", "path": "g/d", "file": "etc/app.ini"}),
    ("send", {"op": "receive", "path": "g/d", "name": NAME, "guid": GUID}),
]


@pytest.mark.parametrize(("role", "fields"), OTHER_ROLE, ids=[f"{f['op']}-to-{r}" for r, f in OTHER_ROLE])
def test_ops_of_the_other_role_are_refused(role: Role, fields: dict[str, Any]) -> None:
    e = refused(line(**fields), role, f"operation '{fields['op']}' is not allowed for role '{role}'")
    for op in OPS[role]:  # the message lists what is allowed
        assert op in str(e)


@pytest.mark.parametrize("op", ["rm", "shell", "exec", "HELLO", "", " hello", "hello\n", None, 1, True])
@pytest.mark.parametrize("role", ["receive", "send"])
def test_unknown_ops_are_refused(role: str, op: Any) -> None:
    refused(line(op=op), role, re.escape(f"operation {op!r} is not allowed"))


def test_missing_op_is_refused() -> None:
    refused(line(), "receive", "operation None is not allowed")


# --- framing, encoding, version ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"", "malformed request"),
        (b"hello", "malformed request"),
        (b'{"v":1,"op":"hello"', "malformed request"),
        (b'{"v":1,"op":"hello"}{"v":1,"op":"hello"}', "malformed request"),
        (b"{'v':1,'op':'hello'}", "malformed request"),
        (b'\xff\xfe{"v":1}', "malformed request"),
        (b'{"v":1,"op":"hel\xc0lo"}', "malformed request"),
        (b"rm -rf /; echo pwned", "malformed request"),
    ],
    ids=["empty", "word", "truncated", "two-objects", "single-quotes", "bom-garbage", "bad-utf8", "shell"],
)
def test_non_json_is_refused(raw: bytes, match: str) -> None:
    refused(raw, "receive", match)


@pytest.mark.parametrize("doc", ["[1, 2]", '"hello"', "1", "null", "true", '[{"v":1,"op":"hello"}]'])
def test_json_that_is_not_an_object_is_refused(doc: str) -> None:
    refused(doc.encode(), "send", "expected a JSON object")


@pytest.mark.parametrize("version", [None, 0, 2, "1", [1], {"v": 1}, -1])
def test_wrong_or_missing_version_is_refused(version: Any) -> None:
    fields = {"op": "hello"} if version is None else {"v": version, "op": "hello"}
    raw = json.dumps(fields).encode()
    refused(raw, "receive", re.escape(f"protocol version {version!r} not supported (this server speaks {VERSION})"))


@pytest.mark.parametrize("version", ["true", "1.0"])
def test_version_must_be_the_integer_1(version: str) -> None:
    refused(b'{"v":' + version.encode() + b',"op":"hello"}', "receive", "protocol version")


def test_line_of_max_request_bytes_is_parsed() -> None:
    raw = b'{"v":1,"op":"hello"}'
    raw += b" " * (MAX_REQUEST - len(raw))
    assert len(raw) == MAX_REQUEST
    assert parse_request(raw, "receive") == Request("hello", {})


@pytest.mark.parametrize("extra", [1, 1000, MAX_REQUEST])
def test_lines_over_max_request_are_refused(extra: int) -> None:
    raw = b'{"v":1,"op":"hello"}'
    raw += b" " * (MAX_REQUEST - len(raw) + extra)
    refused(raw, "receive", f"request longer than {MAX_REQUEST} bytes")


def test_encode_request_refuses_what_the_server_would_refuse() -> None:
    too_many_paths = ["a" * 250 + f"/{i:04}" for i in range(256)]
    with pytest.raises(ValueError, match=f"over the protocol's {MAX_REQUEST}"):
        encode_request("list", paths=too_many_paths)


@pytest.mark.parametrize("op", [[], ["hello"], {}, {"hello": 1}])
def test_unhashable_op_is_refused(op: Any) -> None:
    refused(line(op=op), "receive", "is not allowed")


def test_deeply_nested_json_is_refused() -> None:
    depth = 30_000
    raw = b'{"v":1,"op":"hello","x":' + b"[" * depth + b"]" * depth + b"}"
    assert len(raw) < MAX_REQUEST
    refused(raw, "receive", "malformed request|unknown request field")


# --- fields ------------------------------------------------------------------------------------

UNKNOWN_FIELDS = [
    ("receive", {"op": "hello", "path": "g/d"}, "path"),
    ("receive", {"op": "list", "paths": ["g/d"], "recursive": True}, "recursive"),
    ("receive", {"op": "receive", "path": "g/d", "name": NAME, "guid": GUID, "rollback": True}, "rollback"),
    ("receive", {"op": "resume", "path": "g/d", "token": "1-a-b-c"}, "token"),
    ("receive", {"op": "delete", "path": "g/d", "names": [NAME], "recursive": True, "all": 1}, "all, recursive"),
    ("send", {"op": "send", "path": "g/d", "name": NAME, "argv": ["rm", "-rf", "/"]}, "argv"),
    ("send", {"op": "hold", "path": "g/d", "tag": "t", "names": [], "release": True}, "release"),
    ("send", {"op": "send", "path": "g/d", "name": NAME, "guid": GUID}, "guid"),
]


@pytest.mark.parametrize(("role", "fields", "reported"), UNKNOWN_FIELDS)
def test_unknown_fields_are_refused_and_named(role: str, fields: dict[str, Any], reported: str) -> None:
    refused(line(**fields), role, re.escape(f"unknown request field(s): {reported}"))


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"op": "receive", "name": NAME, "guid": GUID}, "path must be a non-empty string"),
        ({"op": "receive", "path": "g/d", "guid": GUID}, "snapshot name None"),
        ({"op": "receive", "path": "g/d", "name": NAME}, "guid None"),
        ({"op": "delete", "path": "g/d"}, "names must be a list"),
        ({"op": "list"}, "paths must be a list of 1 to 256"),
        ({"op": "list", "paths": []}, "paths must be a list of 1 to 256"),
        ({"op": "list", "paths": "g/d"}, "paths must be a list of 1 to 256"),
        ({"op": "list", "paths": ["g/d"] * 257}, "paths must be a list of 1 to 256"),
        ({"op": "receive", "path": "g/d", "name": NAME, "guid": GUID, "compress": "gzip"}, "compress must be"),
        ({"op": "receive", "path": "g/d", "name": NAME, "guid": GUID, "compress": None}, "compress must be"),
    ],
)
def test_missing_or_mistyped_fields_are_refused(fields: dict[str, Any], match: str) -> None:
    refused(line(**fields), "receive", match)


# --- paths -------------------------------------------------------------------------------------

BAD_PATHS = {
    "absolute": ("/etc", "is absolute"),
    "absolute-nested": ("/srv/backups/g/d", "is absolute"),
    "double-slash-root": ("//etc", "is absolute"),
    "dotdot": ("..", "empty, '.' or '..' component"),
    "dotdot-inside": ("g/../../etc", "empty, '.' or '..' component"),
    "dotdot-end": ("g/d/..", "empty, '.' or '..' component"),
    "dot": (".", "empty, '.' or '..' component"),
    "dot-inside": ("g/./d", "empty, '.' or '..' component"),
    "empty-component": ("g//d", "empty, '.' or '..' component"),
    "trailing-slash": ("g/d/", "empty, '.' or '..' component"),
    "receiving-marker": ("g/d/.receiving", "component '.receiving'"),
    "leading-dot": (".receiving", "component '.receiving'"),
    "lock": ("g/.lock", "component '.lock'"),
    "dot-snapsync": ("persist/.snapsync", "component '.snapsync'"),
    "triple-dot": ("g/...", "component '...'"),
    "semicolon": ("g;rm -rf /", "characters outside"),
    "pipe": ("g|nc evil 1", "characters outside"),
    "dollar-paren": ("$(touch /tmp/pwned)", "characters outside"),
    "dollar-var": ("g/$HOME", "characters outside"),
    "backtick": ("g/`id`", "characters outside"),
    "ampersand": ("g&d", "characters outside"),
    "redirect": ("g>d", "characters outside"),
    "redirect-in": ("g<d", "characters outside"),
    "space": ("g d", "characters outside"),
    "newline": ("g\nd", "characters outside"),
    "carriage-return": ("g\rd", "characters outside"),
    "tab": ("g\td", "characters outside"),
    "single-quote": ("g'd", "characters outside"),
    "double-quote": ('g"d', "characters outside"),
    "star": ("g/*", "characters outside"),
    "question": ("g/d?", "characters outside"),
    "tilde": ("~root", "characters outside"),
    "backslash": ("g\\..\\..", "characters outside"),
    "nul": ("g\x00d", "characters outside"),
    "nul-end": ("g/d\x00", "characters outside"),
    "leading-dash": ("-rf", "characters outside"),
    "unicode": ("g/dé", "characters outside"),
    "fullwidth-slash": ("g\uff0f..", "characters outside"),
    "component-too-long": ("g/" + "a" * 766, "longer than 765"),
    "too-long": ("/".join(["a" * 700] * 12), "longer than 8192"),
    "empty": ("", "non-empty string"),
}


@pytest.mark.parametrize(("path", "match"), BAD_PATHS.values(), ids=BAD_PATHS.keys())
def test_check_path_refuses(path: str, match: str) -> None:
    with pytest.raises(Refused, match=re.escape(match)):
        check_path(path)


@pytest.mark.parametrize(("path", "match"), BAD_PATHS.values(), ids=BAD_PATHS.keys())
@pytest.mark.parametrize(
    ("role", "template"),
    [
        ("receive", {"op": "receive", "name": NAME, "guid": GUID}),
        ("receive", {"op": "delete", "names": [NAME]}),
        ("send", {"op": "send", "name": NAME}),
        ("send", {"op": "hold", "tag": "t", "names": [NAME]}),
    ],
    ids=["receive", "delete", "send", "hold"],
)
def test_every_op_with_a_path_refuses_bad_paths(role: str, template: dict[str, Any], path: str, match: str) -> None:
    refused(line(**template, path=path), role, re.escape(match))


@pytest.mark.parametrize(("path", "match"), BAD_PATHS.values(), ids=BAD_PATHS.keys())
def test_list_refuses_a_bad_path_among_good_ones(path: str, match: str) -> None:
    refused(line(op="list", paths=["g/ok", path]), "receive", re.escape(match))


@pytest.mark.parametrize("value", [None, 1, ["g/d"], {"p": "g/d"}, True])
def test_path_must_be_a_string(value: Any) -> None:
    refused(line(op="delete", path=value, names=[]), "receive", "path must be a non-empty string")


@pytest.mark.parametrize(
    "path",
    ["g", "g/d", "app/persist/var/lib/forgejo", "%2F", "a/%2Ehidden", "_x", "a.b/c-d/e_f/g+h/i=j/k@l/m:n", "0/" * 100 + "z",
     "a" * 255, "/".join(["a" * 100] * 10) + "/" + "b" * 13],
)
def test_check_path_accepts_plain_relative_paths(path: str) -> None:
    assert check_path(path) == path


# --- names, guids, tags, flags -----------------------------------------------------------------

BAD_NAMES = [
    "", ".", "..", ".hidden", "-rf", "a/b", "../x", "a b", "a;b", "$(id)", "`id`", "a|b", "a&b", "a>b", "a\nb",
    "a\x00", "*", "a'b", 'a"b', "é", "a" * 256, None, 1, ["a"],
]


NAME_FIELDS = [
    ("receive", {"op": "receive", "path": "g/d", "guid": GUID}, "name"),
    ("receive", {"op": "delete", "path": "g/d"}, "names"),
    ("send", {"op": "send", "path": "g/d"}, "name"),
    ("send", {"op": "send", "path": "g/d", "name": NAME}, "base"),
    ("send", {"op": "hold", "path": "g/d", "tag": "t"}, "names"),
]


@pytest.mark.parametrize(
    ("role", "template", "field", "name"),
    [
        pytest.param(*where, name, id=f"{where[1]['op']}-{where[2]}-{repr(name)[:20]}")
        for where in NAME_FIELDS
        for name in BAD_NAMES
        if not (where[2] == "base" and name is None)  # base=None is a full send
    ],
)
def test_names_that_are_not_snapshot_names_are_refused(
    role: str, template: dict[str, Any], field: str, name: Any
) -> None:
    value = [NAME, name] if field == "names" else name
    what = "base" if field == "base" else "snapshot name"
    refused(line(**template, **{field: value}), role, re.escape(f"{what} {name!r} is not a snapshot name"))


@pytest.mark.parametrize("name", [NAME, "manual", "x", "a.b:c+d-e_f", "A" * 255, "2026-01-01"])
def test_snapshot_names_accepted(name: str) -> None:
    assert parse_request(line(op="delete", path="g/d", names=[name]), "receive").args["names"] == [name]


@pytest.mark.parametrize(
    "guid", ["", "ABCDEF", "0x12", "g1", "12 34", "12-34", "a" * 65, "12\n", "$(id)", None, 12, ["ab"]]
)
def test_non_hex_guid_is_refused(guid: Any) -> None:
    refused(line(op="receive", path="g/d", name=NAME, guid=guid), "receive", re.escape(f"guid {guid!r} is not a hex"))


@pytest.mark.parametrize("tag", ["", ".x", "a b", "a/b", "a;b", "$(id)", "a" * 129, None, 1])
def test_bad_hold_tags_are_refused(tag: Any) -> None:
    refused(line(op="hold", path="g/d", tag=tag, names=[]), "send", re.escape(f"hold tag {tag!r} is not a plain name"))


@pytest.mark.parametrize("flag", ["allow_writable", "partial"])
@pytest.mark.parametrize("value", [1, 0, "true", "false", "yes", None, [], {}, 1.0])
def test_non_bool_flags_are_refused(flag: str, value: Any) -> None:
    refused(line(op="delete", path="g/d", names=[NAME], **{flag: value}), "receive", f"{flag} must be true or false")


@pytest.mark.parametrize("value", [1, "yes", None])
def test_non_bool_force_is_refused(value: Any) -> None:
    refused(line(op="receive", path="g/d", name=NAME, guid=GUID, force=value), "receive", "force must be true or false")


@pytest.mark.parametrize(
    "token",
    ["", "1-abc", "1-a-b-c-d", "1-a-b-C", "1-a-b-c; rm -rf /", "-a-b-c", "x" * 10, 7, None, ["1-a-b-c"], "1-a-b-c\n"],
)
def test_malformed_resume_tokens_are_refused(token: Any) -> None:
    if token is None:  # no token is a plain send, which then needs a name
        refused(line(op="send", path="g/d", token=token), "send", "is not a snapshot name")
        return
    refused(line(op="send", path="g/d", token=token), "send", "not a ZFS receive_resume_token")


def test_oversized_resume_token_is_refused() -> None:
    refused(line(op="send", path="g/d", token="1-a-b-" + "c" * 40000), "send", "not a ZFS receive_resume_token")


@pytest.mark.parametrize("base", ["#", "##x", "#a/b", "#a@b", "a#b", "#-x"])
def test_bad_bookmark_bases_are_refused(base: str) -> None:
    refused(line(op="send", path="g/d", name=NAME, base=base), "send", "not a snapshot name")


def test_resume_is_a_receive_role_op_only() -> None:
    refused(line(op="resume", path="g/d"), "send", "not allowed for role 'send'")


def test_too_many_names_are_refused() -> None:
    names = [f"n{i}" for i in range(MAX_NAMES + 1)]
    raw = json.dumps({"v": 1, "op": "delete", "path": "g", "names": names}, separators=(",", ":")).encode()
    assert len(raw) < MAX_REQUEST  # refused for the count, not the size
    refused(raw, "receive", f"names must be a list of at most {MAX_NAMES} snapshot names")


def test_max_names_is_accepted() -> None:
    names = [f"n{i}" for i in range(MAX_NAMES)]
    raw = json.dumps({"v": 1, "op": "hold", "path": "g", "tag": "t", "names": names}, separators=(",", ":")).encode()
    assert parse_request(raw, "send").args["names"] == names


@pytest.mark.parametrize("names", ["n1", {"n1": True}, None, 5])
def test_names_must_be_a_list(names: Any) -> None:
    refused(line(op="delete", path="g", names=names), "receive", "names must be a list")


def test_encode_response_is_one_json_line() -> None:
    raw = encode_response(False, error="no\nway", kind="refused")
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1
    assert json.loads(raw) == {"v": VERSION, "ok": False, "error": "no\nway", "kind": "refused"}


# --- dataset_key -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dataset", "key"),
    [
        ("/persist/var/lib/forgejo", "persist/var/lib/forgejo"),
        ("persist/var", "persist/var"),
        ("//persist///var/", "persist/var"),
        ("/", "%2F"),
        ("", "%2F"),
        ("/srv/.hidden", "srv/%2Ehidden"),
        ("/srv/..", "srv/%2E."),
        ("/srv/my data", "srv/my%20data"),
        ("/srv/100%", "srv/100%25"),
        ("/srv/a;b", "srv/a%3Bb"),
        ("/srv/dé", "srv/d%C3%A9"),
        ("/tank/a:b@c+d=e", "tank/a:b@c+d=e"),
    ],
)
def test_dataset_key_examples(dataset: str, key: str) -> None:
    assert dataset_key(dataset) == key
    assert check_path(key) == key


# Short components keep the search fast; long ones are covered by the explicit cases below.
COMPONENT = st.text(min_size=0, max_size=16)
DATASET = st.lists(COMPONENT, min_size=0, max_size=5).map(lambda parts: "/" + "/".join(parts))
PROPS = settings(max_examples=300, deadline=None)


def _normalized(dataset: str) -> tuple[str, ...]:
    return tuple(p for p in dataset.split("/") if p)


@PROPS
@example("/mnt/pool/@home")
@given(DATASET)
def test_every_dataset_key_passes_check_path(dataset: str) -> None:
    key = dataset_key(dataset)
    assert check_path(key) == key


@pytest.mark.parametrize(
    "dataset", ["/mnt/pool/@home", "/@", "/srv/-data", "/srv/+x", "/srv/=x", "/srv/:x", "/srv/data~old", "/~"]
)
def test_dataset_key_of_leading_punctuation_passes_check_path(dataset: str) -> None:
    check_path(dataset_key(dataset))


@PROPS
@given(DATASET)
def test_every_dataset_key_passes_check_path_and_parse_request(dataset: str) -> None:
    key = dataset_key(dataset)
    assert check_path(key) == key
    assert parse_request(line(op="list", paths=[f"group/{key}"]), "receive").args == {"paths": [f"group/{key}"]}


@PROPS
@given(DATASET)
def test_dataset_key_round_trips(dataset: str) -> None:
    key = dataset_key(dataset)
    parts = _normalized(dataset)
    if not parts:
        assert key == "%2F"
    else:
        assert tuple(unquote(p) for p in key.split("/")) == parts


@PROPS
@given(DATASET, DATASET)
def test_distinct_datasets_give_distinct_keys(a: str, b: str) -> None:
    assert (dataset_key(a) == dataset_key(b)) == (_normalized(a) == _normalized(b))


@PROPS
@given(st.lists(st.sampled_from(["a", ".", "..", ".a", "%2E", "%2Ea", "%", "%25", " ", "%20", "/"]), max_size=4),
       st.lists(st.sampled_from(["a", ".", "..", ".a", "%2E", "%2Ea", "%", "%25", " ", "%20", "/"]), max_size=4))
def test_distinct_keys_for_lookalike_components(a: list[str], b: list[str]) -> None:
    da, db = "/" + "/".join(a), "/" + "/".join(b)
    assert (dataset_key(da) == dataset_key(db)) == (_normalized(da) == _normalized(db))


@pytest.mark.parametrize(
    "dataset",
    ["/srv/" + "é" * 100, "/" + "/".join(["d" * 200] * 6)],
    ids=["200-byte-component", "1206-char-path"],
)
def test_dataset_key_of_long_valid_paths_passes_check_path(dataset: str) -> None:
    assert all(len(p.encode()) <= 255 for p in dataset.split("/"))  # a path Linux accepts
    check_path(dataset_key(dataset))


def test_a_chain_that_names_a_snapshot_twice_or_too_many_is_refused_unread() -> None:
    from snapsync.protocol import MAX_CHAIN

    other = "app_2026-03-01T13:00:00Z"
    for then in ([{"name": NAME, "guid": "ab"}], [{"name": other, "guid": "ab"}, {"name": other, "guid": "cd"}],
                 [{"name": f"app_x{i}", "guid": "ab"} for i in range(MAX_CHAIN + 1)], [{"name": other}], "not a list"):
        with pytest.raises(Refused):
            parse_request(encode_request("receive", path="g/d", name=NAME, guid="ab", then=then), "receive")


@given(st.lists(st.text(st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",)), min_size=1, max_size=60)
                .filter(lambda p: p not in (".", "..") and len(p.encode()) <= 255), min_size=1, max_size=8))
def test_check_file_takes_every_name_a_file_can_have(parts: list[str]) -> None:
    """A file inside a snapshot is named by its owner: anything but ``/`` and NUL, so a stat asks for it as is."""
    assert check_file("/".join(parts)) == "/".join(parts)


@pytest.mark.parametrize("file", ["", "/etc/passwd", "..", "a/../b", "a/./b", "a//b", "a/", "a/\x00b", "é" * 128, "a/" * 2049, 5, None,
                                  "\ud800"])
def test_check_file_refuses_what_could_leave_a_snapshot_or_name_nothing(file: Any) -> None:
    with pytest.raises(Refused, match="file"):
        check_file(file)


def test_stat_is_read_back_and_served_only_where_send_is() -> None:
    raw = line(op="stat", path="g/d", file="x")
    assert parse_request(raw, "receive", restore=True) == Request("stat", {"path": "g/d", "file": "x"})
    refused(raw, "receive", "--allow-restore")


GOOD_SEEN = {"name": NAME, "created": "2026-03-01T12:00:00Z", "kind": "file", "size": 12, "mtime_ns": 1_700_000_000_000_000_000}


@pytest.mark.parametrize("change", [
    {"name": "../../etc"}, {"name": 5}, {"created": "yesterday"}, {"kind": "device"}, {"size": -1}, {"size": 1.5},
    {"size": True}, {"mtime_ns": "0"}, {"mtime_ns": 10**30}, {"extra": 1},
])
def test_a_stat_answer_out_of_shape_is_not_taken(change: dict[str, Any]) -> None:
    """What a backup host says a file was is checked field by field before it is shown (it may be hostile)."""
    from snapsync.replication.peer import FileSeen

    assert FileSeen.from_json(GOOD_SEEN).size == 12
    with pytest.raises((ValueError, TypeError, Refused)):
        FileSeen.from_json(GOOD_SEEN | change)
