"""``celery -A tests.worker_fault_app worker``: the real worker app, except that its engine kills
its own process (``os._exit``) on a prompt carrying CRASH_MARKER. For the crash tests only."""
from __future__ import annotations

import os

from worker.app import create_app
from worker.engine import Engine

CRASH_MARKER = "CRASH-THE-WORKER"
_generate = Engine.generate


def _generate_or_die(self, prompts, seeds, params):
    if any(CRASH_MARKER in prompt for prompt in prompts):
        os._exit(13)  # what a segfault or the OOM killer does: no exception, no cleanup
    return _generate(self, prompts, seeds, params)


Engine.generate = _generate_or_die
app = create_app()
