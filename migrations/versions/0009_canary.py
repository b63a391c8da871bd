"""Canary roll-out: a team's candidate model for a fraction of its items, and its default model.

canaries: one row per canary a team ran (core/canary.py): the candidate, the model it was compared
with, the fraction of items it gets, who started and ended it and how (active, promoted,
rolled_back); at most one active per team (a partial unique index).
team_settings.default_model: the model a team's batches use when they name none (set by a promote).
items.model: the model an item runs with when it is not the batch's params.model (NULL: the batch's).
batches.canary: the canary a batch was submitted under (model, fraction, the candidate's params).

Revision ID: 0009
Revises: 0008
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

JSON_TYPE = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
BIGINT_PK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
ACTIVE = sa.text("state = 'active'")


def upgrade() -> None:
    op.create_table(
        "canaries",
        sa.Column("id", BIGINT_PK, autoincrement=True, nullable=False),
        sa.Column("team", sa.String(100), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("base_model", sa.String(200), nullable=False),
        sa.Column("fraction", sa.Float(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("started_by", sa.String(200), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_by", sa.String(200), nullable=True),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_canaries"),
    )
    op.create_index("ix_canaries_team", "canaries", ["team"])
    op.create_index("ix_canaries_one_active_per_team", "canaries", ["team"], unique=True,
                    postgresql_where=ACTIVE, sqlite_where=ACTIVE)
    op.add_column("team_settings", sa.Column("default_model", sa.String(200), nullable=True))
    op.add_column("items", sa.Column("model", sa.String(200), nullable=True))
    op.add_column("batches", sa.Column("canary", JSON_TYPE, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("canary")
    with op.batch_alter_table("items") as items:
        items.drop_column("model")
    with op.batch_alter_table("team_settings") as settings:
        settings.drop_column("default_model")
    op.drop_index("ix_canaries_one_active_per_team", table_name="canaries")
    op.drop_index("ix_canaries_team", table_name="canaries")
    op.drop_table("canaries")
