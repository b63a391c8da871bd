"""Issue 11 on real parts: output formats with provenance, the out-of-memory split, the overlapped
pipeline's records (one chain update per micro-batch, the chain still verifies) and the worker's
Prometheus /metrics."""
from __future__ import annotations

import io
import socket
import urllib.request

import pytest
import torch
from PIL import Image as PILImage
from pydantic import ValidationError
from sqlalchemy import select
from typer.testing import CliRunner

from core.audit.verify import verify_chain
from core.db import make_engine
from core.params import GenerationParams
from core.provenance import read_provenance
from models import Outbox
from tests.workerkit import build_stack, running_worker
from worker.chunk import ChunkRunner
from worker.model_runner import ModelRunner

PROMPTS = ["a red mug", "a blue sneaker", "a green bottle", "a yellow lamp", "a black backpack", "a grey kettle"]


def provenance_cli(*args: str):
    import typer

    from cli.provenance import provenance

    app = typer.Typer()
    app.command("provenance")(provenance)
    app.command("noop", hidden=True)(lambda: None)
    return CliRunner().invoke(app, ["provenance", *args])


@pytest.mark.parametrize("fmt, extension, pil_format", [("webp", "webp", "WEBP"), ("jpeg", "jpg", "JPEG")])
def test_webp_and_jpeg_batches_carry_provenance_that_the_cli_confirms(configure, random_checkpoint, tmp_path,
                                                                      fmt, extension, pil_format):
    stack = build_stack(configure, INSTABATCH_MODEL=str(random_checkpoint))
    batch_id = stack.submit(PROMPTS[:3], params={"width": 64, "height": 64,
                                                 "output": {"format": fmt, "quality": 80}})
    with running_worker(stack):
        assert stack.wait_until_done(batch_id)["succeeded"] == 3
    images = stack.images(batch_id)
    assert len(images) == 3
    for image in images:
        assert image.storage_key.endswith(f"/0.{extension}")
        data = stack.store.get(image.storage_key)
        with PILImage.open(io.BytesIO(data)) as pic:
            assert pic.format == pil_format and pic.size == (64, 64)
        fields = read_provenance(data)
        assert fields["item_id"] == image.item_id and fields["batch_id"] == batch_id
        assert '"output":{"format":"%s","quality":80}' % fmt in fields["params"]
        assert stack.store.head(image.storage_key)["content_type"] == f"image/{fmt}"
    path = tmp_path / f"downloaded.{extension}"
    path.write_bytes(stack.store.get(images[0].storage_key))
    result = provenance_cli(str(path))
    assert result.exit_code == 0, result.output
    assert f"RESULT ledger=checked match=true image_id={images[0].id}" in result.stdout
    assert verify_chain(make_engine(stack.settings.database_url)).ok


def test_an_unknown_format_or_quality_is_refused():
    with pytest.raises(ValidationError):
        GenerationParams.model_validate({"output": {"format": "gif"}})
    with pytest.raises(ValidationError):
        GenerationParams.model_validate({"output": {"format": "jpeg", "quality": 0}})
    assert "output" not in GenerationParams().canonical()  # PNG batches keep their provenance bytes


class OutOfMemoryAbove(ModelRunner):
    """The real engine, but a pass of more than ``limit`` images raises CUDA's out-of-memory error."""

    def __init__(self, settings, limit: int):
        super().__init__(settings)
        self.limit = limit
        self.passes: list[tuple[int, bool]] = []

    def generate(self, prompts, seeds, params, *, pad: bool = True):
        self.passes.append((len(prompts), pad))
        if len(prompts) > self.limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (test: {len(prompts)} > {self.limit})")
        return super().generate(prompts, seeds, params, pad=pad)


