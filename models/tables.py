from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from models.base import Base, BigIntPK, JSONType, new_id, utcnow
from models.states import ItemState

UUID_LEN = 36


def uuid_pk() -> Mapped[str]:
    return mapped_column(String(UUID_LEN), primary_key=True, default=new_id)


def created_at() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), default=utcnow, nullable=False)


class ApiKey(Base):
    """An API key; only its sha256 is stored, the key itself is shown once on creation."""
    __tablename__ = "api_keys"

    id: Mapped[str] = uuid_pk()
    name: Mapped[str] = mapped_column(String(200))
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    team: Mapped[str] = mapped_column(String(100), index=True)
    created_at: Mapped[datetime] = created_at()
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Batch(Base):
    __tablename__ = "batches"
    __table_args__ = (UniqueConstraint("team", "idempotency_key", name="uq_batches_team_idempotency_key"),)

    id: Mapped[str] = uuid_pk()
    name: Mapped[str] = mapped_column(String(200))
    team: Mapped[str] = mapped_column(String(100), index=True)
    submitted_by: Mapped[str | None] = mapped_column(String(UUID_LEN))
    params: Mapped[dict[str, Any]] = mapped_column(JSONType)
    priority: Mapped[str] = mapped_column(String(16), default="normal")
    webhook_url: Mapped[str | None] = mapped_column(String(2000))
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_sha256: Mapped[str | None] = mapped_column(String(64))
    total_items: Mapped[int] = mapped_column(Integer, default=0)
    total_images: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = created_at()
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The version of the team's brand rules the batch was made under (None: the team had none).
    brand_rules_version: Mapped[int | None] = mapped_column(Integer)
    # The canary it was submitted under (core/canary.py): candidate model, fraction, the candidate's params.
    canary: Mapped[dict[str, Any] | None] = mapped_column(JSONType)

    items: Mapped[list["Item"]] = relationship(back_populates="batch", lazy="raise_on_sql")


class Item(Base):
    """One prompt of a batch; yields ``num_images`` images. Its state is the source of truth."""
    __tablename__ = "items"
    __table_args__ = (
        UniqueConstraint("batch_id", "seq", name="uq_items_batch_seq"),
        Index("ix_items_batch_state", "batch_id", "state"),
        Index("ix_items_state_lease", "state", "lease_expires_at"),
    )

    id: Mapped[str] = uuid_pk()
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    external_id: Mapped[str | None] = mapped_column(String(200))
    prompt: Mapped[str] = mapped_column(Text)
    seed: Mapped[int] = mapped_column(BigInteger)
    num_images: Mapped[int] = mapped_column(Integer, default=1)
    # A canary's candidate model for this item (core/canary.py); None: the batch's params.model.
    model: Mapped[str | None] = mapped_column(String(200))
    state: Mapped[str] = mapped_column(String(16), default=ItemState.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = created_at()
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    batch: Mapped[Batch] = relationship(back_populates="items", lazy="raise_on_sql")
    images: Mapped[list["Image"]] = relationship(
        back_populates="item", lazy="raise_on_sql", order_by="Image.created_at"
    )


class Image(Base):
    """A stored PNG with its provenance and its QC verdict."""
    __tablename__ = "images"
    __table_args__ = (
        Index("ix_images_batch_verdict", "batch_id", "qc_verdict"),
        Index("ix_images_review_queue", "qc_verdict", "review_status", "created_at"),
        # The QA queue pages by (created_at, id) over undecided review images only; a partial
        # index keeps that a range scan however many images have passed or been decided.
        Index("ix_images_awaiting_review", "created_at", "id",
              postgresql_where=text("qc_verdict = 'review' AND review_status IS NULL"),
              sqlite_where=text("qc_verdict = 'review' AND review_status IS NULL")),
    )

    id: Mapped[str] = uuid_pk()
    item_id: Mapped[str] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer, default=0)
    parent_image_id: Mapped[str | None] = mapped_column(ForeignKey("images.id"))
    seed: Mapped[int] = mapped_column(BigInteger)
    storage_key: Mapped[str] = mapped_column(String(500), unique=True)
    sha256: Mapped[str] = mapped_column(String(64))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    model_id: Mapped[str] = mapped_column(String(500))
    weights_sha256: Mapped[str] = mapped_column(String(64))
    refine: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    timings: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    phash: Mapped[str | None] = mapped_column(String(64))  # 256-bit perceptual hash, hex
    qc_verdict: Mapped[str | None] = mapped_column(String(16))
    qc_reasons: Mapped[list[str] | None] = mapped_column(JSONType)
    review_status: Mapped[str | None] = mapped_column(String(16))
    # Content Credentials (core/credentials.py, core/watermark.py): the watermark's id, how
    # verification finds this row from pixels alone, and what was signed and marked (or skipped, why).
    watermark_id: Mapped[str | None] = mapped_column(String(16), index=True)
    credentials: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    created_at: Mapped[datetime] = created_at()

    item: Mapped[Item] = relationship(back_populates="images", lazy="raise_on_sql")


class ImagePhashBand(Base):
    """One 16-bit band of an image's luma pHash: a near duplicate (at most 3 luma bits apart)
    shares at least one band exactly, so the duplicate check is an indexed look-up, not a load
    of the batch's hashes (qc/phash.py, ``luma_bands``)."""
    __tablename__ = "image_phash_bands"
    __table_args__ = (Index("ix_image_phash_bands_lookup", "batch_id", "band", "value"),)

    image_id: Mapped[str] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    band: Mapped[int] = mapped_column(Integer, primary_key=True)
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    value: Mapped[int] = mapped_column(Integer)


