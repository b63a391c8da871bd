"""The client: submit, read, cancel and retry batches; follow progress; download results and images.

Network trouble is expected, not fatal: requests that are safe to repeat are retried with backoff
(a submission is safe too, because it carries an ``Idempotency-Key``), the progress stream
reconnects, and a download keeps every file it already verified
(docs/architecture.md, "Results out, progress pushed, the remote client").
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import connect_sse
from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential

from api.schemas import BatchOut, BatchPage, CancelResult, RetryResult
from api.schemas.results import RESULT_COLUMNS, ProgressEvent, ResultRow

CONTENT_TYPES = {".csv": "text/csv", ".jsonl": "application/x-ndjson", ".ndjson": "application/x-ndjson",
                 ".json": "application/json"}
RETRY_STATUSES = {502, 503, 504}
MANIFEST = "manifest.csv"
RESULTS = "results.jsonl"
CHUNK = 1 << 16
STREAM_SILENCE_SECONDS = 60.0
RECONNECT_SECONDS = 1.0


class ApiError(RuntimeError):
    """The API answered with an error: ``status``, ``code`` and ``details`` from its error body."""

    def __init__(self, status: int, code: str, message: str, details: Any = None):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.details = status, code, message, details


class DownloadInterrupted(RuntimeError):
    """Raised by an ``on_file`` callback to stop a download midway (what is on disk stays)."""


@dataclass
class DownloadSummary:
    folder: Path
    rows: int
    images: int
    fetched: int  # downloaded this time
    kept: int  # already on disk with the right sha256
    manifest: Path


def idempotency_key_for(body: bytes, options: Mapping[str, Any]) -> str:
    """The same file with the same options is the same batch: a resubmit after a failure replays it."""
    digest = hashlib.sha256(body + b"\0" + json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()
    return f"instabatch-submit-{digest[:48]}"


def _retryable(error: BaseException) -> bool:
    if isinstance(error, ApiError):
        return error.status in RETRY_STATUSES
    return isinstance(error, httpx.TransportError)


class InstaBatchClient:
    def __init__(self, base_url: str, key: str | None = None, *, timeout: float = 30.0,
                 retry_seconds: float = 120.0, transport: httpx.BaseTransport | None = None):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout, transport=transport)
        # Image URLs are presigned (S3) or signed by the API: they must not carry the API key.
        self.files = httpx.Client(timeout=timeout, transport=transport, follow_redirects=True)
        self.retry_seconds = retry_seconds

    def close(self) -> None:
        self.http.close()
        self.files.close()

    def __enter__(self) -> "InstaBatchClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests ------------------------------------------------------------------------

    def _retrying(self) -> Retrying:
        return Retrying(retry=retry_if_exception(_retryable), stop=stop_after_delay(self.retry_seconds),
                        wait=wait_exponential(multiplier=0.5, max=10), reraise=True)

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One call, retried on network errors and 502/503/504; an error status raises :class:`ApiError`."""
        for attempt in self._retrying():
            with attempt:
                return _checked(self.http.request(method, path, **kwargs))
        raise AssertionError("unreachable")

    # -- batches -------------------------------------------------------------------------

    def submit_file(self, path: str | Path, *, fields: Mapping[str, Any] | None = None,
                    idempotency_key: str | None = None) -> tuple[BatchOut, bool]:
        """Submit a CSV, JSON Lines or JSON file; ``fields`` are the query parameters of a CSV or
        JSON Lines upload (name, priority, width, ...). Returns the batch and whether it is new."""
        path = Path(path)
        body = path.read_bytes()
        content_type = CONTENT_TYPES.get(path.suffix.lower(), "text/csv")
        fields = {name: value for name, value in (fields or {}).items() if value is not None}
        if fields and content_type == "application/json":
            raise ValueError(f"{path.name} is a JSON batch: put {', '.join(sorted(fields))} in the file itself")
        key = idempotency_key or idempotency_key_for(body, {"fields": fields, "type": content_type})
        headers = {"Content-Type": content_type, "Idempotency-Key": key,
                   "Content-Disposition": f'attachment; filename="{_header_safe(path.name)}"'}
        response = self.request("POST", "/v1/batches", content=body, headers=headers,
                                params=fields if content_type != "application/json" else None)
        return BatchOut.model_validate(response.json()), response.status_code == 202

    def submit(self, batch: Mapping[str, Any], *, idempotency_key: str | None = None) -> BatchOut:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return BatchOut.model_validate(self.request("POST", "/v1/batches", json=dict(batch), headers=headers).json())

    def batch(self, batch_id: str) -> BatchOut:
        return BatchOut.model_validate(self.request("GET", f"/v1/batches/{batch_id}").json())

    def batches(self, *, limit: int = 50, cursor: str | None = None, team: str | None = None) -> BatchPage:
        params = {name: value for name, value in (("limit", limit), ("cursor", cursor), ("team", team)) if value}
        return BatchPage.model_validate(self.request("GET", "/v1/batches", params=params).json())

    def cancel(self, batch_id: str) -> CancelResult:
        return CancelResult.model_validate(self.request("POST", f"/v1/batches/{batch_id}/cancel").json())

    def retry(self, batch_id: str) -> RetryResult:
        return RetryResult.model_validate(self.request("POST", f"/v1/batches/{batch_id}/retry").json())

    # -- progress ------------------------------------------------------------------------

    def events(self, batch_id: str, *, interval: float = 1.0) -> Iterator[ProgressEvent]:
        """The batch's progress events until it completes (one connection; see :meth:`wait`)."""
        params = {"interval": interval}
        # The API sends a ping every 15 s: a minute of silence is a dead connection.
        with connect_sse(self.http, "GET", f"/v1/batches/{batch_id}/events", params=params,
                         timeout=httpx.Timeout(self.http.timeout.connect, read=STREAM_SILENCE_SECONDS)) as source:
            _checked(source.response)
            for event in source.iter_sse():
                if event.event in ("progress", "completed"):
                    yield ProgressEvent.model_validate_json(event.data)
                if event.event == "completed":
                    return

    def wait(self, batch_id: str, *, on_progress: Callable[[ProgressEvent], None] | None = None,
             interval: float = 1.0) -> ProgressEvent:
        """Follow the events until the batch completes, reconnecting after a dropped connection
        (for ``retry_seconds`` without a single event before giving up)."""
        last: ProgressEvent | None = None
        failing_since: float | None = None
        while last is None or not last.finished:
            try:
                for event in self.events(batch_id, interval=interval):
                    last, failing_since = event, None
                    if on_progress:
                        on_progress(event)
            except (httpx.TransportError, ApiError) as error:
                if not _retryable(error):
                    raise
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since > self.retry_seconds:
                    raise
                time.sleep(RECONNECT_SECONDS)
        return last

    # -- results -------------------------------------------------------------------------

    def results(self, batch_id: str, **filters: Any) -> list[ResultRow]:
        """Every row of the results (JSON Lines), read whole and retried as one request."""
        response = self.request("GET", f"/v1/batches/{batch_id}/results", params=_filters(filters))
        return [ResultRow.model_validate_json(line) for line in response.text.splitlines() if line.strip()]

    def download(self, batch_id: str, folder: str | Path, *, on_file: Callable[[ResultRow, bool], None] | None = None,
                 **filters: Any) -> DownloadSummary:
        """Images into ``folder/images/`` (named by external id), plus ``manifest.csv`` and
        ``results.jsonl``. Files already there with the right sha256 are kept, not fetched again;
        every fetched file is checked against the ledger's sha256 before it takes its name."""
        folder = Path(folder)
        rows = self.results(batch_id, **filters)
        fetched = kept = 0
        for row in rows:
            if not (row.file_name and row.sha256):
                continue
            target = folder / row.file_name
            if target.is_file() and _file_sha256(target) == row.sha256:
                kept += 1
                new = False
            else:
                self._fetch(row, target)
                fetched += 1
                new = True
            if on_file:
                on_file(row, new)
        manifest = write_manifest(folder, rows)
        return DownloadSummary(folder=folder, rows=len(rows), images=fetched + kept, fetched=fetched, kept=kept,
                               manifest=manifest)

    def _fetch(self, row: ResultRow, target: Path) -> None:
        if not row.url:
            raise ApiError(0, "no_url", f"{row.object_key}: the API gave no download URL")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".part")
        for attempt in self._retrying():
            with attempt:
                digest = hashlib.sha256()
                with self.files.stream("GET", row.url) as response, partial.open("wb") as handle:
                    _checked(response)
                    for chunk in response.iter_bytes(CHUNK):
                        digest.update(chunk)
                        handle.write(chunk)
                if digest.hexdigest() != row.sha256:
                    partial.unlink(missing_ok=True)
                    raise ApiError(0, "sha256_mismatch", f"{row.file_name}: downloaded sha256 {digest.hexdigest()}, "
                                                         f"the ledger says {row.sha256}")
        os.replace(partial, target)


def write_manifest(folder: Path, rows: list[ResultRow]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / MANIFEST
    with open(manifest, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(RESULT_COLUMNS)
        writer.writerows(row.csv_cells() for row in rows)
    with open(folder / RESULTS, "w", encoding="utf-8") as handle:
        handle.writelines(row.model_dump_json() + "\n" for row in rows)
    return manifest


def _filters(filters: Mapping[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in filters.items() if value not in (None, [], ())}


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _header_safe(name: str) -> str:
    return "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in name)


def _checked(response: httpx.Response) -> httpx.Response:
    if response.is_success:
        return response
    response.read()
    try:
        error = response.json()["error"]
        raise ApiError(response.status_code, error.get("code", "error"), error.get("message", ""), error.get("details"))
    except (ValueError, KeyError, TypeError):
        raise ApiError(response.status_code, "http_error", response.text[:300]) from None
