"""Client-side encryption of offsite objects: the host's key file, sealed chunks, authenticated manifests.

One 32-byte secret per host (the key file) is the root of everything; HKDF derives separate keys
from it for chunks, manifests and the key's fingerprint, so no key is used for two purposes.

A chunk object is ``MAGIC | salt | segment*``. Each chunk gets its own key (HKDF with a random
salt), and its compressed bytes are sealed in segments of at most 1 MiB with AES-256-GCM, using the
STREAM construction: the nonce is the segment counter plus a "last segment" flag, and the
associated data names the chunk's place (group, dataset, snapshot, chunk index). So a flipped bit,
a reordered or dropped segment, a truncated object and a chunk copied from another snapshot or
position all fail authentication before any plaintext is released; memory stays at one segment.

Manifests (and the archive's head records) are JSON with an HMAC-SHA256 over their canonical form,
plus the key's fingerprint. A record that names another key is only *foreign*: anybody who can write
to the archive can plant one, so whether the key file is wrong is decided over the whole archive
(:meth:`snapsync.offsite.archive.Archive.trust`), never by one record.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from snapsync.errors import IntegrityError, UsageError, WrongKey

KEY_HEADER = "snapsync-offsite-key-v1:"
MAGIC = b"SNAPSYNC-CHUNK1\n"
SALT_BYTES = 16
SEGMENT = 1 << 20
_LENGTH = struct.Struct(">I")
_TAG = 16
CIPHER = "aes-256-gcm-stream-1MiB"


def _derive(secret: bytes, info: bytes, salt: bytes | None = None, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(secret)


class Key:
    """A host's offsite key. ``key_id`` is a fingerprint: safe to print, useless to an attacker."""

    def __init__(self, secret: bytes, path: str = "<memory>") -> None:
        if len(secret) != 32:
            raise UsageError(f"{path}: an offsite key is 32 bytes, this one has {len(secret)}")
        self._secret = secret
        self.path = path
        self._mac_key = _derive(secret, b"snapsync manifest mac v1")
        self.key_id = _derive(secret, b"snapsync key id v1", length=8).hex()

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Key:
        p = Path(path)
        try:
            text = p.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            raise UsageError(
                f"{p}: key file does not exist (create one with `snapsync keygen {p}`, then back it up: "
                f"without it nothing uploaded can be restored)"
            ) from None
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"{p}: cannot read the key file: {getattr(e, 'strerror', None) or e}") from None
        if not text.startswith(KEY_HEADER):
            raise UsageError(f"{p}: not a snapsync offsite key (expected a line starting {KEY_HEADER!r})")
        try:
            secret = base64.b64decode(text[len(KEY_HEADER):], validate=True)
        except ValueError:
            raise UsageError(f"{p}: the key is not valid base64") from None
        return cls(secret, str(p))

    def mac(self, data: bytes) -> str:
        return hmac.new(self._mac_key, data, hashlib.sha256).hexdigest()

    def chunk_cipher(self, salt: bytes) -> AESGCM:
        return AESGCM(_derive(self._secret, b"snapsync chunk v1", salt=salt))


def create_key_file(path: str | os.PathLike[str]) -> Key:
    """Write a new random key, readable by its owner only; never overwrites an existing file."""
    secret = os.urandom(32)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise UsageError(f"{p}: already exists; refusing to overwrite a key (uploads made with it would be lost)") from None
    with os.fdopen(fd, "w") as f:
        f.write(KEY_HEADER + base64.b64encode(secret).decode() + "\n")
        f.flush()
        os.fsync(f.fileno())
    return Key(secret, str(p))


def _nonce(counter: int, last: bool) -> bytes:
    return counter.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


class ChunkSealer:
    """Seals one chunk's segments in order; ``header`` goes first in the object."""

    def __init__(self, key: Key, place: bytes) -> None:
        self.salt = os.urandom(SALT_BYTES)
        self._aead = key.chunk_cipher(self.salt)
        self._place = place
        self._counter = 0

    @property
    def header(self) -> bytes:
        return MAGIC + self.salt

    def seal(self, segment: bytes | bytearray | memoryview, last: bool) -> bytes:
        sealed = self._aead.encrypt(_nonce(self._counter, last), bytes(segment), self._place)
        self._counter += 1
        return _LENGTH.pack(len(sealed)) + sealed


