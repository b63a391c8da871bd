"""Why the model runs in a process of its own (worker/device.py): ``python -m bench.gil``.

The tiny model's loop (ModelRunner.generate at micro-batch 16, one torch thread) alone, then beside
one busy Python thread of the same process (at the default switch interval, and at 0.1 ms), then
beside a busy Python process, then as a device process beside a busy Python thread of the caller.
Every torch call gives the GIL up while its kernel runs and must take it back; beside a thread that
holds the GIL that wait is up to the switch interval per call. Prints ``RESULT`` lines.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

PROMPT = "a ceramic mug, product photo, colour {n}"


def busy_python(stop: threading.Event | None = None) -> None:
    """Pure Python work that holds the GIL, as QC glue, boto3 and the ledger's ORM do."""
    total = 0
    while stop is None or not stop.is_set():
        for n in range(10_000):
            total += n * n


@contextmanager
def busy_thread() -> Iterator[None]:
    stop = threading.Event()
    thread = threading.Thread(target=busy_python, args=(stop,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextmanager
def busy_process() -> Iterator[None]:
    process = multiprocessing.get_context("spawn").Process(target=busy_python, daemon=True)
    process.start()
    time.sleep(1.0)  # started
    try:
        yield
    finally:
        process.kill()
        process.join()


@contextmanager
def switch_interval(seconds: float) -> Iterator[None]:
    before = sys.getswitchinterval()
    sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def images_per_s(generate: Callable[..., Any], images: int, micro_batch: int) -> float:
    from core.params import GenerationParams

    params = GenerationParams()
    prompts = [PROMPT.format(n=n) for n in range(images)]
    began = time.perf_counter()
    for first in range(0, images, micro_batch):
        batch = prompts[first:first + micro_batch]
        generate(batch, list(range(first, first + len(batch))), params)
    return images / (time.perf_counter() - began)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gil", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--micro-batch", type=int, default=16)
    args = parser.parse_args(argv)
    os.environ.setdefault("INSTABATCH_TORCH_THREADS", "1")
    from core.params import GenerationParams
    from core.settings import get_settings
    from worker.device import DeviceProcess
    from worker.model_runner import ModelRunner

    settings = get_settings()
    runner, device = ModelRunner(settings), DeviceProcess(settings)
    for engine in (runner, device):  # loaded and warm before any clock starts
        engine.generate(["warm-up"] * args.micro_batch, list(range(args.micro_batch)), GenerationParams())
    rate = lambda engine: f"{images_per_s(engine.generate, args.images, args.micro_batch):.1f}"  # noqa: E731
    results = {"alone": rate(runner)}
    with busy_thread():
        results["beside_thread"] = rate(runner)
    with busy_thread(), switch_interval(0.0001):
        results["beside_thread_switch_0_1ms"] = rate(runner)
    with busy_process():
        results["beside_process"] = rate(runner)
    with busy_thread():
        results["device_process_beside_thread"] = rate(device)
    device.close()
    print("RESULT " + " ".join(f"gil_{name}_images_per_s={value}" for name, value in results.items()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
