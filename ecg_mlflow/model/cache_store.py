"""Where the feature cache keeps its bytes: a local (or shared) folder, or an S3 prefix.

Both stores hold whole named objects (`resnet50/<digest>/ab/ab12....f32`, `.../key.json`)
and publish each one atomically, so a reader sees a complete object or none:
- a folder writes a temporary file beside the target, syncs it and renames it into place;
  a process killed mid-write (SIGKILL, power loss) can leave a `.*.tmp` file behind, which
  nothing ever reads and opening the store removes once it is an hour old;
- S3 makes a PUT visible only once the whole object is stored, so no temporary key is needed.
Writers of the same name write the same bytes (names are content addresses), so concurrent
writers on many machines are safe with either store. Neither store trusts what it reads: the
cache checks length and checksum of every object and recomputes a damaged one.

`cache_dir=s3://bucket/prefix` selects S3. The endpoint comes from MLFLOW_S3_ENDPOINT_URL
(as MLflow's artifact store reads it), else AWS_ENDPOINT_URL, else AWS itself; credentials
and region come from boto3's usual chain (AWS_ACCESS_KEY_ID, ~/.aws, an instance role).
"""

from __future__ import annotations

import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol, Sequence

S3_SCHEME = "s3://"
ENDPOINT_ENVS: tuple[str, ...] = ("MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL")
STALE_TMP_SECONDS = 3600
S3_READ_THREADS = 16
"""Objects fetched at once when many are read: S3 latency, not bandwidth, bounds a read."""
S3_ATTEMPTS = 5
"""Tries per request (boto3's standard retry mode, with backoff) before a store error."""


class CacheStoreError(RuntimeError):
    """A cache location that cannot be used; the message names it and the way out."""


class CacheStore(Protocol):
    """Named whole objects, each published atomically; `read` returns None when absent."""

    location: str

    def read(self, name: str) -> bytes | None: ...

    def read_many(self, names: Sequence[str]) -> list[bytes | None]: ...

    def write(self, name: str, data: bytes) -> None: ...

    def exists(self, name: str) -> bool: ...


def is_s3_url(location: str | Path) -> bool:
    return str(location).startswith(S3_SCHEME)


def split_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix/` -> ("bucket", "some/prefix"); the bucket must be named."""
    bucket, _, prefix = url[len(S3_SCHEME) :].partition("/")
    if not bucket:
        raise CacheStoreError(f"cache_dir {url!r} names no bucket; write it as s3://bucket/prefix")
    return bucket, prefix.strip("/")


def open_store(location: str | Path, subfolder: str) -> CacheStore:
    """The store for `location/subfolder`: S3 for an s3:// URL, else a folder."""
    if is_s3_url(location):
        bucket, prefix = split_s3_url(str(location))
        return S3Store(bucket, "/".join(p for p in (prefix, subfolder) if p))
    return FolderStore(Path(location) / subfolder)


class FolderStore:
    """Objects as files under one folder; writes are temporary file + fsync + rename."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.location = str(folder)
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp(folder)

    def path(self, name: str) -> Path:
        return self.folder / name

    def read(self, name: str) -> bytes | None:
        try:
            return self.path(name).read_bytes()
        except FileNotFoundError:
            return None

    def read_many(self, names: Sequence[str]) -> list[bytes | None]:
        return [self.read(name) for name in names]

    def write(self, name: str, data: bytes) -> None:
        path = self.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data)

    def exists(self, name: str) -> bool:
        return self.path(name).exists()


class S3Store:
    """Objects under one S3 prefix; a PUT of a whole object is atomic."""

    def __init__(self, bucket: str, prefix: str):
        self.bucket, self.prefix = bucket, prefix
        self.location = f"{S3_SCHEME}{bucket}/{prefix}"
        self.client = make_s3_client()
        self._check_bucket()

    def _check_bucket(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "?")
            raise CacheStoreError(
                f"cache_dir {self.location}: bucket {self.bucket!r} answers {code} at "
                f"{endpoint_url() or 'AWS'}; create it or check the credentials and {ENDPOINT_ENVS[0]}"
            ) from None
        except BotoCoreError as exc:
            raise CacheStoreError(
                f"cache_dir {self.location}: cannot reach S3 at {endpoint_url() or 'AWS'} ({exc}); "
                f"check {ENDPOINT_ENVS[0]} and the AWS credentials"
            ) from None

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def read(self, name: str) -> bytes | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            reply = self.client.get_object(Bucket=self.bucket, Key=self.key(name))
            return reply["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None
        except (BotoCoreError, ClientError) as exc:
            raise self.failure("reading", name, exc) from None

    def read_many(self, names: Sequence[str]) -> list[bytes | None]:
        if len(names) < 2:
            return [self.read(name) for name in names]
        with ThreadPoolExecutor(max_workers=S3_READ_THREADS) as pool:
            return list(pool.map(self.read, names))

    def write(self, name: str, data: bytes) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key(name), Body=data)
        except (BotoCoreError, ClientError) as exc:
            raise self.failure("writing", name, exc) from None

    def failure(self, doing: str, name: str, exc: Exception) -> CacheStoreError:
        """One line for an S3 error that outlasted boto3's retries; what was written stays valid."""
        return CacheStoreError(f"cache_dir {self.location}: {doing} {name} failed after retries ({exc}); rerun to resume")

    def exists(self, name: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self.key(name))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self.failure("checking", name, exc) from None
        return True


def endpoint_url() -> str | None:
    """The S3 endpoint MLflow would use: MLFLOW_S3_ENDPOINT_URL, else AWS_ENDPOINT_URL."""
    for name in ENDPOINT_ENVS:
        if os.environ.get(name):
            return os.environ[name]
    return None


def make_s3_client():
    """A boto3 S3 client for the configured endpoint; clients are thread-safe, so one serves
    the parallel reads."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url(),
        config=Config(max_pool_connections=S3_READ_THREADS, retries={"max_attempts": S3_ATTEMPTS, "mode": "standard"}),
    )


def remove_stale_tmp(folder: Path, max_age_s: float = STALE_TMP_SECONDS) -> int:
    """Delete the temporary files of writes killed more than `max_age_s` ago; return how many.

    A younger one may belong to a write in progress in another process, so it stays."""
    cutoff = time.time() - max_age_s
    removed = 0
    for tmp in [*folder.glob(".*.tmp"), *folder.glob("*/.*.tmp")]:
        try:
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink()
                removed += 1
        except FileNotFoundError:  # another process cleaned it first
            pass
    return removed


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, sync, rename: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
