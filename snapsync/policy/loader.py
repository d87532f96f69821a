"""Read a policy file and report every problem in it as one line a sysadmin can act on.

``parse_policy`` is pure (TOML text in, validated ``Policy`` out); ``load_policy`` adds the only I/O:
reading the file (a regular one, of bounded size) and refusing hooks, which run as root, from a file
others can write or with programs others can change. Each problem becomes exactly one ``PolicyError``
("FILE: key.path: problem"), never a pydantic dump or a traceback, whatever the input: bounded nesting
and numbers keep the parsers from recursing or overflowing.
The models live in ``snapsync.policy.schema``; the format is documented in ``docs/policy.md``.
"""

from __future__ import annotations

import os
import re
import shlex
import stat
import tomllib
import types
import typing
from typing import Any, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from snapsync.backends import FILESYSTEMS, policy_form
from snapsync.errors import PolicyError
from snapsync.ops.hooks import UntrustedProgram, hook_programs, trusted_program
from snapsync.policy.schema import (
    BUILTIN_RETENTION,
    CommandHook,
    Defaults,
    DirTarget,
    FreezeHook,
    Group,
    Hook,
    LocalTarget,
    Policy,
    PostgresHook,
    Problem,
    RetentionTable,
    S3Target,
    SqliteHook,
    SshTarget,
    Target,
    did_you_mean,
    show,
)
from snapsync.plan.retention import RetentionRules

__all__ = [
    "BUILTIN_RETENTION",
    "DEFAULT_POLICY_PATH",
    "CommandHook",
    "DirTarget",
    "FreezeHook",
    "Group",
    "Hook",
    "LocalTarget",
    "Policy",
    "PostgresHook",
    "S3Target",
    "SqliteHook",
    "SshTarget",
    "Target",
    "load_policy",
    "parse_policy",
    "policy_warnings",
]

DEFAULT_POLICY_PATH = "/etc/snapsync/policy.toml"
MAX_POLICY_BYTES = 1 << 20
"""A policy of a hundred groups is a few dozen KiB; a larger "file" is a device or a mistake."""
MAX_DEPTH = 32
"""The deepest a valid policy nests is 6 (``groups.a.hooks[0].pre[0]``); deeper overflows the parsers' stacks."""

TOO_DEEP = f"tables, arrays or dotted keys nested more than {MAX_DEPTH} deep"

Loc = tuple[str | int, ...]

_TOKENS = re.compile(
    r"[^\"'#=,\[\]{}\n.]+|"  # nothing that matters, in one piece
    r'"""[\s\S]*?"""|\'\'\'[\s\S]*?\'\'\'|"""[\s\S]*|\'\'\'[\s\S]*'  # multi-line strings, even unterminated
    r'|"(?:\\.|[^"\\\n])*"|\'[^\'\n]*\'|["\'][^\n]*'  # one-line strings, even unterminated
    r"|#[^\n]*|[=,\[\]{}\n]|\."
)


def parse_policy(text: str, source: str) -> Policy:
    """Validate a policy's TOML text; ``source`` names it in every error message."""
    _check_dotted_keys(source, text)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PolicyError(source, "", f"invalid TOML: {e}") from None
    except ValueError:  # an integer of thousands of digits, which int() refuses to convert
        raise PolicyError(source, "", "invalid TOML: a number with more than 4300 digits") from None
    except RecursionError:
        raise PolicyError(source, "", TOO_DEEP) from None
    _check_depth(source, data)
    if not data:
        raise PolicyError(source, "", "no groups defined (the file is empty)")
    if "source" in data:
        raise PolicyError(source, "source", "unknown key 'source'")
    try:
        defaults = Defaults.model_validate(data.get("defaults", {}))
    except ValidationError as e:
        raise _policy_error(source, e, at=("defaults",)) from None
    try:
        return Policy.model_validate(data | {"source": source}, context=defaults)
    except ValidationError as e:
        raise _policy_error(source, e) from None


def _check_dotted_keys(source: str, text: str) -> None:
    """tomllib takes quadratic time in the parts of a dotted key (``a.a.a...`` or ``[a.a.a...]``): count
    them first, as dots outside strings and comments between two of ``= , [ ] { }`` or line ends."""
    dots = 0
    for token in _TOKENS.finditer(text):
        if token[0] == ".":
            dots += 1
            if dots > MAX_DEPTH:
                raise PolicyError(source, "", f"{TOO_DEEP} (at line {text.count(chr(10), 0, token.start()) + 1})")
        elif len(token[0]) == 1 and token[0] in "=,[]{}\n":
            dots = 0


def _check_depth(source: str, data: dict[str, Any]) -> None:
    """Refuse deep nesting before pydantic and the error messages walk it recursively."""
    todo: list[tuple[Loc, object]] = [((), data)]
    while todo:
        loc, value = todo.pop()
        if len(loc) > MAX_DEPTH:
            raise PolicyError(source, _key_path(loc[:3]), TOO_DEEP)
        if isinstance(value, dict):
            todo += [((*loc, str(k)), v) for k, v in value.items()]
        elif isinstance(value, list):
            todo += [((*loc, i), v) for i, v in enumerate(value)]


