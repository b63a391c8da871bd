"""Bounded dispatch and regeneration attempts.

outbox.claimed_at / outbox.sends: a chunk in flight (sent, not yet claimed) can be told from one
that a worker took, so the dispatcher keeps a bounded number in flight and sends again one whose
message the broker lost. reviews.regeneration_*: a reviewer's regenerate counts its attempts and
its last send, so it is re-sent only when stale and ends visibly after MAX_ATTEMPTS.

Revision ID: 0004
Revises: 0003
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

IN_FLIGHT = sa.text("dispatched_at IS NOT NULL AND claimed_at IS NULL")


def upgrade() -> None:
    op.add_column("outbox", sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("outbox", sa.Column("sends", sa.Integer(), nullable=False, server_default="0"))
    op.create_index("ix_outbox_in_flight", "outbox", ["queue", "dispatched_at"],
                    postgresql_where=IN_FLIGHT, sqlite_where=IN_FLIGHT)
    op.add_column("reviews", sa.Column("regeneration_attempts", sa.Integer(), nullable=False, server_default="0"))
    op.add_column("reviews", sa.Column("regeneration_sent_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("reviews", sa.Column("regeneration_error", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("reviews") as batch:
        batch.drop_column("regeneration_error")
        batch.drop_column("regeneration_sent_at")
        batch.drop_column("regeneration_attempts")
    op.drop_index("ix_outbox_in_flight", table_name="outbox")
    with op.batch_alter_table("outbox") as batch:
        batch.drop_column("sends")
        batch.drop_column("claimed_at")
