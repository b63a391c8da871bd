"""pHash bands: the duplicate check as an indexed query.

image_phash_bands holds each image's luma pHash as four 16-bit bands; a near duplicate (at most 3
luma bits apart) shares one band exactly, so a worker looks up candidates by (batch_id, band,
value) instead of loading every pHash of the batch per task (docs/architecture.md, "Cheap records").
Existing images are backfilled from images.phash.

Revision ID: 0008
Revises: 0007
"""
import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

BACKFILL_ROWS = 5_000


def upgrade() -> None:
    bands = op.create_table(
        "image_phash_bands",
        sa.Column("image_id", sa.String(36), nullable=False),
        sa.Column("band", sa.Integer(), nullable=False),
        sa.Column("batch_id", sa.String(36), nullable=False),
        sa.Column("value", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"], name=op.f("fk_image_phash_bands_image_id_images"),
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["batch_id"], ["batches.id"], name=op.f("fk_image_phash_bands_batch_id_batches"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("image_id", "band", name=op.f("pk_image_phash_bands")),
    )
    op.create_index("ix_image_phash_bands_lookup", "image_phash_bands", ["batch_id", "band", "value"])
    _backfill(bands)


def _backfill(bands: sa.Table) -> None:
    from qc.phash import luma_bands

    connection = op.get_bind()
    images = sa.table("images", sa.column("id"), sa.column("batch_id"), sa.column("phash"))
    rows = connection.execute(sa.select(images.c.id, images.c.batch_id, images.c.phash)
                              .where(images.c.phash.is_not(None))).yield_per(BACKFILL_ROWS)
    pending = []
    for image_id, batch_id, phash in rows:
        pending += [{"image_id": image_id, "band": band, "batch_id": batch_id, "value": value}
                    for band, value in enumerate(luma_bands(int(phash, 16)))]
        if len(pending) >= BACKFILL_ROWS:
            connection.execute(bands.insert(), pending)
            pending = []
    if pending:
        connection.execute(bands.insert(), pending)


def downgrade() -> None:
    op.drop_index("ix_image_phash_bands_lookup", table_name="image_phash_bands")
    op.drop_table("image_phash_bands")
