"""Run the Alembic migrations from code (``instabatch db upgrade``, test fixtures, embedded start)."""
from __future__ import annotations

from alembic import command
from alembic.config import Config

from core.db import normalize_url
from core.settings import REPO_ROOT, get_settings


def alembic_config(database_url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(REPO_ROOT / "migrations"))
    config.attributes["database_url"] = normalize_url(database_url or get_settings().database_url)
    return config


def upgrade(database_url: str | None = None, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str | None = None, revision: str = "base") -> None:
    command.downgrade(alembic_config(database_url), revision)
