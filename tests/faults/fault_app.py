"""``celery -A tests.faults.fault_app worker``: the fault app of the crash tests plus a poison
that only bites a reviewer's regenerate.

Everything of ``tests.worker_fault_app`` applies (its engine ``os._exit``s on a prompt with
CRASH_MARKER). On top of it, a prompt carrying REGEN_MARKER generates fine in its batch but kills
the process when ``instabatch.regenerate_image`` renders it, so a regenerate request for that
item kills every worker that takes it (scenario 9).
"""
from __future__ import annotations

import contextvars
import os

import worker.regenerate as regenerate_module
from tests.worker_fault_app import CRASH_MARKER, app  # noqa: F401 - installs the crash patches
from worker.model_runner import ModelRunner

REGEN_MARKER = "KILL-ON-REGENERATE"
_regenerating = contextvars.ContextVar("regenerating", default=False)
_generate = ModelRunner.generate
_regenerate_image = regenerate_module.regenerate_image


def _generate_or_die_when_regenerating(self, prompts, seeds, params, **options):
    if _regenerating.get() and any(REGEN_MARKER in prompt for prompt in prompts):
        os._exit(15)  # a regenerate that segfaults: no exception, no cleanup
    return _generate(self, prompts, seeds, params, **options)


def _regenerate_image_marked(*args, **kwargs):
    token = _regenerating.set(True)
    try:
        return _regenerate_image(*args, **kwargs)
    finally:
        _regenerating.reset(token)


ModelRunner.generate = _generate_or_die_when_regenerating
# The task registered by create_app() looks regenerate_image up in its module at call time.
regenerate_module.regenerate_image = _regenerate_image_marked
