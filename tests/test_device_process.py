"""The model in a process of its own (worker/device.py, INSTABATCH_DEVICE_PROCESS=1): the same images as in
the worker's process, its loads in the worker's metrics, and a process that dies is replaced."""
from __future__ import annotations

import io
import os
import signal

import pytest
from PIL import Image as PILImage

from core.params import GenerationParams
from core.settings import Settings
from tests.workerkit import build_stack, running_worker
from worker import metrics
from worker.device import DeviceProcess, DeviceProcessDied

PROMPTS = ["a red mug", "a blue sneaker", "a green bottle", "a yellow lamp", "a black backpack"]


def loads_counted(model: str) -> float:
    return metrics.MODEL_LOADS.labels(model=model)._value.get()


def test_a_worker_with_a_device_process_makes_the_same_images_and_counts_its_loads(configure, random_checkpoint):
    pixels: dict[str, list[bytes]] = {}
    for device in ("0", "1"):
        stack = build_stack(configure, INSTABATCH_MODEL=str(random_checkpoint), INSTABATCH_DEVICE_PROCESS=device)
        loads_before = loads_counted("instaflow")
        batch_id = stack.submit(PROMPTS, params={"width": 64, "height": 64})
        with running_worker(stack):
            assert stack.wait_until_done(batch_id)["succeeded"] == len(PROMPTS)
        model = stack.app.instabatch.model
        assert isinstance(model, DeviceProcess) is (device == "1")
        if device == "1":
            assert model.pid not in (None, os.getpid()) and model.starts == 1
            model.close()
        assert loads_counted("instaflow") == loads_before + 1  # loaded in the child, counted here
        pixels[device] = [PILImage.open(io.BytesIO(stack.store.get(image.storage_key))).convert("RGB").tobytes()
                          for image in stack.images(batch_id)]
    assert len(pixels["1"]) == len(PROMPTS) and pixels["1"] == pixels["0"]


def test_a_device_process_that_dies_fails_its_call_and_the_next_call_starts_another(configure, random_checkpoint):
    configure(INSTABATCH_MODEL=str(random_checkpoint), INSTABATCH_TORCH_THREADS="1")
    device = DeviceProcess(Settings())
    try:
        params = GenerationParams(width=64, height=64)
        first = device.generate(["a red mug"], [1], params)
        identity = device.identity()
        assert identity["model"] == "instaflow" and first.identity == identity
        os.kill(device.pid, signal.SIGKILL)
        with pytest.raises(DeviceProcessDied):
            device.generate(["a red mug"], [1], params)
        again = device.generate(["a red mug"], [1], params)
        assert device.starts == 2 and again.images[0].tobytes() == first.images[0].tobytes()
        with pytest.raises(Exception, match="no-such-model"):  # the runner's own error, raised here
            device.load("no-such-model")
        assert device.starts == 2  # an error answered is not a dead process
    finally:
        device.close()
