"""What the relay's fair order costs per pass: ``python -m bench.dispatch [--admin-url URL]``.

Creates a throwaway PostgreSQL database, submits three teams' batches (50,000, 5,000 and 50
images, chunks of 16: 3,442 pending chunks on one queue), times the queries of one fill
decision (room, the pending heads of every batch, what flies per team, the fair pick) and
drops the database. Prints ``RESULT`` lines; never asserts on time.
"""
from __future__ import annotations

import argparse
import time
import uuid

import psycopg
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

from core import ledger
from core.dispatch import fair_pick, flying_by_owner, has_pending, pending_heads, queue_in_flight
from core.migrate import upgrade

TEAMS = (("big", 50_000), ("mid", 5_000), ("small", 50))
QUEUE, BOUND, CHUNK = "generate", 32, 16


def fill_decision_seconds(url: str, repeats: int) -> tuple[float, list[str]]:
    upgrade(url)
    engine = create_engine(url)
    sessions = sessionmaker(engine, expire_on_commit=False)
    try:
        with sessions() as session:
            for team, images in TEAMS:
                items = [ledger.ItemSpec(prompt=f"a product {i}", seed=i) for i in range(images)]
                ledger.submit_batch(session, ledger.BatchSpec(name=team, items=items), team=team, actor="bench",
                                    chunk_images=CHUNK)
            session.commit()
        best, picked = float("inf"), []
        with sessions() as session:
            for _ in range(repeats):
                began = time.perf_counter()
                room = BOUND - queue_in_flight(session, QUEUE)
                picked = fair_pick(pending_heads(session, QUEUE, room), flying_by_owner(session, QUEUE), room)
                has_pending(session, QUEUE)
                best = min(best, time.perf_counter() - began)
        return best, [candidate.team for candidate in picked]
    finally:
        engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    name = f"instabatch_bench_{uuid.uuid4().hex[:8]}"
    host = args.admin_url.rsplit("/", 1)[0].split("://", 1)[1]
    with psycopg.connect(args.admin_url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        seconds, teams = fill_decision_seconds(f"postgresql+psycopg://{host}/{name}", args.repeats)
    finally:
        with psycopg.connect(args.admin_url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
    print(f"RESULT relay_fill_decision_ms={seconds * 1000:.1f}")
    print(f"RESULT relay_pending_chunks={sum(-(-images // CHUNK) for _, images in TEAMS)}")
    print(f"RESULT relay_first_pick_by_team={','.join(f'{t}:{teams.count(t)}' for t, _ in TEAMS)}")


if __name__ == "__main__":
    main()
