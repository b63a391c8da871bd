"""The audit trail: the hash chain (``chain``), its verification (``verify``), anchors in
write-once storage (``anchors``) and exports (``export``).

Writers use the chain's functions from here: ``from core import audit; audit.record(session, ...)``.
"""
from core.audit.chain import (
                              AUDIT_EXPORTED,
                              CHAIN_HEAD_ID,
                              GENESIS_HASH,
                              EventFields,
                              canonical_event,
                              event_hash,
                              record,
                              record_many,
                              to_jsonable,
)

__all__ = ["AUDIT_EXPORTED", "CHAIN_HEAD_ID", "GENESIS_HASH", "EventFields", "canonical_event", "event_hash",
           "record", "record_many", "to_jsonable"]