def test_a_micro_batch_out_of_device_memory_is_split_in_half_and_every_item_succeeds(configure, random_checkpoint):
    stack = build_stack(configure, INSTABATCH_MODEL=str(random_checkpoint), INSTABATCH_MICRO_BATCH="6",
                        INSTABATCH_CHUNK_IMAGES="6")
    ctx = stack.app.instabatch
    ctx.sessions  # bind the context to this process before swapping its engine
    engine = ctx._model = OutOfMemoryAbove(stack.settings, limit=2)
    batch_id = stack.submit(PROMPTS, params={"width": 64, "height": 64}, dispatch=False)
    with stack.sessions() as session:
        chunks = session.scalars(select(Outbox.item_ids).where(Outbox.batch_id == batch_id)).all()
    assert len(chunks) == 1

    report = ChunkRunner(ctx, "oom-test").run(chunks[0])

    assert report.succeeded == len(PROMPTS) and report.failed == 0 and report.images == len(PROMPTS)
    # 6 → 3 + 3 → (1 + 2) + (1 + 2): halves run unpadded, no item runs alone as a "bad item" retry.
    assert engine.passes == [(6, True), (3, False), (1, False), (2, False), (3, False), (1, False), (2, False)]
    assert stack.counts(batch_id)["succeeded"] == len(PROMPTS)
    assert len(stack.events(batch_id, "item.generated")) == len(PROMPTS)
    assert verify_chain(make_engine(stack.settings.database_url)).ok


def test_one_chain_head_update_per_micro_batch_and_the_chain_verifies_event_by_event(configure, random_checkpoint):
    stack = build_stack(configure, INSTABATCH_MODEL=str(random_checkpoint), INSTABATCH_MICRO_BATCH="3",
                        INSTABATCH_CHUNK_IMAGES="6")
    batch_id = stack.submit(PROMPTS, params={"width": 64, "height": 64})
    with running_worker(stack):
        assert stack.wait_until_done(batch_id)["succeeded"] == len(PROMPTS)
    events = [event for event in stack.events(batch_id) if event.action in ("qc.verdict", "item.generated")]
    assert len(events) == 2 * len(PROMPTS)
    # A micro-batch's events are one run of seqs: its qc.verdicts, then its item.generateds.
    for first in range(0, len(events), 6):
        run = events[first:first + 6]
        assert [event.seq for event in run] == list(range(run[0].seq, run[0].seq + 6))
        assert [event.action for event in run] == ["qc.verdict"] * 3 + ["item.generated"] * 3
        assert all(later.prev_hash == earlier.hash for earlier, later in zip(run, run[1:]))
    result = verify_chain(make_engine(stack.settings.database_url))
    assert result.ok and not result.problems


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_running_worker_serves_stage_histograms_on_its_metrics_port(configure, random_checkpoint):
    port = free_port()
    stack = build_stack(configure, INSTABATCH_MODEL=str(random_checkpoint), WORKER_METRICS_PORT=str(port))
    batch_id = stack.submit(PROMPTS[:4], params={"width": 64, "height": 64})
    with running_worker(stack):
        assert stack.wait_until_done(batch_id)["succeeded"] == 4
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for stage in ("claim", "generate", "encode", "upload", "qc", "ledger"):
        assert f'instabatch_stage_seconds_bucket{{le="+Inf",stage="{stage}"}}' in body, stage
        count = next(line for line in body.splitlines()
                     if line.startswith(f'instabatch_stage_seconds_count{{stage="{stage}"}}'))
        assert float(count.split()[-1]) >= 1
    image = stack.images(batch_id)[0]
    assert f'instabatch_images_total{{model="{image.model_id}",verdict=' in body
    assert "instabatch_model_load_seconds " in body
    assert ("instabatch_gpu_memory_bytes" in body) == torch.cuda.is_available()  # the gauge exists only with CUDA


