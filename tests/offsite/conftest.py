"""A real S3 endpoint on loopback (moto's server mode) and an offsite rig on real btrfs."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from snapsync.offsite.sealing import create_key_file

ACCESS_KEY = "AKIDSNAPSYNCTEST"
SECRET_KEY = "sEcReT-never-printed-0123456789abcdef"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as e:
        if os.environ.get("SNAPSYNC_REQUIRE_BTRFS") == "1":
            pytest.fail(f"moto[server] is required in CI: {e}")
        pytest.skip(f"moto[server] not installed: {e}")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(k, raising=False)
    return env


@dataclass
class Bucket:
    endpoint: str
    name: str
    client: Any

    def keys(self, prefix: str = "") -> dict[str, dict[str, Any]]:
        out = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix):
            for item in page.get("Contents", ()):
                out[item["Key"]] = item
        return out

    def read(self, key: str) -> bytes:
        return bytes(self.client.get_object(Bucket=self.name, Key=key)["Body"].read())

    def write(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.name, Key=key, Body=data)


@pytest.fixture
def bucket(s3_endpoint: str, s3_env: dict[str, str]) -> Bucket:
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    name = f"snapsync-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return Bucket(s3_endpoint, name, client)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys" / "offsite.key"
    create_key_file(path)
    return path


def s3_table(bucket: Bucket, key_file: Path, **extra: str | int) -> str:
    lines = [
        'type = "s3"',
        f'endpoint_url = "{bucket.endpoint}"',
        f'bucket = "{bucket.name}"',
        'prefix = "homelab/"',
        f'key_file = "{key_file}"',
    ]
    for k, v in extra.items():
        lines.append(f"{k} = {v!r}" if isinstance(v, int) else f'{k} = "{v}"')
    return "\n".join(lines)
