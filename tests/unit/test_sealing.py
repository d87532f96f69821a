"""Sealed chunks and authenticated manifests: every kind of damage is caught, with the object's name."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import pytest

from snapsync.errors import IntegrityError, UsageError, WrongKey
from snapsync.offsite.sealing import SEGMENT, ChunkSealer, ForeignRecord, Key, create_key_file, open_chunk, sign, unseal

PLACE = b"snapsync-chunk\0g\0d\0s\x000"


def sealed(key: Key, data: bytes, place: bytes = PLACE) -> bytes:
    sealer = ChunkSealer(key, place)
    pieces = [data[i : i + SEGMENT] for i in range(0, len(data), SEGMENT)] or [b""]
    return sealer.header + b"".join(sealer.seal(p, last=i == len(pieces) - 1) for i, p in enumerate(pieces))


def opened(key: Key, blob: bytes, place: bytes = PLACE) -> bytes:
    return b"".join(open_chunk(io.BytesIO(blob).read, key, place, "obj"))


@pytest.fixture
def key() -> Key:
    return Key(os.urandom(32), "k")


@pytest.mark.parametrize("size", [0, 1, SEGMENT, SEGMENT + 1, 3 * SEGMENT - 7])
def test_round_trip(key: Key, size: int) -> None:
    data = os.urandom(size)
    assert opened(key, sealed(key, data)) == data


def test_a_flipped_byte_fails_authentication(key: Key) -> None:
    blob = bytearray(sealed(key, os.urandom(SEGMENT + 100)))
    blob[len(blob) // 2] ^= 1
    with pytest.raises(IntegrityError, match="obj: segment 0 failed authentication"):
        opened(key, bytes(blob))


@pytest.mark.parametrize("cut", [5, 30, SEGMENT // 2, SEGMENT + 20 + 4 + 16])
def test_a_truncated_chunk_is_detected(key: Key, cut: int) -> None:
    blob = sealed(key, os.urandom(2 * SEGMENT))
    with pytest.raises(IntegrityError, match="obj: (truncated|segment)"):
        opened(key, blob[:cut])


def test_dropping_the_last_segment_is_detected(key: Key) -> None:
    data = os.urandom(2 * SEGMENT)
    blob = sealed(key, data)
    first_end = 16 + 16 + 4 + SEGMENT + 16
    with pytest.raises(IntegrityError, match="last segment is missing"):
        opened(key, blob[:first_end])


def test_trailing_data_is_detected(key: Key) -> None:
    with pytest.raises(IntegrityError, match="after the last segment"):
        opened(key, sealed(key, b"abc") + b"x")


def test_a_chunk_from_another_place_fails(key: Key) -> None:
    blob = sealed(key, b"payload", place=b"snapsync-chunk\0g\0d\0other\x000")
    with pytest.raises(IntegrityError, match="moved from another place"):
        opened(key, blob)


def test_another_key_cannot_open_a_chunk(key: Key) -> None:
    with pytest.raises(IntegrityError):
        opened(Key(os.urandom(32)), sealed(key, b"payload"))


def test_manifest_round_trip_and_tampering(key: Key) -> None:
    body = {"snapshot": "s1", "chunks": [{"raw": 3}]}
    blob = sign(key, body)
    assert unseal(key, blob, "m") == body | {"key_id": key.key_id}
    with pytest.raises(IntegrityError, match="m: failed authentication"):
        unseal(key, blob.replace(b'"raw":3', b'"raw":4'), "m")
    with pytest.raises(IntegrityError, match="not JSON"):
        unseal(key, blob[:-3], "m")


def test_a_record_of_another_key_is_only_foreign_and_carries_the_wrong_key_error(key: Key) -> None:
    other = Key(os.urandom(32), "/etc/other.key")
    with pytest.raises(ForeignRecord, match="m: not authentic: claims key") as info:
        unseal(other, sign(key, {"a": 1}), "m")
    assert info.value.key_id == key.key_id and info.value.exit_code == 1
    assert isinstance(info.value.wrong_key, WrongKey) and info.value.wrong_key.exit_code == 2
    assert f"made with key '{key.key_id}', but /etc/other.key is key" in str(info.value.wrong_key)


@pytest.mark.parametrize(
    "blob",
    [
        b'{"key_id":"0123456789abcdef","mac":"x"}',
        b'{"key_id":"not hex","mac":"' + b"0" * 64 + b'"}',
        rb'{"key_id":["\u001b[31m"],"mac":"' + b"0" * 64 + b'"}',
    ],
)
def test_junk_naming_another_key_is_not_taken_for_a_real_record(key: Key, blob: bytes) -> None:
    with pytest.raises(ForeignRecord) as info:
        unseal(key, blob, "m")
    assert info.value.key_id is None and "\x1b" not in str(info.value)


def test_key_files_are_private_never_overwritten_and_load_back(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "offsite.key"
    key = create_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Key.load(path).key_id == key.key_id
    with pytest.raises(UsageError, match="already exists; refusing to overwrite"):
        create_key_file(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "key file does not exist.*snapsync keygen"),
        ("hello\n", "not a snapsync offsite key"),
        ("snapsync-offsite-key-v1:!!!\n", "not valid base64"),
        ("snapsync-offsite-key-v1:YWJj\n", "32 bytes, this one has 3"),
    ],
)
def test_bad_key_files_give_one_line_errors(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "k"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UsageError, match=message):
        Key.load(path)


def test_an_object_from_an_earlier_attempt_at_the_same_place_is_refused_before_decrypting(key: Key) -> None:
    earlier = sealed(key, b"first attempt")
    current = ChunkSealer(key, PLACE)
    with pytest.raises(IntegrityError, match="obj: not the object its manifest records"):
        b"".join(open_chunk(io.BytesIO(earlier).read, key, PLACE, "obj", current.salt))
