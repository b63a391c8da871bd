"""Object storage behind one interface: S3 (boto3) in production, a local folder when embedded.

Keys are write-once. A worker that is delivered the same chunk twice computes the same key; the
second write finds the object already there and adopts it (see ``PutResult.created``), so a crash
between upload and ledger commit never leaves two different images for one item.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Protocol
from urllib.parse import quote, unquote

from core.settings import Settings, get_settings


@dataclass(frozen=True)
class PutResult:
    key: str
    sha256: str
    created: bool  # False: the key already held an object, which was kept


class ObjectStoreError(RuntimeError):
    pass


class ObjectStore(Protocol):
    def put(self, key: str, data: bytes, metadata: dict[str, str], content_type: str = "image/png") -> PutResult: ...
    def get(self, key: str) -> bytes: ...
    def head(self, key: str) -> dict[str, str] | None: ...
    def presigned_url(self, key: str, expires_in: int = 3600) -> str | None: ...
    def list_keys(self, prefix: str = "") -> list[str]: ...
    def check(self) -> None: ...


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class LocalObjectStore:
    """Files under a folder, with metadata in a ``.meta.json`` sidecar."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ObjectStoreError(f"object key escapes the store: {key!r}")
        return path

    def put(self, key: str, data: bytes, metadata: dict[str, str], content_type: str = "image/png") -> PutResult:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(path, "xb") as handle:  # "x": write-once, like S3's If-None-Match: *
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        except FileExistsError:
            return PutResult(key, sha256_hex(path.read_bytes()), created=False)
        sidecar = {"content_type": content_type, **metadata}
        path.with_name(path.name + ".meta.json").write_text(json.dumps(sidecar, sort_keys=True))
        return PutResult(key, sha256_hex(data), created=True)

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as exc:
            raise KeyError(key) from exc

    def head(self, key: str) -> dict[str, str] | None:
        sidecar = self._path(key).with_name(Path(key).name + ".meta.json")
        if not self._path(key).exists():
            return None
        return json.loads(sidecar.read_text()) if sidecar.exists() else {}

    def presigned_url(self, key: str, expires_in: int = 3600) -> str | None:
        return None  # the API serves local objects itself

    def list_keys(self, prefix: str = "") -> list[str]:
        """Object keys under ``prefix`` (sidecars left out), sorted."""
        root = self.root.resolve()
        if not root.is_dir():
            return []
        keys = (path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file())
        return sorted(key for key in keys if key.startswith(prefix) and not key.endswith(".meta.json"))

    def path_of(self, key: str) -> Path:
        return self._path(key)

    def check(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not os.access(self.root, os.W_OK):
            raise ObjectStoreError(f"object folder is not writable: {self.root}")


class S3ObjectStore:
    """S3 or an S3-compatible store (MinIO, moto) through boto3."""

    def __init__(self, bucket: str, endpoint_url: str | None = None, region: str = "us-east-1", prefix: str = "",
                 public_endpoint_url: str | None = None):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        # boto3 >= 1.36 sends CRC checksums by default; some S3-compatible stores reject them.
        config = Config(
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"max_attempts": 5, "mode": "standard"},
            signature_version="s3v4",
        )
        self.client = boto3.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)
        # Presigning is local arithmetic; a second client signs URLs for the public address.
        self.presigner = (boto3.client("s3", endpoint_url=public_endpoint_url, region_name=region, config=config)
                          if public_endpoint_url else self.client)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes, metadata: dict[str, str], content_type: str = "image/png") -> PutResult:
        from botocore.exceptions import ClientError

        try:
            self.client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=data, ContentType=content_type,
                Metadata=encode_metadata(metadata), IfNoneMatch="*",
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                raise
            return PutResult(key, sha256_hex(self.get(key)), created=False)
        return PutResult(key, sha256_hex(data), created=True)

    def get(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise KeyError(key) from exc
            raise

    def head(self, key: str) -> dict[str, str] | None:
        from botocore.exceptions import ClientError

        try:
            response = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return None
            raise
        return {"content_type": response.get("ContentType", ""), **decode_metadata(response.get("Metadata", {}))}

    def presigned_url(self, key: str, expires_in: int = 3600) -> str | None:
        return self.presigner.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=expires_in
        )

    def list_keys(self, prefix: str = "") -> list[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        keys: list[str] = []
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
            keys.extend(obj["Key"] for obj in page.get("Contents", []))
        strip = len(self.prefix) + 1 if self.prefix else 0  # the same keys that put() and get() take
        return sorted(key[strip:] for key in keys)

    def check(self) -> None:
        self.client.head_bucket(Bucket=self.bucket)


def encode_metadata(metadata: dict[str, str]) -> dict[str, str]:
    # S3 user metadata travels in HTTP headers: ASCII only, so prompts are percent-encoded.
    return {name: quote(str(value), safe=" ,.:/-_=+@") for name, value in metadata.items()}


def decode_metadata(metadata: dict[str, str]) -> dict[str, str]:
    return {name: unquote(value) for name, value in metadata.items()}


def make_store(settings: Settings) -> ObjectStore:
    if settings.s3_bucket:
        return S3ObjectStore(settings.s3_bucket, settings.s3_endpoint_url, settings.s3_region, settings.s3_prefix,
                             public_endpoint_url=settings.s3_public_endpoint_url)
    return LocalObjectStore(settings.objects_dir)


@lru_cache(maxsize=4)
def _store_for(settings_key: str) -> ObjectStore:
    return make_store(get_settings())


def get_store() -> ObjectStore:
    settings = get_settings()
    return _store_for(f"{settings.s3_bucket}|{settings.s3_endpoint_url}|{settings.objects_dir}")
