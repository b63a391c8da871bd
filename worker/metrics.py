"""A worker process's Prometheus metrics (docs/architecture.md, "Worker metrics").

Each process that runs tasks serves its own registry over HTTP on ``WORKER_METRICS_PORT``
(default 9100; 0 turns it off): the solo worker on that port, a prefork child on port + its
child index (1, 2, ...), so every process that generates is scraped on its own and no
multiprocess directory is needed. A port already taken is logged and skipped: metrics never
stop a worker. The parent of a prefork pool runs no tasks and serves nothing.
"""
from __future__ import annotations

import logging
import threading

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

STAGES = ("claim", "generate", "refine", "encode", "qc", "upload", "ledger")
# Seconds per micro-batch stage: 1 ms (a GPU pass) to a minute (a slow CPU pass or an outage).
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

STAGE_SECONDS = Histogram("instabatch_stage_seconds", "Seconds one stage took for one micro-batch",
                          ["stage"], buckets=STAGE_BUCKETS)
IMAGES = Counter("instabatch_images_total", "Images recorded, by model and QC verdict", ["model", "verdict"])
# reason: engine, encode, blocked (screening), dead (out of attempts); oom_split counts split passes.
ITEM_FAILURES = Counter("instabatch_item_failures_total", "Items failed, by reason", ["reason"])
MODEL_LOAD_SECONDS = Gauge("instabatch_model_load_seconds", "Seconds the last model load took")
# A registry model loaded again and again: INSTABATCH_MAX_LOADED_MODELS is smaller than the mix of batches needs.
MODEL_LOADS = Counter("instabatch_model_loads_total", "Models loaded, by registry name", ["model"])

_gpu_memory: Gauge | None = None  # registered on the first CUDA sample: absent on CPU workers
_served: set[int] = set()
_lock = threading.Lock()


def observe_stage(stage: str, seconds: float) -> None:
    STAGE_SECONDS.labels(stage=stage).observe(seconds)


def image_recorded(model: str, verdict: str) -> None:
    IMAGES.labels(model=model, verdict=verdict).inc()


def item_failure(reason: str) -> None:
    ITEM_FAILURES.labels(reason=reason).inc()


def model_loaded(seconds: float, model: str) -> None:
    MODEL_LOAD_SECONDS.set(seconds)
    MODEL_LOADS.labels(model=model).inc()


def sample_gpu_memory() -> None:
    """Only where torch is loaded and CUDA is up: the series is absent on CPU workers."""
    allocated = gpu_memory_allocated()
    if allocated is not None:
        set_gpu_memory(allocated)


def gpu_memory_allocated() -> int | None:
    """CUDA memory this process has allocated; None without torch loaded and CUDA up."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda.memory_allocated()


def set_gpu_memory(allocated: int) -> None:
    """The gauge, from this process or from its device process (worker/device.py), where the model runs."""
    global _gpu_memory
    with _lock:
        if _gpu_memory is None:
            _gpu_memory = Gauge("instabatch_gpu_memory_bytes", "CUDA memory allocated by the process running the model")
    _gpu_memory.set(allocated)


def serve(port: int, offset: int = 0) -> int | None:
    """Serve this process's metrics on ``port + offset``; the port, or None when off or taken."""
    if not port:
        return None
    chosen = port + offset
    with _lock:
        if chosen in _served:
            return chosen
        try:
            start_http_server(chosen)
        except OSError as error:
            log.warning("worker metrics not served: port %d: %s", chosen, error)
            return None
        _served.add(chosen)
    log.info("worker metrics on :%d/metrics", chosen)
    return chosen
