"""Hand-made btrfs send streams (format v1), as a hostile sending host would write them.

``btrfs send`` only emits what a real subvolume holds; an attacker writes the stream directly, with
paths that climb out (``..``), symlinks to follow, hard links and clones of things outside the
destination. Commands and attributes are those of the kernel's ``send.h``; the checksum is CRC-32C
with seed 0 and no final inversion, over the header (checksum zeroed) and the attributes.
"""

from __future__ import annotations

import struct
import uuid as uuidlib

MAGIC = b"btrfs-stream\0"

SUBVOL, SNAPSHOT, MKFILE, MKDIR, MKNOD, MKFIFO, MKSOCK, SYMLINK, RENAME, LINK, UNLINK, RMDIR = range(1, 13)
SET_XATTR, REMOVE_XATTR, WRITE, CLONE, TRUNCATE, CHMOD, CHOWN, UTIMES, END = range(13, 22)

A_UUID, A_CTRANSID, A_INO, A_SIZE, A_MODE, A_UID, A_GID, A_RDEV = range(1, 9)
A_CTIME, A_MTIME, A_ATIME, A_OTIME, A_XATTR_NAME, A_XATTR_DATA = range(9, 15)
A_PATH, A_PATH_TO, A_PATH_LINK, A_FILE_OFFSET, A_DATA = range(15, 20)
A_CLONE_UUID, A_CLONE_CTRANSID, A_CLONE_PATH, A_CLONE_OFFSET, A_CLONE_LEN = range(20, 25)


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes, crc: int = 0) -> int:
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc


def _tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("<HH", kind, len(value)) + value


def u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def timespec(seconds: int = 0) -> bytes:
    return struct.pack("<QI", seconds, 0)


class Stream:
    """Commands appended in order; ``bytes()`` gives the stream."""

    def __init__(self) -> None:
        self.commands: list[bytes] = []
        self.ino = 1000

    def cmd(self, kind: int, *attrs: tuple[int, bytes]) -> Stream:
        payload = b"".join(_tlv(k, v) for k, v in attrs)
        header = struct.pack("<IHI", len(payload), kind, 0)
        crc = crc32c(header + payload)
        self.commands.append(struct.pack("<IHI", len(payload), kind, crc) + payload)
        return self

    def subvol(self, name: str, uuid: bytes, ctransid: int = 7) -> Stream:
        return self.cmd(SUBVOL, (A_PATH, name.encode()), (A_UUID, uuid), (A_CTRANSID, u64(ctransid)))

    def snapshot(self, name: str, uuid: bytes, parent_uuid: bytes, parent_ctransid: int, ctransid: int = 9) -> Stream:
        return self.cmd(
            SNAPSHOT, (A_PATH, name.encode()), (A_UUID, uuid), (A_CTRANSID, u64(ctransid)),
            (A_CLONE_UUID, parent_uuid), (A_CLONE_CTRANSID, u64(parent_ctransid)),
        )

    def mkfile(self, path: str) -> Stream:
        self.ino += 1
        return self.cmd(MKFILE, (A_PATH, path.encode()), (A_INO, u64(self.ino)))

    def mkdir(self, path: str) -> Stream:
        self.ino += 1
        return self.cmd(MKDIR, (A_PATH, path.encode()), (A_INO, u64(self.ino)))

    def mknod(self, path: str, mode: int, rdev: int) -> Stream:
        self.ino += 1
        return self.cmd(MKNOD, (A_PATH, path.encode()), (A_INO, u64(self.ino)), (A_MODE, u64(mode)), (A_RDEV, u64(rdev)))

    def symlink(self, path: str, target: str) -> Stream:
        self.ino += 1
        return self.cmd(SYMLINK, (A_PATH, path.encode()), (A_INO, u64(self.ino)), (A_PATH_LINK, target.encode()))

    def write(self, path: str, data: bytes, offset: int = 0) -> Stream:
        return self.cmd(WRITE, (A_PATH, path.encode()), (A_FILE_OFFSET, u64(offset)), (A_DATA, data))

    def link(self, path: str, existing: str) -> Stream:
        return self.cmd(LINK, (A_PATH, path.encode()), (A_PATH_LINK, existing.encode()))

    def rename(self, path: str, to: str) -> Stream:
        return self.cmd(RENAME, (A_PATH, path.encode()), (A_PATH_TO, to.encode()))

    def unlink(self, path: str) -> Stream:
        return self.cmd(UNLINK, (A_PATH, path.encode()))

    def rmdir(self, path: str) -> Stream:
        return self.cmd(RMDIR, (A_PATH, path.encode()))

    def set_xattr(self, path: str, name: str, value: bytes) -> Stream:
        return self.cmd(SET_XATTR, (A_PATH, path.encode()), (A_XATTR_NAME, name.encode()), (A_XATTR_DATA, value))

    def chmod(self, path: str, mode: int) -> Stream:
        return self.cmd(CHMOD, (A_PATH, path.encode()), (A_MODE, u64(mode)))

    def chown(self, path: str, uid: int, gid: int) -> Stream:
        return self.cmd(CHOWN, (A_PATH, path.encode()), (A_UID, u64(uid)), (A_GID, u64(gid)))

    def truncate(self, path: str, size: int) -> Stream:
        return self.cmd(TRUNCATE, (A_PATH, path.encode()), (A_SIZE, u64(size)))

    def clone(self, path: str, length: int, src_uuid: bytes, src_ctransid: int, src_path: str) -> Stream:
        return self.cmd(
            CLONE, (A_PATH, path.encode()), (A_FILE_OFFSET, u64(0)), (A_CLONE_LEN, u64(length)),
            (A_CLONE_UUID, src_uuid), (A_CLONE_CTRANSID, u64(src_ctransid)),
            (A_CLONE_PATH, src_path.encode()), (A_CLONE_OFFSET, u64(0)),
        )

    def utimes(self, path: str) -> Stream:
        t = timespec(1_700_000_000)
        return self.cmd(UTIMES, (A_PATH, path.encode()), (A_ATIME, t), (A_MTIME, t), (A_CTIME, t))

    def end(self) -> Stream:
        return self.cmd(END)

    def __bytes__(self) -> bytes:
        return MAGIC + struct.pack("<I", 1) + b"".join(self.commands)


def new_uuid() -> bytes:
    return uuidlib.uuid4().bytes
