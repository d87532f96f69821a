"""Where offsite objects live: a directory (a NAS share, a USB disk) or an S3-compatible bucket.

Both stores move opaque bytes under relative keys and know nothing about snapshots, chains or
retention. Writes are atomic: a directory store writes a temporary file and renames it, a bucket
completes a multipart upload; a reader never sees half an object. Large objects stream with
bounded memory (a few parts in flight). Network failures that may pass (throttling, 5xx, timeouts,
dropped connections) raise :class:`TransientError` and are retried with backoff; anything else is
a :class:`StoreError` with the reason, never with a secret in it.
"""

from __future__ import annotations

import errno
import os
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar

from snapsync.errors import IntegrityError, SnapsyncError, StoreError, TransientError, UsageError
from snapsync.retry import retrying

PART = 8 << 20
IN_FLIGHT = 4
_TEMP = ".part-"
T = TypeVar("T")


class Missing(IntegrityError):
    """An object the caller expected is not in the store."""


class ObjectWriter(Protocol):
    def write(self, data: bytes | bytearray | memoryview) -> None: ...

    def commit(self) -> int:
        """Make the object visible; returns its size as the store reports it."""
        ...

    def abort(self) -> None: ...


class ObjectReader(Protocol):
    def read(self, n: int) -> bytes: ...

    def close(self) -> None: ...


class ObjectStore(Protocol):
    def describe(self) -> str: ...

    def identity(self) -> str:
        """Which place this is, for this host's records of what it uploaded there."""
        ...

    def check(self) -> None:
        """Fail early, with the reason, when the store cannot be used at all."""
        ...

    def list(self, prefix: str) -> dict[str, int]:
        """Every object below ``prefix`` with its size."""
        ...

    def get(self, key: str) -> bytes: ...

    def put(self, key: str, data: bytes) -> None: ...

    def writer(self, key: str) -> ObjectWriter: ...

    def reader(self, key: str) -> ObjectReader: ...

    def delete(self, keys: Sequence[str]) -> None: ...

    def clean_incomplete(self, prefix: str) -> int:
        """Remove leftovers of interrupted writes (temporary files, multipart uploads); returns how many."""
        ...


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts[:-1]) or parts[-1] in (".", ".."):
        raise UsageError(f"invalid object key {key!r}")
    return key


def valid_key(key: str) -> bool:
    """Whether ``key`` is one snapsync could have written (a listing may hold anything)."""
    try:
        _check_key(key)
    except UsageError:
        return False
    return True


_TRANSIENT_ERRNO = {errno.EIO, errno.ETIMEDOUT, errno.ESTALE, errno.EAGAIN, errno.EINTR, errno.ECONNRESET, errno.EHOSTDOWN}


@contextmanager
def _os_errors(where: str) -> Iterator[None]:
    """A file system's refusal as snapsync's errors: a full or read-only share is permanent, an
    NFS hiccup transient; either way one line naming the place, never a traceback."""
    try:
        yield
    except FileNotFoundError:
        raise
    except OSError as e:
        text = f"{where}: {e.strerror or e}"
        raise (TransientError(text) if e.errno in _TRANSIENT_ERRNO else StoreError(text)) from None


