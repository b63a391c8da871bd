"""Brand rules per team, versioned; the version a batch was made under.

brand_rules: one row per version of a team's rules (core/brand.py), added and never changed.
batches.brand_rules_version: which version a batch was submitted under (NULL: none).

Revision ID: 0006
Revises: 0005
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

JSON_TYPE = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
BIGINT_PK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "brand_rules",
        sa.Column("id", BIGINT_PK, autoincrement=True, nullable=False),
        sa.Column("team", sa.String(100), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("rules", JSON_TYPE, nullable=False),
        sa.Column("created_by", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_brand_rules"),
        sa.UniqueConstraint("team", "version", name="uq_brand_rules_team_version"),
    )
    op.add_column("batches", sa.Column("brand_rules_version", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("brand_rules_version")
    op.drop_table("brand_rules")
