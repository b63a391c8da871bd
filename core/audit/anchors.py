"""Anchor the audit chain's head in write-once object storage.

An anchor is ``audit/anchors/{seq:012d}-{hash}.json``: the key itself names the anchored seq and
hash, and the object store refuses to overwrite it (S3 ``If-None-Match: *``, ``open(..., "x")``
locally). Someone who rewrites the whole chain with recomputed hashes — which the chain alone
cannot reveal — still cannot change what was anchored, so ``verify`` catches the rewrite at the
first anchor at or after the edit.

Before anchoring, the segment since the previous anchor is verified, so an anchor never blesses a
chain that was already broken.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.audit.chain import GENESIS_HASH
from core.audit.verify import ChainWalker, VerifyResult, read_head, stream_rows
from core.storage import ObjectStore
from models import AuditEvent, utcnow

ANCHOR_PREFIX = "audit/anchors/"
_ANCHOR_NAME = re.compile(r"^(\d{12})-([0-9a-f]{64})\.json$")


@dataclass(frozen=True)
class Anchor:
    seq: int
    hash: str

    @property
    def key(self) -> str:
        return f"{ANCHOR_PREFIX}{self.seq:012d}-{self.hash}.json"


@dataclass(frozen=True)
class AnchorResult:
    anchor: Anchor
    created: bool  # False: this head was already anchored


class ChainBroken(RuntimeError):
    """The chain since the last anchor does not verify; nothing was anchored."""

    def __init__(self, result: VerifyResult):
        first = result.problems[0].as_dict() if result.problems else {}
        super().__init__(f"audit chain broken since the last anchor, not anchoring: {first}")
        self.result = result


def parse_anchor_name(name: str) -> Anchor | None:
    match = _ANCHOR_NAME.match(name.rsplit("/", 1)[-1])
    return Anchor(int(match.group(1)), match.group(2)) if match else None


def list_anchors(store: ObjectStore) -> list[Anchor]:
    """Every anchor in the store, by seq. The key names carry seq and hash, so no object is read."""
    anchors = (parse_anchor_name(name) for name in _anchor_names(store))
    return sorted((a for a in anchors if a is not None), key=lambda a: a.seq)


def load_anchors(store: ObjectStore) -> dict[int, str]:
    return {anchor.seq: anchor.hash for anchor in list_anchors(store)}


def _anchor_names(store: ObjectStore) -> list[str]:
    return store.list_keys(ANCHOR_PREFIX)


def anchor_chain(session: Session, store: ObjectStore, *, check: bool = True) -> AnchorResult | None:
    """Write the current chain head to the store; None while the chain is empty.

    ``check`` first verifies the events since the previous anchor (raises :class:`ChainBroken`).
    Idempotent: anchoring an already anchored head writes nothing.
    """
    conn = session.connection()
    head_seq, head_hash = read_head(conn)
    if head_seq == 0:
        return None
    anchors = list_anchors(store)
    previous = anchors[-1] if anchors else None
    if previous and (previous.seq, previous.hash) == (head_seq, head_hash):
        return AnchorResult(previous, created=False)
    if check:
        _verify_since(session, previous, head_seq, head_hash)
    anchor = Anchor(head_seq, head_hash)
    event_ts = session.scalar(select(AuditEvent.ts).where(AuditEvent.seq == head_seq))
    body = {
        "seq": head_seq, "hash": head_hash, "ts": event_ts.isoformat() if event_ts else None,
        "anchored_at": utcnow().isoformat(),
        "previous": {"seq": previous.seq, "hash": previous.hash} if previous else None,
    }
    put = store.put(anchor.key, json.dumps(body, sort_keys=True).encode(),
                    {"seq": str(head_seq), "hash": head_hash}, content_type="application/json")
    return AnchorResult(anchor, created=put.created)


def _verify_since(session: Session, previous: Anchor | None, head_seq: int, head_hash: str) -> None:
    # Rows past the head we read are writers committing meanwhile, not forgeries: stop at the head.
    start_seq, start_hash = (previous.seq, previous.hash) if previous else (0, GENESIS_HASH)
    walker = ChainWalker(head_seq, head_hash, start_seq=start_seq, start_hash=start_hash)
    for row in stream_rows(session.connection(), after_seq=start_seq, through_seq=head_seq):
        walker.feed(row)
    result = walker.finish()
    if not result.ok:
        raise ChainBroken(result)


def anchor_now() -> AnchorResult | None:
    """The periodic task's body: anchor the configured ledger's head in the configured store."""
    from core.db import session_scope
    from core.storage import get_store

    with session_scope() as session:
        return anchor_chain(session, get_store())
