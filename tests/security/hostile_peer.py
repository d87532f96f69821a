"""A compromised host behind a send-role key: the real ``snapsync serve --role send`` answers every
request, except that a ``send`` is answered with the honest header and then a hand-made stream that
tries to write outside the copy (a symlink to ``OUTSIDE`` and writes through it, ``..`` paths).

Used as an ssh forced command: ``python tests/security/hostile_peer.py OUTSIDE -- <serve argv>``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.security.btrfs_stream import Stream  # noqa: E402


def hostile(name: str, guid: str, outside: str) -> bytes:
    up = "../" * 40 + outside.lstrip("/")
    stream = (
        Stream().subvol(name, bytes.fromhex(guid))
        .mkfile("data.txt").write("data.txt", b"looks honest\n")
        .symlink("lnk", outside).mkfile("lnk/planted").write("lnk/planted", b"owned by the peer\n")
        .mkfile(up + "/planted2").write(up + "/planted2", b"owned by the peer\n")
        .utimes("").end()
    )
    return bytes(stream)


def main() -> int:
    outside, serve = sys.argv[1], sys.argv[3:]
    line = b""
    while not line.endswith(b"\n"):
        chunk = os.read(0, 1)
        if not chunk:
            break
        line += chunk
    request = json.loads(line)
    if request.get("op") != "send":
        return subprocess.run(serve, input=line, stdout=1).returncode
    honest = subprocess.run(serve, input=line, capture_output=True)
    header = honest.stdout.split(b"\n", 1)[0] + b"\n"
    answer = json.loads(header)
    os.write(1, header)
    if answer.get("ok"):
        payload = hostile(answer["name"], answer["guid"], outside)
        view = memoryview(payload)
        while view:
            view = view[os.write(1, view) :]
    return 0


if __name__ == "__main__":
    sys.exit(main())
