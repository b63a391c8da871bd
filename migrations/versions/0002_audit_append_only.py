"""audit_events is append-only: triggers refuse UPDATE and DELETE (and TRUNCATE on PostgreSQL)

The hash chain makes changes detectable; these triggers make them refused in the first place for
anyone without DDL rights on the table (run the services under a role that does not own it).
SQLite gets the same refusal through RAISE(ABORT). A later migration that rebuilds
audit_events in batch mode on SQLite (copy and rename) drops these triggers: recreate them there.

Revision ID: 0002
Revises: 0001
"""
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

MESSAGE = "audit_events is append-only"

POSTGRES_UP = [
    f"""
    CREATE OR REPLACE FUNCTION audit_events_refuse_change() RETURNS trigger
    LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION '{MESSAGE}: % refused', TG_OP USING ERRCODE = 'insufficient_privilege';
    END
    $$
    """,
    """
    CREATE TRIGGER audit_events_append_only
    BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_refuse_change()
    """,
    """
    CREATE TRIGGER audit_events_no_truncate
    BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_refuse_change()
    """,
]
POSTGRES_DOWN = [
    "DROP TRIGGER IF EXISTS audit_events_no_truncate ON audit_events",
    "DROP TRIGGER IF EXISTS audit_events_append_only ON audit_events",
    "DROP FUNCTION IF EXISTS audit_events_refuse_change()",
]
SQLITE_UP = [
    f"""
    CREATE TRIGGER audit_events_no_{operation.lower()}
    BEFORE {operation} ON audit_events
    BEGIN SELECT RAISE(ABORT, '{MESSAGE}: {operation} refused'); END
    """
    for operation in ("UPDATE", "DELETE")
]
SQLITE_DOWN = ["DROP TRIGGER IF EXISTS audit_events_no_update", "DROP TRIGGER IF EXISTS audit_events_no_delete"]


def _run(statements: list[str]) -> None:
    for statement in statements:
        op.execute(statement)


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    _run(POSTGRES_UP if dialect == "postgresql" else SQLITE_UP if dialect == "sqlite" else [])


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    _run(POSTGRES_DOWN if dialect == "postgresql" else SQLITE_DOWN if dialect == "sqlite" else [])
