"""``celery -A worker.celery_app worker|beat``: the app configured from the environment.

Logs are structlog's JSON lines (core/logs.py): answering ``setup_logging`` keeps Celery from
installing its own handlers, so its records go through the same formatter.
"""
from typing import Any

from celery import signals

from core.logs import configure_logging
from core.settings import get_settings
from worker.app import create_app


@signals.setup_logging.connect(weak=False)
def structured_logs(loglevel: Any = None, **_: Any) -> None:
    settings = get_settings()
    configure_logging(loglevel if isinstance(loglevel, str) else settings.log_level, settings.log_format)


app = create_app()
celery = app
