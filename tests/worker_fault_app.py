"""``celery -A tests.worker_fault_app worker``: the real worker app, except that its engine kills
its own process (``os._exit``) on a prompt carrying CRASH_MARKER and dawdles on one carrying
SLOW_MARKER. For the crash and time-limit tests only."""
from __future__ import annotations

import os
import time

from worker.app import create_app
from worker.chunk import ChunkRunner
from worker.model_runner import ModelRunner

CRASH_MARKER = "CRASH-THE-WORKER"
SLOW_MARKER = "TAKE-YOUR-TIME"
SLOW_SECONDS = 20
_generate = ModelRunner.generate
_run = ChunkRunner.run


def _generate_or_die(self, prompts, seeds, params, **options):
    if any(CRASH_MARKER in prompt for prompt in prompts):
        os._exit(13)  # what a segfault or the OOM killer does: no exception, no cleanup
    if any(SLOW_MARKER in prompt for prompt in prompts):
        time.sleep(SLOW_SECONDS)  # longer than the tests' soft time limit
    return _generate(self, prompts, seeds, params, **options)


def _die_once_before_claiming(self, item_ids, outbox_id=None):
    """With DIE_BEFORE_CLAIM=FILE: the first task kills its process before claiming anything (an
    OOM while loading the model, say), leaving its message taken and its items queued."""
    marker = os.environ.get("DIE_BEFORE_CLAIM")
    if marker and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(14)
    return _run(self, item_ids, outbox_id)


ModelRunner.generate = _generate_or_die
ChunkRunner.run = _die_once_before_claiming
app = create_app()