def load_policy(path: str | os.PathLike[str], on_this_host: bool = True) -> Policy:
    """Read and validate a policy file; refuse hooks from a file, or running programs, that anyone but
    root could change. ``on_this_host=False`` validates a policy meant for another machine (``policy check
    --syntax-only``, as a Nix build does, where the store file shows another owner): neither this copy nor
    the programs here are what runs there, and loading it there checks both."""
    name = os.fspath(path)
    st, raw = _read_policy_file(name)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        problem = f"invalid TOML: not UTF-8 (byte {raw[e.start]:#04x} at offset {e.start})"
        raise PolicyError(name, "", problem) from None
    policy = parse_policy(text, name)
    if on_this_host:
        _check_hook_permissions(policy, st)
        _check_hook_programs(policy)
    return policy


def _read_policy_file(name: str) -> tuple[os.stat_result, bytes]:
    """A regular file (through symlinks, as NixOS links /etc) of at most MAX_POLICY_BYTES.

    A fifo would block forever and /dev/zero never ends; a device is not even opened, since opening
    some (a tape, a watchdog) already acts. The opened file is checked again, in case the path changed.
    """
    def refuse(problem: str) -> PolicyError:
        return PolicyError(name, "", f"cannot read the policy file: {problem}")

    try:
        if (kind := _not_regular(os.stat(name))) is not None:
            raise refuse(f"not a regular file ({kind})")
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise refuse(e.strerror or str(e)) from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if (kind := _not_regular(st)) is not None:
            raise refuse(f"not a regular file ({kind})")
        try:
            raw = f.read(MAX_POLICY_BYTES + 1)
        except OSError as e:
            raise refuse(e.strerror or str(e)) from None
    if len(raw) > MAX_POLICY_BYTES:
        raise refuse(f"larger than {MAX_POLICY_BYTES >> 20} MiB")
    return st, raw


def _not_regular(st: os.stat_result) -> str | None:
    kinds = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a fifo", stat.S_IFSOCK: "a socket",
             stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}
    return None if stat.S_ISREG(st.st_mode) else kinds.get(stat.S_IFMT(st.st_mode), "not a file")


def _check_hook_permissions(policy: Policy, st: os.stat_result) -> None:
    """SECURITY SENSITIVE: hooks run as root, so whoever can write the file can run anything as root."""
    if not any(group.hooks for group in policy.groups.values()):
        return
    mode = stat.S_IMODE(st.st_mode)
    faults = []
    if st.st_uid != 0:
        faults.append(f"owned by uid {st.st_uid}")
    writable = [who for who, bit in (("group", stat.S_IWGRP), ("world", stat.S_IWOTH)) if mode & bit]
    if writable:
        faults.append(f"{'- and '.join(writable)}-writable (mode {mode:04o})")
    if faults:
        file = shlex.quote(policy.source)
        raise PolicyError(
            policy.source,
            "",
            f"defines hooks (commands run as root) but is {' and '.join(faults)}; "
            f"fix with: chown root:root {file} && chmod go-w {file}",
        )


def _check_hook_programs(policy: Policy) -> None:
    """SECURITY SENSITIVE: the policy file's rule, applied to every program a hook runs (see hooks.trusted_program).

    A program that is not there is left to fail when its hook runs, as it would have anyway.
    """
    for group in policy.groups.values():
        for i, hook in enumerate(group.hooks):
            for at, program in hook_programs(hook):
                try:
                    trusted_program(program)
                except UntrustedProgram as e:
                    raise PolicyError(policy.source, _key_path(("groups", group.name, "hooks", i, *at)), str(e)) from None


def policy_warnings(policy: Policy) -> list[str]:
    """What is valid but probably not what was meant: consistency that btrfs or zfs cannot give."""
    warnings = []
    for group in policy.groups.values():
        form, can = policy_form(group.backend), FILESYSTEMS[group.backend].capabilities
        if form is None or len(group.datasets) < 2:
            continue
        if not can.atomic_group_snapshot or form.atomic_unit is None:
            if not any(isinstance(hook, FreezeHook) for hook in group.hooks):
                warnings.append(
                    f"group {group.name!r}: {group.backend} cannot snapshot several {form.called} atomically; "
                    "add a freeze hook (or an application hook) if they must agree"
                )
            continue
        units = sorted({form.atomic_unit(dataset) for dataset in group.datasets})
        if len(units) > 1:
            warnings.append(
                f"group {group.name!r}: {form.called} in {form.unit_called}s {', '.join(units)} cannot be snapshotted "
                f"atomically (one snapshot per {form.unit_called})"
            )
    used = {name for group in policy.groups.values() for name in group.targets}
    warnings += [f"target {name!r} is not used by any group" for name in policy.targets if name not in used]
    return warnings


