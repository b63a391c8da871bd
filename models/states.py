from enum import StrEnum


class ItemState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DEAD = "dead"
    CANCELLED = "cancelled"

    @classmethod
    def active(cls) -> tuple["ItemState", ...]:
        """Not finished yet: waiting for a worker or held by one."""
        return (cls.QUEUED, cls.RUNNING)

    @classmethod
    def finished(cls) -> frozenset["ItemState"]:
        """Terminal: nothing will change the item again (short of a retry)."""
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
