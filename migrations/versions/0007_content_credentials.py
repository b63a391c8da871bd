"""Content Credentials: each image's watermark id (indexed: verification finds the row from the
pixels alone) and its credential state (signer, manifest, watermark embedded or skipped and why).

Revision ID: 0007
Revises: 0006
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("images", sa.Column("watermark_id", sa.String(length=16), nullable=True))
    op.add_column("images", sa.Column("credentials", JSON, nullable=True))
    op.create_index("ix_images_watermark_id", "images", ["watermark_id"])


def downgrade() -> None:
    op.drop_index("ix_images_watermark_id", table_name="images")
    with op.batch_alter_table("images") as batch:
        batch.drop_column("credentials")
        batch.drop_column("watermark_id")