def _policy_error(source: str, error: ValidationError, at: Loc = ()) -> PolicyError:
    """The first problem by location, and how many more there are: fixing one at a time is easiest."""
    errors = [e for e in error.errors() if not _echo_of_item_error(e)]
    problems = sorted((_describe(e, at) for e in errors), key=lambda p: _sort_key(p[0]))
    key, problem = _key_path(problems[0][0]), problems[0][1]
    if len(problems) > 1:
        more = len(problems) - 1
        problem += f" (and {more} more problem{'s' if more > 1 else ''})"
    return PolicyError(source, key, " ".join(problem.splitlines()))


def _echo_of_item_error(error: ErrorDetails) -> bool:
    """pydantic also calls a non-empty list "too short" when its only items failed: not a second problem."""
    return error["type"] == "too_short" and bool(error["input"])


def _sort_key(loc: Loc) -> tuple[tuple[int, int, str], ...]:
    return tuple((1, p, "") if isinstance(p, int) else (0, 0, p) for p in loc)


_TYPE_NAMES = {
    "int_type": "an integer",
    "string_type": "a string",
    "bool_type": "true or false",
    "list_type": "a list",
    "tuple_type": "a list",
    "dict_type": "a table",
    "model_type": "a table",
    "model_attributes_type": "a table",
    "dataclass_type": "a table",
}


def _describe(error: ErrorDetails, at: Loc) -> tuple[Loc, str]:
    """One pydantic error as (full location, problem in the words of the policy file)."""
    loc: Loc = at + tuple(k for k in error["loc"] if k != "[key]")
    kind, ctx, value = error["type"], error.get("ctx", {}), error["input"]
    if kind in ("value_error", "assertion_error"):
        cause = ctx.get("error")
        if isinstance(cause, Problem):
            return loc + cause.at, str(cause)
        return loc, str(cause)
    if kind == "missing":
        return loc, "missing required key"
    if kind == "extra_forbidden":
        return loc, f"unknown key {loc[-1]!r}{did_you_mean(str(loc[-1]), _keys_of(loc[:-1]))}"
    if kind == "union_tag_not_found":
        tags = ", ".join(map(repr, _tags_of(loc)))
        return loc + ("type",), f"missing required key (one of {tags})"
    if kind == "union_tag_invalid":
        tag = str(ctx["tag"])
        hint = did_you_mean(tag, _tags_of(loc))
        return loc + ("type",), f"unknown type {tag!r}; expected one of {ctx['expected_tags']}{hint}"
    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'", str(ctx["expected"]))
        hint = did_you_mean(value, choices) if isinstance(value, str) else ""
        return loc, f"expected {ctx['expected']}, got {show(value)}{hint}"
    if kind in _TYPE_NAMES:
        return loc, f"expected {_TYPE_NAMES[kind]}, got {show(value)}"
    if kind == "greater_than_equal":
        return loc, f"must be {ctx['ge']} or more, got {show(value)}"
    if kind == "less_than_equal":
        return loc, f"must be {ctx['le']} or less, got {show(value)}"
    if kind in ("too_short", "string_too_short"):
        return loc, "must not be empty"
    return loc, error["msg"]


def _key_path(loc: Loc) -> str:
    """``groups.outline.hooks[0].type``: the location as the policy file spells it (union tags dropped)."""
    path = ""
    tp: Any = Policy
    for item in loc:
        tp = _unwrap(tp)
        if _is_union(tp) and (member := _member_tagged(tp, item)) is not None:
            tp = member
            continue
        if isinstance(item, int):
            path += f"[{item}]"
        else:
            key = item if re.fullmatch(r"[A-Za-z0-9_-]+", item) else f'"{item}"'
            path = f"{path}.{key}" if path else key
        tp = _step(tp, item)
    return path


def _type_at(loc: Loc) -> Any:
    tp: Any = Policy
    for item in loc:
        tp = _unwrap(tp)
        tp = _member_tagged(tp, item) if _is_union(tp) else _step(tp, item)
    return _unwrap(tp)


def _keys_of(loc: Loc) -> list[str]:
    """The keys the table at ``loc`` allows, to suggest one for a typo."""
    model = _type_at(loc)
    if model is RetentionRules:
        model = RetentionTable
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return []
    return [k for k in model.model_fields if k not in ("source", "name")]


def _tags_of(loc: Loc) -> list[str]:
    union = _type_at(loc)
    return [_tag(m) for m in get_args(union)] if _is_union(union) else []


def _step(tp: Any, item: str | int) -> Any:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        field = tp.model_fields.get(str(item))
        return field.annotation if field else None
    origin = get_origin(tp)
    if origin is dict:
        return get_args(tp)[1]
    if origin in (tuple, list):
        return get_args(tp)[0]
    return None


def _unwrap(tp: Any) -> Any:
    """Strip ``Annotated`` and ``| None`` to get at the type a location steps through."""
    while True:
        if get_origin(tp) is typing.Annotated:
            tp = get_args(tp)[0]
        elif _is_union(tp) and type(None) in get_args(tp):
            tp = next(m for m in get_args(tp) if m is not type(None))
        else:
            return tp


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (typing.Union, types.UnionType)


def _tag(model: Any) -> str:
    return str(get_args(model.model_fields["type"].annotation)[0])


def _member_tagged(union: Any, tag: str | int) -> Any:
    return next((m for m in get_args(union) if _tag(m) == tag), None)

