"""The review queue with thousands of flagged images: keyset pages stay complete, ordered and fast.

Prints ``RESULT`` lines (median milliseconds per request through the ASGI app, in process); the
assertions are about correctness only. 5,000 flagged images in 5 batches beside 5,000 passed ones.
"""
from __future__ import annotations

import statistics
import time
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import text

from tests.apikit import ApiHarness
from core.db import get_engine
from tests.reviewkit import seed_batch

FLAGGED_BATCHES, PER_BATCH = 5, 1_000
REASONS = (["blurry"], ["near_duplicate"], ["underexposed"], ["wrong_color"])


@pytest.fixture(params=["sqlite", "postgresql"])
def api(request, configure) -> ApiHarness:
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    configure(DATABASE_URL=url)
    return ApiHarness.start()


def timed(call, repeat: int = 5) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = call()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), result


def test_thousands_of_flagged_images_page_completely_in_order(api, request):
    backend = request.node.callspec.params["api"]
    start = datetime(1980, 1, 1, tzinfo=timezone.utc)  # before anything else in the session's ledger
    batches = [seed_batch(api.team, [("review", REASONS[i % 4]) for i in range(PER_BATCH)], with_png=False,
                          start=start + timedelta(hours=b), step=timedelta(milliseconds=7))
               for b in range(FLAGGED_BATCHES)]
    seed_batch(api.team, [("pass", [])] * PER_BATCH * FLAGGED_BATCHES, with_png=False, start=start)
    expected = [image_id for batch in batches for image_id in batch.image_ids]

    get = lambda **params: api.get("reviewer", "/v1/review", params=params).json()  # noqa: E731
    first_ms, first = timed(lambda: get(limit=50))
    assert [e["image_id"] for e in first["entries"]] == expected[:50] and first["total"] >= len(expected)

    seen, cursor, pages, started = [], None, 0, time.perf_counter()
    while len(seen) < len(expected):
        page = get(limit=200, **({"cursor": cursor} if cursor else {}))
        seen += [e["image_id"] for e in page["entries"]]
        cursor, pages = page["next_cursor"], pages + 1
    walk_ms = (time.perf_counter() - started) * 1000 / pages
    assert seen[:len(expected)] == expected

    deep = get(limit=200, batch_id=batches[4].batch_id)  # the last batch: 4,000 flagged images before it
    deep_ms, _ = timed(lambda: get(limit=50, cursor=deep["next_cursor"]))
    reason_ms, by_reason = timed(lambda: get(limit=50, reason="wrong_color"))
    assert all(e["reasons"] == ["wrong_color"] for e in by_reason["entries"]) and len(by_reason["entries"]) == 50
    batch_ms, by_batch = timed(lambda: get(limit=50, batch_id=batches[2].batch_id))
    assert [e["image_id"] for e in by_batch["entries"]] == batches[2].image_ids[:50] and by_batch["total"] == PER_BATCH

    print(f"\nRESULT review_queue_{backend}_first_page_50_with_total_ms={first_ms:.1f}")
    print(f"RESULT review_queue_{backend}_page_200_walk_mean_ms={walk_ms:.1f} pages={pages}")
    print(f"RESULT review_queue_{backend}_deep_page_50_ms={deep_ms:.1f}")
    print(f"RESULT review_queue_{backend}_reason_filter_page_50_ms={reason_ms:.1f}")
    print(f"RESULT review_queue_{backend}_batch_filter_page_50_ms={batch_ms:.1f}")
    if backend == "postgresql":
        with get_engine().connect() as conn:
            conn.execute(text("ANALYZE images"))
            plan = conn.execute(text(
                "EXPLAIN SELECT id FROM images WHERE qc_verdict = 'review' AND review_status IS NULL "
                "ORDER BY created_at, id LIMIT 51")).scalars().all()
        print("RESULT review_queue_postgresql_plan=" + " | ".join(line.strip() for line in plan[:3]))
