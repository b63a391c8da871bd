from enum import StrEnum


class ItemState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DEAD = "dead"
    CANCELLED = "cancelled"

    @classmethod
    def finished(cls) -> frozenset["ItemState"]:
        return frozenset({cls.SUCCEEDED, cls.FAILED, cls.DEAD, cls.CANCELLED})


class BatchStatus(StrEnum):
    """Derived from the item counts; never stored, so it cannot drift from them."""
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    COMPLETED_WITH_ERRORS = "completed_with_errors"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


class Verdict(StrEnum):
    PASS = "pass"
    REVIEW = "review"
    REJECT = "reject"


class ReviewDecision(StrEnum):
    APPROVED = "approved"
    REJECTED = "rejected"
    REGENERATED = "regenerated"


class Role(StrEnum):
    SUBMITTER = "submitter"
    REVIEWER = "reviewer"
    AUDITOR = "auditor"
    ADMIN = "admin"
