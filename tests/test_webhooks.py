"""Durable signed webhooks on PostgreSQL + Redis + S3 with a real worker (docs/webhooks.md).

The delivery row is written with the event; the maintenance task sends it with backoff; a
receiver that fails twice gets it on the third try, with a signature the ``standardwebhooks``
package accepts, under one ``webhook-id``. Flagged images and dead items are events too, and an
internal address is refused.
"""
from __future__ import annotations

import threading
import time
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import redis
from sqlalchemy import select, update
from standardwebhooks import Webhook, WebhookVerificationError

from core import webhooks
from core.broker import MAINTENANCE_QUEUE, WEBHOOK_TASK
from core.settings import get_settings
from models import Item, WebhookDelivery, utcnow
from tests.workerkit import Stack, build_stack, running_worker
from worker.sweeper import sweep
from worker.webhooks import deliver_due


@pytest.fixture
def hooks(configure, random_checkpoint, pg_url, redis_url, s3_server, s3_bucket) -> Stack:
    redis.Redis.from_url(redis_url).flushdb()
    # The receiver listens on loopback, which only an explicit WEBHOOK_ALLOW_PRIVATE lets through.
    return build_stack(configure, INSTABATCH_MODEL=str(random_checkpoint), DATABASE_URL=pg_url,
                       BROKER_URL=redis_url, S3_BUCKET=s3_bucket, S3_ENDPOINT_URL=s3_server,
                       WEBHOOK_ALLOW_PRIVATE="true", WEBHOOK_BACKOFF_SECONDS="0.5",
                       WEBHOOK_DELIVER_EVERY_SECONDS="0.2")


