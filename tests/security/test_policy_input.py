"""The policy input boundary, exactly: the limits' edges, what is still accepted, and the shared escaping.

The generated corpus (test_policy_corpus.py) shows that nothing malformed crashes or hangs the CLI;
these pin down the messages and that the limits do not refuse what a real policy needs.
"""

from __future__ import annotations

import os
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest

from snapsync.errors import PolicyError, printable
from snapsync.policy.loader import load_policy, parse_policy

BASE = 'version = 1\n[groups.app]\nbackend = "btrfs"\ndatasets = ["/persist/app"]\n'


def rejected(text: str) -> PolicyError:
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, "P")
    return caught.value


def test_durations_up_to_100_years_are_fine_and_beyond_refused_at_their_key() -> None:
    policy = parse_policy(BASE + 'interval = "36500d"\n[groups.app.retention]\nkeep_within = "5214w2d"\n', "P")
    assert policy.groups["app"].interval == timedelta(days=36500)
    assert policy.groups["app"].retention.keep_within == timedelta(days=36500)
    assert str(rejected(BASE + 'interval = "36500d1s"\n')) == (
        "P: groups.app.interval: invalid duration '36500d1s': at most 100 years ('36500d')")
    assert str(rejected(BASE + '[groups.app.retention]\nkeep_within = "800000d"\n')) == (
        "P: groups.app.retention.keep_within: invalid duration '800000d': at most 100 years ('36500d')")
    assert "at most 100 years" in str(rejected(BASE + f'interval = "{"9" * 5000}s"\n'))


def test_a_policy_reached_through_symlinks_is_read_as_on_nixos(tmp_path: Path) -> None:
    store = tmp_path / "nix" / "store" / "abc-policy.toml"
    store.parent.mkdir(parents=True)
    store.write_text(BASE)
    (tmp_path / "static").symlink_to(store)
    (tmp_path / "policy.toml").symlink_to(tmp_path / "static")
    assert load_policy(tmp_path / "policy.toml").groups["app"].datasets == ("/persist/app",)


def test_a_fifo_is_refused_at_once_even_with_a_writer_waiting(tmp_path: Path) -> None:
    fifo = tmp_path / "policy.toml"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text(BASE), daemon=True)
    writer.start()
    started = time.monotonic()
    with pytest.raises(PolicyError, match=r"not a regular file \(a fifo\)"):
        load_policy(fifo)
    assert time.monotonic() - started < 1
    os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))  # let the writer finish


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom", "/dev/null"])
def test_devices_are_never_read(device: str) -> None:
    with pytest.raises(PolicyError, match=r"not a regular file \(a character device\)"):
        load_policy(device)


def test_one_mib_is_read_and_a_byte_more_refused(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(BASE + "#" * ((1 << 20) - len(BASE) - 1) + "\n")
    assert path.stat().st_size == 1 << 20
    load_policy(path)
    path.write_text(BASE + "#" * ((1 << 20) - len(BASE)) + "\n")
    with pytest.raises(PolicyError, match="larger than 1 MiB"):
        load_policy(path)


def test_nesting_is_refused_where_it_starts() -> None:
    assert str(rejected(BASE + "x = " + "[" * 40 + "]" * 40 + "\n")) == (
        "P: groups.app.x: tables, arrays or dotted keys nested more than 32 deep")
    assert str(rejected("version = 1\nx = " + "[" * 40 + "]" * 40 + "\n")).startswith("P: x[0][0]: tables")
    assert "nested more than 32 deep (at line 5)" in str(rejected(BASE + ".".join("a" * 100_000) + " = 1\n"))
    parse_policy(BASE + "[groups.app.retention]\ndaily = 3\n", "P")  # ordinary nesting is fine


def test_control_characters_are_escaped_in_every_part_of_the_message() -> None:
    error = rejected(BASE + '"\\u001b[2Jevil\\nline" = 1\n')
    assert str(error) == r"""P: groups.app."\x1b[2Jevil\nline": unknown key '\x1b[2Jevil\nline'"""
    error = PolicyError("/etc/p\rolicy.toml", "groups.\u202eapp", "got '\x9b31m'")
    assert str(error) == r"/etc/p\rolicy.toml: groups.\u202eapp: got '\x9b31m'"
    assert printable("München, 東京, ∑ and spaces") == "München, 東京, ∑ and spaces"


@pytest.mark.parametrize("value", ["/persist/\x1b[31mapp", "/persist/app\n", "/persist/\u202eppa", "/persist/\tapp"])
def test_paths_with_control_or_invisible_characters_are_refused(value: str) -> None:
    text = BASE.replace('"/persist/app"', '"' + value.encode("unicode_escape").decode().replace("\\x", "\\u00") + '"')
    error = rejected(text)
    assert error.key == "groups.app.datasets[0]" and "control or invisible characters" in error.problem
    assert str(error).isprintable()


def test_counts_names_and_bools_are_bounded_and_strict() -> None:
    assert "must be 100000 or less" in str(rejected(BASE + "[groups.app.retention]\ndaily = 100001\n"))
    assert "a number of 66 bits" in str(rejected(BASE + f"[groups.app.retention]\ndaily = {2**65}\n"))
    assert "up to 100" in str(rejected(BASE.replace("[groups.app]", f"[groups.{'a' * 101}]")))
    assert "expected true or false" in str(rejected(BASE.replace("datasets", 'send_raw = 1\ndatasets')))