class DirStore:
    """Objects as files below ``root``; the directory must exist (a mount point is not created).

    Every operation is retried like a network call when the file system fails transiently (NFS).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def _retried(self, what: str, fn: Callable[[], T]) -> T:
        for attempt in retrying(f"{self.root}: {what}"):
            with attempt, _os_errors(f"{self.root}: {what}"):
                return fn()
        raise AssertionError("unreachable")

    def describe(self) -> str:
        return str(self.root)

    def identity(self) -> str:
        return f"dir:{os.path.abspath(self.root)}"

    def check(self) -> None:
        if not self.root.is_dir():
            raise StoreError(f"{self.root}: directory does not exist (is the disk or share mounted?)")
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StoreError(f"{self.root}: not writable by this user")

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def _base(self, prefix: str) -> Path:
        if prefix:
            _check_key(prefix.rstrip("/") + "/x")
        return self.root / prefix if prefix else self.root

    def list(self, prefix: str) -> dict[str, int]:
        def walk() -> dict[str, int]:
            out: dict[str, int] = {}
            for directory, _, files in os.walk(self._base(prefix)):
                for name in files:
                    if name.startswith(_TEMP):
                        continue
                    path = Path(directory) / name
                    out[path.relative_to(self.root).as_posix()] = path.stat().st_size
            return out

        return self._retried(f"list {prefix or '/'}", walk)

    def get(self, key: str) -> bytes:
        try:
            return self._retried(f"read {key}", self._path(key).read_bytes)
        except FileNotFoundError:
            raise Missing(f"{self.root}/{key}: missing") from None

    def put(self, key: str, data: bytes) -> None:
        def write() -> None:
            w = self.writer(key)
            try:
                w.write(data)
                w.commit()
            except BaseException:
                w.abort()
                raise

        self._retried(f"write {key}", write)

    def writer(self, key: str) -> ObjectWriter:
        with _os_errors(f"{self.root}: write {key}"):
            return _FileWriter(self._path(key))

    def reader(self, key: str) -> ObjectReader:
        try:
            with _os_errors(f"{self.root}: read {key}"):
                return open(self._path(key), "rb")
        except FileNotFoundError:
            raise Missing(f"{self.root}/{key}: missing") from None

    def delete(self, keys: Sequence[str]) -> None:
        def remove() -> None:
            parents = set()
            for key in keys:
                path = self._path(key)
                path.unlink(missing_ok=True)
                parents.add(path.parent)
            for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):
                while parent != self.root and parent.is_relative_to(self.root):
                    try:
                        parent.rmdir()
                    except OSError:
                        break
                    parent = parent.parent

        self._retried(f"delete {len(keys)} object(s)", remove)

    def clean_incomplete(self, prefix: str) -> int:
        def clean() -> int:
            count = 0
            for directory, _, files in os.walk(self._base(prefix)):
                for name in files:
                    if name.startswith(_TEMP):
                        (Path(directory) / name).unlink(missing_ok=True)
                        count += 1
            return count

        return self._retried("remove unfinished writes", clean)


class _FileWriter:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.temp = path.with_name(f"{_TEMP}{uuid.uuid4().hex}-{path.name}")
        self.file: IO[bytes] = open(self.temp, "xb")

    def write(self, data: bytes | bytearray | memoryview) -> None:
        with _os_errors(f"write {self.path}"):
            self.file.write(data)

    def commit(self) -> int:
        with _os_errors(f"write {self.path}"):
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.temp, self.path)
            fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            return self.path.stat().st_size

    def abort(self) -> None:
        try:
            self.file.close()  # flushes what is buffered: may fail again on a full disk
        except OSError:
            pass
        self.temp.unlink(missing_ok=True)


_THROTTLED = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "TooManyRequests",
              "ServiceUnavailable", "InternalError", "RequestLimitExceeded"}
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
           "AllAccessDisabled", "AccountProblem"}


def scrub(text: str) -> str:
    """Blank out secrets that might be echoed in a library's message (they never should be)."""
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        secret = os.environ.get(name)
        if secret and len(secret) >= 8:
            text = text.replace(secret, "***")
    return text


