"""Structured logs: one JSON object a line, with the request, batch, item and task ids in scope.

structlog renders every record, including those of ``logging.getLogger(__name__)`` (the whole
code base logs through the standard library) and of uvicorn and Celery, so a log shipper gets
one format. Ids are bound in context variables (:func:`bind_ids`): the API's middleware binds
``request_id``, routes the ``batch_id``/``item_id`` they act on, the worker the ``task_id``, its
batch and items (docs/architecture.md, "Structured logs").
"""
from __future__ import annotations

import logging
from typing import Any

import structlog

HANDLER_NAME = "instabatch"
SHARED_PROCESSORS: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_logger_name,
    structlog.stdlib.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    """Route the root logger through structlog (``json``, or ``console`` for people); idempotent."""
    structlog.configure(
        processors=[*SHARED_PROCESSORS, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    renderer = structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer()
    handler = logging.StreamHandler()
    handler.set_name(HANDLER_NAME)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*SHARED_PROCESSORS, structlog.stdlib.ExtraAdder()],  # log.info(..., extra={})
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, _drop_message_copy,
                    structlog.processors.format_exc_info, renderer],
    ))
    remove_logging()
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(level.upper())


def _drop_message_copy(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    """A formatted stdlib record also carries ``message``, a copy of ``event``: keep one."""
    if event.get("message") == event.get("event"):
        event.pop("message")
    return event


def remove_logging() -> None:
    """Take the handler :func:`configure_logging` added off the root logger (tests)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if h.get_name() == HANDLER_NAME]:
        root.removeHandler(handler)


def bind_ids(**ids: Any) -> None:
    """Add ids to every later log line of this request or task (None values are left out)."""
    structlog.contextvars.bind_contextvars(**{name: value for name, value in ids.items() if value is not None})


def clear_ids() -> None:
    structlog.contextvars.clear_contextvars()