class FlakyReceiver:
    """A local HTTP endpoint that answers 503 to its first ``failures`` requests, then 204."""

    def __init__(self, failures: int):
        self.requests: list[tuple[dict[str, str], bytes, float]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body, time.monotonic()))
                self.send_response(503 if len(receiver.requests) <= failures else 204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/hook"

    def __enter__(self) -> "FlakyReceiver":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()


def deliveries(stack: Stack, batch_id: str) -> list[WebhookDelivery]:
    with stack.sessions() as session:
        return list(session.scalars(select(WebhookDelivery).where(WebhookDelivery.batch_id == batch_id)))


def beat_ticks(stack: Stack, until, timeout: float = 60.0) -> None:
    """Send the beat task's message to the maintenance queue, as beat would, until ``until()``."""
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "the webhook was not delivered in time"
        stack.app.send_task(WEBHOOK_TASK, queue=MAINTENANCE_QUEUE)
        time.sleep(get_settings().webhook_deliver_every_seconds)


def test_a_receiver_that_fails_twice_gets_the_signed_event_on_the_third_try(hooks: Stack):
    with hooks.sessions() as session:
        secret = webhooks.rotate_secret(session, "t", actor="test")
        session.commit()
    with FlakyReceiver(failures=2) as receiver, running_worker(hooks):
        batch_id = hooks.submit(["a red mug", "a blue cup"], webhook_url=receiver.url)
        hooks.wait_until_done(batch_id)
        [delivery] = deliveries(hooks, batch_id)  # written with the completion, before any send
        assert (delivery.event, delivery.status) == ("batch.completed", "pending")
        beat_ticks(hooks, lambda: deliveries(hooks, batch_id)[0].status == "delivered")
    assert len(receiver.requests) == 3
    ids = {headers["webhook-id"] for headers, _, _ in receiver.requests}
    assert ids == {delivery.id}  # one id across retries: the receiver can deduplicate
    headers, body, _ = receiver.requests[-1]
    message = Webhook(secret).verify(body, headers)
    assert message["type"] == "batch.completed"
    assert message["data"]["batch_id"] == batch_id and message["data"]["counts"]["succeeded"] == 2
    with pytest.raises(WebhookVerificationError):
        Webhook(webhooks.new_secret()).verify(body, headers)
    times = [t for _, _, t in receiver.requests]
    assert times[2] - times[1] >= times[1] - times[0] >= 0.5  # exponential backoff between tries
    [done] = deliveries(hooks, batch_id)
    assert (done.attempts, done.last_status_code, done.delivered_at is not None) == (3, 204, True)
    beat = hooks.app.conf.beat_schedule["deliver-webhooks"]  # what beat sends, and where
    assert (beat["task"], beat["options"]["queue"]) == (WEBHOOK_TASK, MAINTENANCE_QUEUE)


def test_flagged_images_and_dead_items_are_events_for_the_teams_endpoint(
        configure, random_checkpoint, pg_url, redis_url, s3_server, s3_bucket):
    redis.Redis.from_url(redis_url).flushdb()
    # Every image "blank" (QC_BLANK_STD_MAX above any image's spread): QC flags them all.
    stack = build_stack(configure, INSTABATCH_MODEL=str(random_checkpoint), DATABASE_URL=pg_url,
                        BROKER_URL=redis_url, S3_BUCKET=s3_bucket, S3_ENDPOINT_URL=s3_server, QC_BLANK_STD_MAX="10")
    with stack.sessions() as session:
        webhooks.set_team_url(session, "t", "https://hooks.example.com/team-t", actor="test")  # no batch URL
        session.commit()
    with running_worker(stack):
        flagged = stack.submit(["a red mug", "a blue cup"])
        stack.wait_until_done(flagged)
    events = sorted(d.event for d in deliveries(stack, flagged))
    assert events == ["batch.completed", "image.flagged", "image.flagged"]
    assert {d.url for d in deliveries(stack, flagged)} == {"https://hooks.example.com/team-t"}
    image_ids = {image.id for image in stack.images(flagged)}
    assert {d.payload["data"]["image_id"] for d in deliveries(stack, flagged) if d.event == "image.flagged"} == image_ids

    doomed = stack.submit(["a grey chair"], dispatch=False)
    with stack.sessions() as session:  # its worker died on every attempt: the lease ran out the last time
        session.execute(update(Item).where(Item.batch_id == doomed).values(
            state="running", attempts=3, lease_owner="gone:1:x", lease_expires_at=utcnow() - timedelta(seconds=1)))
        session.commit()
    report = sweep(stack.sessions, stack.app, get_settings())
    assert len(report.dead) == 1 and doomed in report.completed_batches
    dead, failed = sorted(deliveries(stack, doomed), key=lambda d: d.event != "item.dead")
    assert (dead.event, dead.payload["data"]["item_id"], dead.payload["data"]["attempts"]) == (
        "item.dead", report.dead[0], 3)
    assert failed.event == "batch.failed" and failed.payload["data"]["status"] == "completed_with_errors"


def test_a_rotated_secret_signs_beside_the_new_one_during_the_grace_period(hooks: Stack):
    with hooks.sessions() as session:
        old = webhooks.rotate_secret(session, "rotating", actor="test")
        new = webhooks.rotate_secret(session, "rotating", actor="test")
        secrets = webhooks.signing_secrets(session, "rotating", get_settings(), utcnow())
        session.commit()
    request = webhooks.signed_request("msg_1", {"type": "batch.completed"}, secrets, utcnow())
    assert secrets == [new, old] and len(request.headers["webhook-signature"].split(" ")) == 2
    for secret in (old, new):
        assert Webhook(secret).verify(request.body, request.headers)["type"] == "batch.completed"


def test_an_internal_address_is_refused_for_good_without_the_opt_in(configure, pg_url):
    configure(DATABASE_URL=pg_url)
    from core.db import session_factory, get_engine

    sessions = session_factory(get_engine())
    with sessions() as session:
        delivery = webhooks.enqueue(session, "item.dead", team="ssrf", batch_id=None,
                                    url="http://169.254.169.254/latest/meta-data", data={"item_id": "x"})
        session.commit()
    report = deliver_due(sessions, get_settings())
    assert delivery.id in report.failed
    with sessions() as session:
        row = session.get(WebhookDelivery, delivery.id)
        assert row.status == "failed" and row.attempts == 1 and "internal address" in row.last_error