def open_chunk(
    read: Callable[[int], bytes], key: Key, place: bytes, name: str, salt: bytes | None = None
) -> Iterator[bytes]:
    """Yield a chunk's plaintext segments; raise :class:`IntegrityError` naming ``name`` on any defect.

    ``salt`` (from the authenticated manifest) pins the exact object: another object sealed for the
    same place, by an earlier attempt, is refused before anything is decrypted.
    """

    def exactly(n: int, what: str) -> bytes:
        data = b""
        while len(data) < n:
            piece = read(n - len(data))
            if not piece:
                raise IntegrityError(f"{name}: truncated ({what} cut short)")
            data += piece
        return data

    if exactly(len(MAGIC), "header") != MAGIC:
        raise IntegrityError(f"{name}: not a snapsync chunk (bad header)")
    found = exactly(SALT_BYTES, "header")
    if salt is not None and found != salt:
        raise IntegrityError(f"{name}: not the object its manifest records (another upload's chunk)")
    aead = key.chunk_cipher(found)
    counter = 0
    while True:
        head = read(_LENGTH.size)
        if not head:
            raise IntegrityError(f"{name}: truncated (the last segment is missing)")
        (length,) = _LENGTH.unpack(head if len(head) == _LENGTH.size else head + exactly(_LENGTH.size - len(head), "length"))
        if not _TAG <= length <= SEGMENT + _TAG:
            raise IntegrityError(f"{name}: corrupt (segment {counter} claims {length} bytes)")
        sealed = exactly(length, f"segment {counter}")
        for last in (False, True):
            try:
                plain = aead.decrypt(_nonce(counter, last), sealed, place)
                break
            except InvalidTag:
                continue
        else:
            raise IntegrityError(
                f"{name}: segment {counter} failed authentication (corrupt, tampered with, or moved from another place)"
            )
        counter += 1
        yield plain
        if last:
            if read(1):
                raise IntegrityError(f"{name}: corrupt (data after the last segment)")
            return


def canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sign(key: Key, body: dict[str, Any]) -> bytes:
    """The stored form of a manifest: its fields plus ``key_id`` and ``mac``."""
    body = {k: v for k, v in body.items() if k != "mac"} | {"key_id": key.key_id}
    return canonical(body | {"mac": key.mac(canonical(body))})


_KEY_ID = re.compile(r"[0-9a-f]{16}")
_MAC = re.compile(r"[0-9a-f]{64}")


def shown(value: object, limit: int = 40) -> str:
    """An untrusted value for a one-line message: quoted, escaped, cut short, and with no brackets a
    terminal renderer could take for markup."""
    text = repr(value).replace("[", "%5B").replace("]", "%5D") if isinstance(value, str) else f"a {type(value).__name__}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


class ForeignRecord(IntegrityError):
    """A record sealed with another key, or claiming to be. One alone proves nothing about the key file."""

    def __init__(self, name: str, key: Key, key_id: object, well_formed: bool) -> None:
        super().__init__(
            f"{name}: not authentic: claims key {shown(key_id)}, this archive's key is {key.key_id!r} "
            f"(foreign, planted or tampered with); skipped"
        )
        self.key_id = str(key_id) if well_formed else None
        """The other key's id when the record looks like a real one; None for junk."""
        self.wrong_key = WrongKey(
            f"{name}: made with key {shown(key_id)}, but {key.path} is key {key.key_id!r}; "
            f"use the key file these backups were made with"
        )


def unseal(key: Key, data: bytes, name: str) -> dict[str, Any]:
    """A record's fields, after checking it was written with ``key`` and not changed since."""
    try:
        stored = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise IntegrityError(f"{name}: corrupt (not JSON)") from None
    if not isinstance(stored, dict) or not isinstance(stored.get("mac"), str):
        raise IntegrityError(f"{name}: corrupt (no authentication code)")
    key_id = stored.get("key_id")
    if key_id != key.key_id:
        well_formed = isinstance(key_id, str) and bool(_KEY_ID.fullmatch(key_id)) and bool(_MAC.fullmatch(stored["mac"]))
        raise ForeignRecord(name, key, key_id, well_formed)
    mac = stored.pop("mac")
    if not hmac.compare_digest(mac, key.mac(canonical(stored))):
        raise IntegrityError(f"{name}: failed authentication (the record was changed after it was written)")
    return stored
