"""The offsite data path: a send stream cut into chunks, compressed, sealed, hashed, stored; and back.

Python must see these bytes (to compress, encrypt and hash them), so it reads the send process's
pipe with ``readinto`` into one reused 1 MiB buffer, and the heavy work happens in C (zstd, AES-GCM,
SHA-256), which releases the GIL; the store uploads parts in background threads. zstd runs
single-threaded on purpose: its multi-threaded mode emits a chunk's output only at the end, which
would hold the whole chunk in memory. Memory stays at a few MiB plus the store's parts in flight, whatever the stream's size.

Chunks are cut at fixed offsets of the *raw* stream, and each is compressed on its own. An
interrupted upload is continued by running the same send again, checking that the first chunks'
raw bytes hash to what was recorded, and storing from the first missing chunk on.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass

import zstandard

from snapsync.offsite.archive import ChunkRecord, Manifest
from snapsync.errors import IntegrityError
from snapsync.offsite.objectstore import ObjectStore
from snapsync.offsite.sealing import SEGMENT, ChunkSealer, Key, open_chunk
from snapsync.host.streams import Meter

READ = 1 << 20


class StreamChanged(Exception):
    """The send stream being continued differs from the interrupted one; it must start over."""


@dataclass
class RawSource:
    """The send process's stdout, read into one reused buffer."""

    file: io.RawIOBase
    meter: Meter

    def __post_init__(self) -> None:
        self.buffer = bytearray(READ)
        self.view = memoryview(self.buffer)
        self.bytes = 0

    def read(self, limit: int, metered: bool = True) -> memoryview:
        n = self.file.readinto(self.view[: min(READ, limit)]) or 0
        self.bytes += n
        if n and metered:
            self.meter.add(n)
        return self.view[:n]

    def skip(self, record: ChunkRecord) -> None:
        """Consume one already-stored chunk's raw bytes, checking they are the same bytes.

        Not metered: these bytes go nowhere, so neither the rate limit nor progress applies.
        """
        digest = hashlib.sha256()
        left = record.raw
        while left:
            piece = self.read(left, metered=False)
            if not piece:
                raise StreamChanged("the stream ended early")
            digest.update(piece)
            left -= len(piece)
        if digest.hexdigest() != record.raw_sha256:
            raise StreamChanged("the stream's bytes differ")


def store_chunk(
    source: RawSource,
    store: ObjectStore,
    key: Key,
    manifest: Manifest,
    index: int,
    level: int,
) -> ChunkRecord | None:
    """Read up to one chunk of raw stream and store it sealed; None at the end of the stream."""
    first = source.read(manifest.chunk_size)
    if not first and index > 0:
        return None
    raw_hash, stored_hash = hashlib.sha256(), hashlib.sha256()
    raw = size = 0
    sealer = ChunkSealer(key, manifest.place(index))
    writer = store.writer(manifest.chunk_key(index))
    compress: Callable[[memoryview], bytes] | None = None
    flush: Callable[[], bytes] = bytes
    if manifest.compression == "zstd":
        zobj = zstandard.ZstdCompressor(level=level).compressobj()  # threads would hold a whole chunk until flush
        compress, flush = zobj.compress, zobj.flush

    def emit(data: bytes) -> None:
        nonlocal size
        stored_hash.update(data)
        writer.write(data)
        size += len(data)

    try:
        emit(sealer.header)
        pending = bytearray()
        piece = first
        while piece:
            raw_hash.update(piece)
            raw += len(piece)
            pending += compress(piece) if compress else piece
            while len(pending) > SEGMENT:
                emit(sealer.seal(memoryview(pending)[:SEGMENT], last=False))
                del pending[:SEGMENT]
            piece = source.read(manifest.chunk_size - raw) if raw < manifest.chunk_size else memoryview(b"")
        pending += flush()
        while len(pending) > SEGMENT:
            emit(sealer.seal(memoryview(pending)[:SEGMENT], last=False))
            del pending[:SEGMENT]
        emit(sealer.seal(pending, last=True))
        stored = writer.commit()
    except BaseException:
        writer.abort()
        raise
    if stored != size:
        raise IntegrityError(f"{manifest.chunk_key(index)}: stored {stored} bytes, wrote {size}")
    return ChunkRecord(raw, raw_hash.hexdigest(), size, stored_hash.hexdigest(), sealer.salt.hex())


def replay_chunk(
    store: ObjectStore,
    key: Key,
    manifest: Manifest,
    index: int,
    name: str,
    write: Callable[[bytes], object] | None,
) -> int:
    """Check one chunk completely and hand its raw bytes to ``write`` (None: only check).

    Every segment is authenticated before its plaintext moves on; the whole object's hash, the raw
    hash and both sizes are checked against the (authenticated) manifest at the end. Returns the
    raw byte count.
    """
    record = manifest.chunks[index]
    reader = store.reader(manifest.chunk_key(index))
    stored_hash, raw_hash = hashlib.sha256(), hashlib.sha256()
    counted = 0
    raw = 0

    def read(n: int) -> bytes:
        nonlocal counted
        data = reader.read(n)
        stored_hash.update(data)
        counted += len(data)
        return data

    decompress: Callable[[bytes], bytes] | None = None
    if manifest.compression == "zstd":
        decompress = zstandard.ZstdDecompressor().decompressobj().decompress
    try:
        for plain in open_chunk(read, key, manifest.place(index), name, bytes.fromhex(record.salt)):
            out = decompress(plain) if decompress else plain
            if out:
                raw_hash.update(out)
                raw += len(out)
                if write is not None:
                    write(out)
    except zstandard.ZstdError as e:
        raise IntegrityError(f"{name}: does not decompress ({e})") from None
    finally:
        reader.close()
    if counted != record.size or stored_hash.hexdigest() != record.sha256:
        raise IntegrityError(f"{name}: {counted} bytes with another hash than the manifest's {record.size}")
    if raw != record.raw or raw_hash.hexdigest() != record.raw_sha256:
        raise IntegrityError(f"{name}: decodes to {raw} bytes that differ from the {record.raw} the manifest records")
    return raw
