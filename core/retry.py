"""Riding out a database or object store that blinks: retries with backoff for transient errors.

A worker that loses PostgreSQL or S3 for a few seconds must not fail the items it holds: it
waits and tries the same unit of work again (each is a transaction, and object keys are
write-once, so a retry never writes anything twice). tenacity does the backoff.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from botocore.exceptions import ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from tenacity import Retrying, before_sleep_log, retry_if_exception, stop_after_delay, wait_exponential

log = logging.getLogger(__name__)
T = TypeVar("T")
SERVER_ERROR_CODES = {"500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout"}


def is_transient(error: BaseException) -> bool:
    """A dependency that did not answer (or answered 'try later'), rather than a bug or bad data."""
    if isinstance(error, (OperationalError, InterfaceError, PoolTimeout, BotoConnectionError, HTTPClientError,
                          ConnectionError, TimeoutError)):
        return True
    if isinstance(error, DBAPIError) and error.connection_invalidated:
        return True
    if isinstance(error, ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        status = str(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        return code in SERVER_ERROR_CODES or status.startswith("5")
    return False


def with_retry(work: Callable[[], T], *, budget_seconds: float, what: str) -> T:
    """``work()``, tried again on transient errors with exponential backoff (0.5 s doubling to 8 s)
    for up to ``budget_seconds``; then the last error is raised."""
    retrying = Retrying(
        retry=retry_if_exception(is_transient), stop=stop_after_delay(budget_seconds),
        wait=wait_exponential(multiplier=0.5, max=8), reraise=True,
        before_sleep=before_sleep_log(log, logging.WARNING),
    )
    for attempt in retrying:
        with attempt:
            if attempt.retry_state.attempt_number > 1:
                log.info("retrying %s (attempt %d)", what, attempt.retry_state.attempt_number)
            return work()
    raise AssertionError("unreachable")  # pragma: no cover - tenacity reraises
