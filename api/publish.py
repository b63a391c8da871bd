"""Publishing committed outbox chunks from the API, after the response is sent."""
from __future__ import annotations

import logging

from api.metrics import OUTBOX_PUBLISH_FAILURES
from core.broker import get_celery
from core.db import get_engine, session_factory
from core.dispatch import dispatch_pending

log = logging.getLogger(__name__)


def publish_outbox() -> int:
    """Relay pending chunks to the broker. A broker outage is logged, never raised: the chunks are
    committed and stay pending until the worker's sweeper (or the next submission) publishes them."""
    try:
        return dispatch_pending(session_factory(get_engine()), get_celery())
    except Exception as exc:  # noqa: BLE001 - any broker failure leaves the rows for the sweeper
        OUTBOX_PUBLISH_FAILURES.inc()
        log.warning("outbox publish failed, chunks stay pending for the sweeper: %s", exc)
        return 0
