"""The worker on real parts: Celery workers consuming Redis (or the embedded SQLite broker), the ledger
on PostgreSQL (or SQLite), images in S3 through a moto server (or the local store), the real engine
on a tiny random checkpoint."""
from __future__ import annotations

import hashlib
import json

import pytest
from sqlalchemy import func, select

from core import ledger
from core.broker import GENERATE_TASK
from core.provenance import read_png_provenance
from models import Batch, Image, Outbox, QcResult
from tests.workerkit import Stack, build_stack, running_worker
from worker.model_runner import ModelRunner

PROMPTS = ["a red mug on a white table", "a blue sneaker, studio light", "a green bottle",
           "a yellow lamp", "a black backpack"]





def test_a_small_batch_ends_with_every_image_stored_checked_and_recorded(stack: Stack):
    items = [ledger.ItemSpec(prompt=p, external_id=f"sku-{i}", seed=100 + i, num_images=1 + i % 2)
             for i, p in enumerate(PROMPTS)]
    with running_worker(stack):
        batch_id = stack.submit(items, params={"width": 64, "height": 64})
        counts = stack.wait_until_done(batch_id)

    assert counts["succeeded"] == len(PROMPTS) and sum(counts.values()) == len(PROMPTS)
    images = stack.images(batch_id)
    assert len(images) == sum(i.num_images for i in items) == 7
    assert len({image.storage_key for image in images}) == len(images)
    by_item = {item.id: item for item in stack.items(batch_id)}
    for image in images:
        item = by_item[image.item_id]
        data = stack.store.get(image.storage_key)
        assert hashlib.sha256(data).hexdigest() == image.sha256
        assert image.storage_key == f"batches/{batch_id}/{item.seq:06d}-{item.id}/{image.index}.png"
        assert image.seed == item.seed + image.index
        chunks = read_png_provenance(data)
        assert chunks["item_id"] == item.id and chunks["batch_id"] == batch_id
        assert chunks["prompt"] == item.prompt and int(chunks["seed"]) == image.seed
        assert chunks["model"] == image.model_id and chunks["weights_sha256"] == image.weights_sha256
        assert json.loads(chunks["params"])["width"] == 64
        metadata = stack.store.head(image.storage_key)
        assert metadata["item_id"] == item.id and metadata["seed"] == str(image.seed)
        assert metadata["weights_sha256"] == image.weights_sha256
        assert image.qc_verdict in ("pass", "review", "reject")
        assert set(image.timings) >= {"generate", "encode", "store", "qc"}

    with stack.sessions() as session:
        qc_rows = session.scalar(select(func.count()).select_from(QcResult)
                                 .join(Image, Image.id == QcResult.image_id).where(Image.batch_id == batch_id))
    assert qc_rows >= len(images)
    generated = stack.events(batch_id, "item.generated")
    assert len(generated) == len(PROMPTS)
    payload = generated[0].payload
    assert {"model", "weights_sha256", "code_version", "seed", "params", "worker", "duration_s", "sha256"} <= set(payload)
    assert len(stack.events(batch_id, "qc.verdict")) == len(images)
    assert len(stack.events(batch_id, "batch.completed")) == 1
    assert stack.events(batch_id, "batch.completed")[0].payload["status"] == "succeeded"
    assert stack.batch(batch_id).finished_at is not None


def test_a_duplicate_delivery_generates_nothing_twice(real: Stack):
    batch_id = real.submit(PROMPTS, chunk_images=2)
    with real.sessions() as session:
        chunks = session.scalars(select(Outbox.item_ids).where(Outbox.batch_id == batch_id)).all()
    for item_ids in chunks:  # every chunk delivered a second time, as a relay that crashed before marking would
        real.app.send_task(GENERATE_TASK, args=[item_ids], queue="generate")
    with running_worker(real):
        real.wait_until_done(batch_id)
        # and once more after the batch is done: the worker must find nothing to claim
        real.app.send_task(GENERATE_TASK, args=[chunks[0]], queue="generate")
        marker = real.submit(["a marker batch"])  # queued behind it: once done, the extra chunk was consumed
        real.wait_until_done(marker)

    assert real.counts(batch_id)["succeeded"] == len(PROMPTS)
    assert all(item.attempts == 1 for item in real.items(batch_id))
    assert len(real.images(batch_id)) == len(PROMPTS)
    assert len(real.events(batch_id, "item.generated")) == len(PROMPTS)
    assert len(real.store.list_keys(f"batches/{batch_id}/")) == len(PROMPTS)


def test_a_poison_item_fails_alone_while_the_rest_succeeds(real: Stack, monkeypatch):
    original = ModelRunner.generate

    def generate(self, prompts, seeds, params):
        if any("POISON" in prompt for prompt in prompts):
            raise RuntimeError("the engine choked on this prompt")
        return original(self, prompts, seeds, params)

    monkeypatch.setattr(ModelRunner, "generate", generate)
    prompts = PROMPTS[:2] + ["a POISON pill"] + PROMPTS[2:]
    with running_worker(real):
        batch_id = real.submit(prompts, chunk_images=4)
        counts = real.wait_until_done(batch_id)

    assert counts["succeeded"] == len(prompts) - 1 and counts["failed"] == 1
    failed = [item for item in real.items(batch_id) if item.state == "failed"]
    assert failed[0].prompt == "a POISON pill"
    assert "RuntimeError: the engine choked on this prompt" in failed[0].error
    assert real.events(batch_id, "batch.completed")[0].payload["status"] == "completed_with_errors"