def test_a_duplicate_in_a_later_chunk_is_found_through_the_band_index(configure, random_checkpoint):
    from core import ledger
    from models import ImagePhashBand, QcResult

    stack = build_stack(configure, INSTABATCH_MODEL=str(random_checkpoint), INSTABATCH_MICRO_BATCH="2",
                        INSTABATCH_CHUNK_IMAGES="2")
    twins = [ledger.ItemSpec(prompt="a red mug", external_id=f"twin-{n}", seed=7) for n in range(2)]
    others = [ledger.ItemSpec(prompt=prompt, external_id=f"other-{n}", seed=100 + n) for n, prompt in enumerate(PROMPTS[1:3])]
    batch_id = stack.submit(twins[:1] + others + twins[1:], params={"width": 64, "height": 64})  # twins 3 chunks apart
    with running_worker(stack):
        assert stack.wait_until_done(batch_id)["succeeded"] == 4
    images = {image.item_id: image for image in stack.images(batch_id)}
    items = {item.external_id: item for item in stack.items(batch_id)}
    first, second = images[items["twin-0"].id], images[items["twin-1"].id]
    assert first.phash == second.phash
    assert "near_duplicate" in second.qc_reasons and "near_duplicate" not in first.qc_reasons
    with stack.sessions() as session:
        metrics = session.scalar(select(QcResult.metrics).where(QcResult.image_id == second.id,
                                                                QcResult.scorer == "duplicate"))
        bands = session.scalars(select(ImagePhashBand.image_id).where(ImagePhashBand.batch_id == batch_id)).all()
    assert metrics["twin_ref"] == first.id and metrics["nearest_distance"] == 0
    assert sorted(bands) == sorted(image.id for image in images.values() for _ in range(4))

    # The worker asks for a micro-batch's candidates in one query: the same matches as a look-up of
    # each value among the batch's images that share a luma band with it.
    from qc.phash import HashIndex, luma_bands
    from worker.duplicates import LedgerHashIndex

    def in_ledger(work):
        with stack.sessions() as session:
            return work(session)

    recorded = [(int(image.phash, 16), image.id) for image in images.values()]
    luma_mask = ((1 << 64) - 1) << 192
    probes = [value for value, _ in recorded] + [value ^ (1 << 255) ^ 1 for value, _ in recorded] + \
        [recorded[0][0] ^ luma_mask]

    def expected(value):
        bands = set(enumerate(luma_bands(value)))
        shared = {phash: ref for phash, ref in recorded if set(enumerate(luma_bands(phash))) & bands}
        return HashIndex(shared).nearest(value)

    def seen(match):
        return None if match is None else (match.phash, match.distance, match.colour_distance)

    found = LedgerHashIndex(in_ledger, batch_id).nearest_many(probes)
    assert [seen(match) for match in found] == [seen(expected(value)) for value in probes]
    assert found[-1] is None and found[0].distance == 0


def test_the_next_passes_prompts_are_encoded_ahead_on_their_own_thread_with_the_same_images(configure,
                                                                                            random_checkpoint):
    import threading

    from instaflow.pipeline import InstaFlowPipeline

    threads: list[str] = []
    original = InstaFlowPipeline._encode_text

    def spy(self, prompts):
        threads.append(threading.current_thread().name)
        return original(self, prompts)

    pixels = {}
    for depth in ("2", "0"):  # overlapped (encoded ahead), then naive (no overlap, nothing ahead)
        stack = build_stack(configure, INSTABATCH_MODEL=str(random_checkpoint), INSTABATCH_MICRO_BATCH="2",
                            INSTABATCH_CHUNK_IMAGES="6", INSTABATCH_PIPELINE_DEPTH=depth)
        ctx = stack.app.instabatch
        batch_id = stack.submit(PROMPTS, params={"width": 64, "height": 64}, dispatch=False)
        with stack.sessions() as session:
            chunks = session.scalars(select(Outbox.item_ids).where(Outbox.batch_id == batch_id)).all()
        threads.clear()
        InstaFlowPipeline._encode_text = spy
        try:
            reports = [ChunkRunner(ctx, f"ahead-{depth}-{n}").run(chunk) for n, chunk in enumerate(chunks)]
        finally:
            InstaFlowPipeline._encode_text = original
        assert sum(report.succeeded for report in reports) == len(PROMPTS)
        # The files are signed (a manifest differs per signing): compare the pixels.
        pixels[depth] = sorted((image.seed, PILImage.open(io.BytesIO(stack.store.get(image.storage_key))).tobytes())
                               for image in stack.images(batch_id))
        main = threading.current_thread().name
        # One chunk of 3 passes: the first encoded in the pass itself, the next two ahead (overlapped only).
        assert sorted(threads) == sorted(["ahead_0"] * 2 + [main] if depth == "2" else [main] * 3)
    assert pixels["2"] == pixels["0"] and len(pixels["2"]) == len(PROMPTS)
