"""A partial index for the QA queue: undecided review images in (created_at, id) order

Measured by the review work: with 20,000 flagged among 100,000 images on PostgreSQL a queue
page took 12.7 ms (a sort over the verdict index) and 3.7 ms with this index.

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

AWAITING_REVIEW = sa.text("qc_verdict = 'review' AND review_status IS NULL")


def upgrade() -> None:
    op.create_index("ix_images_awaiting_review", "images", ["created_at", "id"],
                    postgresql_where=AWAITING_REVIEW, sqlite_where=AWAITING_REVIEW)


def downgrade() -> None:
    op.drop_index("ix_images_awaiting_review", table_name="images")