class QcResult(Base):
    """One scorer's metrics for one image, with the thresholds it was judged against."""
    __tablename__ = "qc_results"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    image_id: Mapped[str] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    scorer: Mapped[str] = mapped_column(String(100))
    scorer_version: Mapped[str] = mapped_column(String(50))
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONType)
    thresholds: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    verdict: Mapped[str] = mapped_column(String(16))
    reasons: Mapped[list[str] | None] = mapped_column(JSONType)
    created_at: Mapped[datetime] = created_at()


class Review(Base):
    __tablename__ = "reviews"

    id: Mapped[str] = uuid_pk()
    image_id: Mapped[str] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    decision: Mapped[str] = mapped_column(String(16))
    reason_code: Mapped[str | None] = mapped_column(String(100))
    comment: Mapped[str | None] = mapped_column(Text)
    reviewer_key_id: Mapped[str | None] = mapped_column(String(UUID_LEN))
    reviewer_name: Mapped[str | None] = mapped_column(String(200))
    new_image_id: Mapped[str | None] = mapped_column(String(UUID_LEN))
    # A regenerate's delivery: attempts started, the last send, and why it ended without an image.
    regeneration_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    regeneration_sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    regeneration_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = created_at()


class AuditEvent(Base):
    """Append-only; ``hash = sha256(prev_hash || canonical JSON of the event)`` (core/audit/chain.py)."""
    __tablename__ = "audit_events"

    seq: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    ts: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(100), index=True)
    batch_id: Mapped[str | None] = mapped_column(String(UUID_LEN), index=True)
    item_id: Mapped[str | None] = mapped_column(String(UUID_LEN))
    image_id: Mapped[str | None] = mapped_column(String(UUID_LEN))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONType)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64), unique=True)


class AuditChainHead(Base):
    """One row: the chain's last hash. Writers update it first, which serializes them."""
    __tablename__ = "audit_chain_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    last_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    last_hash: Mapped[str] = mapped_column(String(64))


class Outbox(Base):
    """A chunk of items to publish to the broker; written with the batch itself.

    Pending (``dispatched_at`` NULL), in flight (sent, ``claimed_at`` NULL), or claimed: a worker
    took the message (core/dispatch.py)."""
    __tablename__ = "outbox"
    __table_args__ = (
        Index("ix_outbox_pending", "dispatched_at"),
        Index("ix_outbox_in_flight", "queue", "dispatched_at",
              postgresql_where=text("dispatched_at IS NOT NULL AND claimed_at IS NULL"),
              sqlite_where=text("dispatched_at IS NOT NULL AND claimed_at IS NULL")),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), index=True)
    item_ids: Mapped[list[str]] = mapped_column(JSONType)
    queue: Mapped[str] = mapped_column(String(50), default="generate")
    created_at: Mapped[datetime] = created_at()
    dispatched_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    sends: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class BrandRules(Base):
    """One version of a team's brand rules (core/brand.py): rows are only added, never changed."""
    __tablename__ = "brand_rules"
    __table_args__ = (UniqueConstraint("team", "version", name="uq_brand_rules_team_version"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    team: Mapped[str] = mapped_column(String(100))
    version: Mapped[int] = mapped_column(Integer)
    rules: Mapped[dict[str, Any]] = mapped_column(JSONType)
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = created_at()


class TeamSettings(Base):
    """A team's overrides of the quota defaults (NULL: the setting's default) and its webhook
    endpoint and signing secret (docs/quotas.md, docs/webhooks.md). The secret is kept in clear:
    an HMAC needs it, unlike an API key, which is only compared."""
    __tablename__ = "team_settings"

    team: Mapped[str] = mapped_column(String(100), primary_key=True)
    max_queued_images: Mapped[int | None] = mapped_column(Integer)
    submissions_per_minute: Mapped[int | None] = mapped_column(Integer)
    webhook_url: Mapped[str | None] = mapped_column(String(2000))
    webhook_secret: Mapped[str | None] = mapped_column(String(100))
    # The secret before the last rotation still signs (a second signature) for a grace period.
    previous_webhook_secret: Mapped[str | None] = mapped_column(String(100))
    webhook_secret_rotated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The model the team's batches use when they name none (a promoted canary's candidate); None: the registry's.
    default_model: Mapped[str | None] = mapped_column(String(200))
    updated_at: Mapped[datetime] = created_at()


class Canary(Base):
    """A team's canary: ``fraction`` of its batches' items go to the candidate ``model`` instead of
    ``base_model`` until an admin promotes or rolls it back (core/canary.py, docs/models.md)."""
    __tablename__ = "canaries"
    __table_args__ = (
        Index("ix_canaries_one_active_per_team", "team", unique=True,
              postgresql_where=text("state = 'active'"), sqlite_where=text("state = 'active'")),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    team: Mapped[str] = mapped_column(String(100), index=True)
    model: Mapped[str] = mapped_column(String(200))
    base_model: Mapped[str] = mapped_column(String(200))
    fraction: Mapped[float] = mapped_column(Float)
    state: Mapped[str] = mapped_column(String(16), default="active")
    started_by: Mapped[str] = mapped_column(String(200))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    ended_by: Mapped[str | None] = mapped_column(String(200))
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class WebhookDelivery(Base):
    """One event for one endpoint, written in the event's transaction and sent by the maintenance
    task with backoff (core/webhooks.py). ``id`` is the Standard Webhooks ``webhook-id``."""
    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),)

    id: Mapped[str] = uuid_pk()
    team: Mapped[str] = mapped_column(String(100), index=True)
    batch_id: Mapped[str | None] = mapped_column(String(UUID_LEN), index=True)
    event: Mapped[str] = mapped_column(String(50))
    url: Mapped[str] = mapped_column(String(2000))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONType)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = created_at()
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