class S3Store:
    """An S3-compatible bucket (AWS, B2, Wasabi, MinIO...); keys live below ``prefix``.

    Credentials come from boto3's usual chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
    ``AWS_PROFILE``, a shared credentials file), optionally narrowed to ``profile`` and
    ``credentials_file`` from the target; never from the policy itself.
    """

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str | None = None,
        endpoint_url: str | None = None,
        region: str | None = None,
        storage_class: str | None = None,
        profile: str | None = None,
        credentials_file: str | None = None,
        part_size: int = PART,
    ) -> None:
        import boto3
        import botocore.config
        import botocore.session

        self.bucket = bucket
        self.root = (prefix or "").strip("/")
        self.root = self.root + "/" if self.root else ""
        self.endpoint = endpoint_url or "AWS S3"
        self.storage_class = storage_class
        self.part_size = part_size
        core = botocore.session.Session(profile=profile)
        if credentials_file:
            core.set_config_variable("credentials_file", credentials_file)
        config = botocore.config.Config(
            retries={"mode": "standard", "total_max_attempts": 1},  # tenacity retries, and logs it
            connect_timeout=10,
            read_timeout=120,
            max_pool_connections=IN_FLIGHT + 4,
            s3={"addressing_style": "path"} if endpoint_url else None,
        )
        try:
            self.client = boto3.Session(botocore_session=core).client(
                "s3", endpoint_url=endpoint_url, region_name=region or "us-east-1", config=config
            )
        except Exception as e:  # botocore raises many types for bad profiles and endpoints
            raise StoreError(f"s3 bucket {bucket}: cannot set up the client: {scrub(str(e))}") from None

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.root}"

    def identity(self) -> str:
        return f"s3:{self.endpoint}/{self.bucket}/{self.root}"

    def _key(self, key: str) -> str:
        return self.root + _check_key(key)

    def call(self, what: str, fn: Callable[..., T], **kwargs: Any) -> T:
        """One request, retried while the failure is transient, translated into snapsync's errors."""
        for attempt in retrying(f"{self.describe()}: {what}"):
            with attempt:
                try:
                    return fn(**kwargs)
                except SnapsyncError:
                    raise
                except Exception as e:
                    raise self.translate(e, what) from None
        raise AssertionError("unreachable")

    def translate(self, error: Exception, what: str) -> SnapsyncError:
        from botocore.exceptions import (
            ClientError,
            ConnectionClosedError,
            ConnectTimeoutError,
            EndpointConnectionError,
            HTTPClientError,
            IncompleteReadError,
            NoCredentialsError,
            PartialCredentialsError,
            ReadTimeoutError,
            ResponseStreamingError,
        )
        from urllib3.exceptions import HTTPError as Urllib3Error

        where = f"{self.describe()}: {what}"
        if isinstance(error, ClientError):
            info = error.response.get("Error", {})
            code = str(info.get("Code", "?"))
            status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            message = scrub(str(info.get("Message", "")))
            if code in _THROTTLED or status >= 500 or status == 429:
                return TransientError(f"{where}: {code} (HTTP {status})")
            if code == "RequestTimeTooSkewed":
                return StoreError(f"{where}: this host's clock is too far off for the store to accept requests; fix the time")
            if code == "NoSuchBucket":
                return StoreError(f"bucket {self.bucket!r} does not exist at {self.endpoint}")
            if code in ("NoSuchKey", "404", "NotFound"):
                return Missing(f"{where}: missing")
            if code in _DENIED or status == 403:
                return StoreError(f"{where}: access denied ({code}); check the credentials and the bucket policy")
            return StoreError(f"{where}: {code}: {message}".rstrip(": "))
        if isinstance(error, (NoCredentialsError, PartialCredentialsError)):
            return StoreError(
                f"{self.describe()}: no usable S3 credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                f"or profile / credentials_file in the target)"
            )
        if isinstance(error, (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError,
                              ResponseStreamingError, IncompleteReadError, HTTPClientError, Urllib3Error,
                              ConnectionError, TimeoutError)):
            return TransientError(f"{where}: {scrub(str(error))}")
        return StoreError(f"{where}: {type(error).__name__}: {scrub(str(error))}")

    def check(self) -> None:
        try:
            self.call("check the bucket", self.client.head_bucket, Bucket=self.bucket)
        except Missing:  # HEAD answers 404 without a body, so without the NoSuchBucket code
            raise StoreError(f"bucket {self.bucket!r} does not exist at {self.endpoint}") from None

    def list(self, prefix: str) -> dict[str, int]:
        out: dict[str, int] = {}
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.root + prefix}
            if token:
                kwargs["ContinuationToken"] = token
            page = self.call(f"list {prefix}", self.client.list_objects_v2, **kwargs)
            for item in page.get("Contents", ()):
                out[item["Key"][len(self.root):]] = int(item["Size"])
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return out

    def get(self, key: str) -> bytes:
        def fetch() -> bytes:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            try:
                return bytes(body.read())
            finally:
                body.close()

        return self.call(f"get {key}", fetch)

    def _extra(self) -> dict[str, Any]:
        return {"StorageClass": self.storage_class} if self.storage_class else {}

    def put(self, key: str, data: bytes) -> None:
        self.call(f"put {key}", self.client.put_object, Bucket=self.bucket, Key=self._key(key), Body=data, **self._extra())

    def writer(self, key: str) -> ObjectWriter:
        return _MultipartWriter(self, key)

    def reader(self, key: str) -> ObjectReader:
        return _RangeReader(self, key)

    def size(self, key: str) -> int:
        head = self.call(f"head {key}", self.client.head_object, Bucket=self.bucket, Key=self._key(key))
        return int(head["ContentLength"])

    def delete(self, keys: Sequence[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = [{"Key": self._key(k)} for k in keys[i:i + 1000]]
            answer = self.call(
                f"delete {len(batch)} object(s)", self.client.delete_objects,
                Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True},
            )
            errors = answer.get("Errors") or []
            if errors:
                first = errors[0]
                raise StoreError(
                    f"{self.describe()}: could not delete {len(errors)} object(s), e.g. {first.get('Key')}: {first.get('Code')}"
                )

    def clean_incomplete(self, prefix: str) -> int:
        answer = self.call(
            f"list unfinished uploads below {prefix}", self.client.list_multipart_uploads,
            Bucket=self.bucket, Prefix=self.root + prefix,
        )
        uploads = answer.get("Uploads") or []
        for up in uploads:
            self.call(
                f"abort the unfinished upload of {up['Key']}", self.client.abort_multipart_upload,
                Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"],
            )
        return len(uploads)


class _MultipartWriter:
    """Streams one object up in parts, a few in flight at a time, so memory stays bounded.

    An object smaller than one part is a single PUT. Parts are retried on their own; the upload
    becomes visible only at ``commit``, after which its size is checked against what was written.
    """

    def __init__(self, store: S3Store, key: str) -> None:
        self.store = store
        self.key = key
        self.buffer = bytearray()
        self.upload_id: str | None = None
        self.parts: list[Future[dict[str, Any]]] = []
        self.written = 0
        self.slots = threading.BoundedSemaphore(IN_FLIGHT)
        self.pool: ThreadPoolExecutor | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.buffer += data
        self.written += len(data)
        while len(self.buffer) >= self.store.part_size:
            part = bytes(self.buffer[: self.store.part_size])
            del self.buffer[: self.store.part_size]
            self._submit(part)

    def _submit(self, data: bytes) -> None:
        s = self.store
        if self.upload_id is None:
            answer = s.call(
                f"start the upload of {self.key}", s.client.create_multipart_upload,
                Bucket=s.bucket, Key=s._key(self.key), **s._extra(),
            )
            self.upload_id = str(answer["UploadId"])
            self.pool = ThreadPoolExecutor(IN_FLIGHT, thread_name_prefix="snapsync-part")
        for done in [f for f in self.parts if f.done()]:
            done.result()  # a failed part stops the writer at once
        self.slots.acquire()
        number = len(self.parts) + 1
        assert self.pool is not None
        future = self.pool.submit(self._part, number, data)
        future.add_done_callback(lambda _: self.slots.release())
        self.parts.append(future)

    def _part(self, number: int, data: bytes) -> dict[str, Any]:
        s = self.store
        answer = s.call(
            f"upload part {number} of {self.key}", s.client.upload_part,
            Bucket=s.bucket, Key=s._key(self.key), UploadId=self.upload_id, PartNumber=number, Body=data,
        )
        return {"PartNumber": number, "ETag": answer["ETag"]}

    def commit(self) -> int:
        s = self.store
        if self.upload_id is None:
            s.put(self.key, bytes(self.buffer))
        else:
            if self.buffer or not self.parts:
                self._submit(bytes(self.buffer))
            self.buffer = bytearray()
            parts = [f.result() for f in self.parts]
            s.call(
                f"complete the upload of {self.key}", s.client.complete_multipart_upload,
                Bucket=s.bucket, Key=s._key(self.key), UploadId=self.upload_id, MultipartUpload={"Parts": parts},
            )
            self._close_pool()
        size = s.size(self.key)
        if size != self.written:
            raise IntegrityError(f"{s.describe()}{self.key}: the store holds {size} bytes, {self.written} were written")
        return size

    def abort(self) -> None:
        self.buffer = bytearray()
        for f in self.parts:
            f.cancel()
        self._close_pool()
        if self.upload_id is not None:
            s = self.store
            try:
                s.call(
                    f"abort the upload of {self.key}", s.client.abort_multipart_upload,
                    Bucket=s.bucket, Key=s._key(self.key), UploadId=self.upload_id,
                )
            except SnapsyncError:
                pass  # clean_incomplete removes it on the next run

    def _close_pool(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


class _RangeReader:
    """Reads an object front to back; a dropped connection resumes at the byte it stopped at."""

    def __init__(self, store: S3Store, key: str) -> None:
        self.store = store
        self.key = key
        self.offset = 0
        self.body: Any = None

    def _open(self) -> Any:
        s = self.store
        extra = {"Range": f"bytes={self.offset}-"} if self.offset else {}
        return s.client.get_object(Bucket=s.bucket, Key=s._key(self.key), **extra)["Body"]

    def read(self, n: int) -> bytes:
        def once() -> bytes:
            if self.body is None:
                self.body = self._open()
            try:
                return bytes(self.body.read(n))
            except Exception:
                self.close()
                raise

        data = self.store.call(f"read {self.key} at byte {self.offset}", once)
        self.offset += len(data)
        return data

    def close(self) -> None:
        if self.body is not None:
            try:
                self.body.close()
            finally:
                self.body = None


def iter_object(reader: ObjectReader, size: int = 1 << 20) -> Iterator[bytes]:
    while piece := reader.read(size):
        yield piece
