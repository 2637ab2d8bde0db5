"""Where generated media lives: a local folder by default, or an S3-compatible bucket; one small interface."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol


class Storage(Protocol):
    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Store ``data`` under ``key``, replacing what was there (so re-running a job is harmless)."""
        ...

    def size(self, key: str) -> int | None:
        """The stored size in bytes, or None when nothing is stored under ``key``."""
        ...

    def stream(self, key: str, chunk_size: int = 64 * 1024) -> Iterator[bytes]: ...

    def delete(self, key: str) -> None: ...


class LocalStorage:
    """Files under one folder (``instance/media`` by default); writes are atomic renames."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root.resolve() not in path.parents:
            raise ValueError("storage key escapes the storage root")
        return path

    def put(self, key: str, data: bytes, content_type: str) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".part-")
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)

    def size(self, key: str) -> int | None:
        path = self._path(key)
        return path.stat().st_size if path.exists() else None

    def stream(self, key: str, chunk_size: int = 64 * 1024) -> Iterator[bytes]:
        with self._path(key).open("rb") as handle:
            while chunk := handle.read(chunk_size):
                yield chunk

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


class S3Storage:
    """An S3-compatible bucket through boto3 (``MEDIA_STORAGE=s3``, ``S3_BUCKET``, ``S3_ENDPOINT_URL``)."""

    def __init__(self, bucket: str, endpoint_url: str | None = None, prefix: str = "media/") -> None:
        import boto3

        self.bucket = bucket
        self.prefix = prefix
        self.client = boto3.client("s3", endpoint_url=endpoint_url or None)

    def put(self, key: str, data: bytes, content_type: str) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data, ContentType=content_type)

    def size(self, key: str) -> int | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self.prefix + key)["ContentLength"]
        except self.client.exceptions.ClientError:
            return None

    def stream(self, key: str, chunk_size: int = 64 * 1024) -> Iterator[bytes]:
        body = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)["Body"]
        yield from body.iter_chunks(chunk_size)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.prefix + key)


def make_storage(config: dict) -> Storage:
    if config["MEDIA_STORAGE"] == "s3":
        return S3Storage(config["S3_BUCKET"], config.get("S3_ENDPOINT_URL"))
    return LocalStorage(Path(config["INSTANCE_PATH"]) / "media")