def test_a_blocked_prompt_fails_with_its_reason_before_generation(embedded: Stack, monkeypatch):
    pytest.importorskip("qc.screening")
    calls: list[list[str]] = []
    original = ModelRunner.generate
    monkeypatch.setattr(ModelRunner, "generate", lambda self, p, s, params: calls.append(list(p)) or original(self, p, s, params))
    with running_worker(embedded):
        batch_id = embedded.submit(["a red mug", "a gore scene with a mug"])
        counts = embedded.wait_until_done(batch_id)
    assert counts["succeeded"] == 1 and counts["failed"] == 1
    blocked = [item for item in embedded.items(batch_id) if item.state == "failed"][0]
    assert "blocked" in blocked.error and "gore" in blocked.error
    assert all("gore" not in prompt for batch in calls for prompt in batch)
    assert len(embedded.events(batch_id, "item.blocked")) == 1


def test_cancel_stops_a_running_chunk_between_micro_batches(embedded: Stack, monkeypatch):
    original = ModelRunner.generate
    batch_ids: list[str] = []

    def generate_then_cancel(self, prompts, seeds, params):
        out = original(self, prompts, seeds, params)
        with embedded.sessions() as session:  # the user cancels while the first micro-batch runs
            batch = session.get(Batch, batch_ids[0])
            ledger.cancel_batch(session, batch, actor="test")
            session.commit()
        return out

    monkeypatch.setattr(ModelRunner, "generate", generate_then_cancel)
    embedded.settings.micro_batch = 1  # one image per pass: a cancel check before each
    batch_ids.append(embedded.submit(PROMPTS, chunk_images=len(PROMPTS)))
    with running_worker(embedded):
        counts = embedded.wait_until_done(batch_ids[0])

    assert counts["succeeded"] == 1 and counts["cancelled"] == len(PROMPTS) - 1
    assert len(embedded.images(batch_ids[0])) == 1
    completed = embedded.events(batch_ids[0], "batch.completed")
    assert completed[0].payload["status"] == "cancelled"


def test_a_storage_outage_fails_no_item_the_chunk_goes_back_to_the_queue(embedded: Stack, monkeypatch):
    store = embedded.store
    original = type(store).put
    outages = []

    def put_with_one_outage(self, key, data, metadata, content_type="image/png"):
        if not outages:
            outages.append(key)
            raise OSError("object store unreachable")
        return original(self, key, data, metadata, content_type)

    monkeypatch.setattr(type(store), "put", put_with_one_outage)
    with running_worker(embedded):
        batch_id = embedded.submit(PROMPTS[:3], chunk_images=4)
        counts = embedded.wait_until_done(batch_id)
    assert outages and counts["succeeded"] == 3
    assert [item.attempts for item in embedded.items(batch_id)] == [2, 2, 2]  # given back, then run again
    assert len(embedded.images(batch_id)) == 3 and not embedded.events(batch_id, "item.failed")


def test_refine_runs_after_generation_and_is_recorded(configure, random_checkpoint):
    stack = build_stack(configure, INSTABATCH_MODEL=str(random_checkpoint), INSTABATCH_REFINER=str(random_checkpoint))
    with running_worker(stack):
        batch_id = stack.submit(PROMPTS[:2], params={"refine": {"enabled": True, "strength": 0.5, "steps": 2}})
        counts = stack.wait_until_done(batch_id)
    assert counts["succeeded"] == 2
    for image in stack.images(batch_id):
        assert image.refine["strength"] == 0.5 and image.refine["steps"] == 2
        assert image.refine["refiner_weights_sha256"] == image.weights_sha256  # the same random checkpoint
        assert "refine" in image.timings
        assert "refiner_model" in read_png_provenance(stack.store.get(image.storage_key))
    assert stack.events(batch_id, "item.generated")[0].payload["refine"]["steps"] == 2


def test_webhooks_to_internal_addresses_are_refused_by_default(embedded: Stack):
    from worker.webhooks import InternalAddressRefused, refuse_internal_address

    assert not embedded.settings.webhook_allow_private
    for url in ("http://127.0.0.1:8080/hook", "http://10.1.2.3/hook", "http://169.254.169.254/latest/meta-data",
                "http://[::1]/hook", "http://localhost/hook"):
        with pytest.raises(InternalAddressRefused):
            refuse_internal_address(url)
    refuse_internal_address("http://93.184.215.14/hook")  # a global address passes (nothing is sent here)
    with running_worker(embedded):
        batch_id = embedded.submit(PROMPTS[:1], webhook_url="http://127.0.0.1:9/hook")
        assert embedded.wait_until_done(batch_id)["succeeded"] == 1  # the refused webhook fails nothing
