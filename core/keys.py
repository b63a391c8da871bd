"""API keys and the principals they authenticate, shared by the API and the CLI.

A key is ``ib_`` + 43 url-safe characters, shown once when created; the ledger keeps only its
sha256 (a fast hash is enough: the key carries 256 bits of randomness, nothing to brute-force).
Creating and revoking a key each write an audit event in the caller's transaction.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from core import audit
from core.settings import Settings, get_settings
from models import ApiKey, Role, utcnow
from models.base import new_id

KEY_PREFIX = "ib_"
SHOWN_PREFIX_CHARS = 11  # "ib_" + 8 characters: enough to tell keys apart in a listing
BOOTSTRAP_TEAM = "admin"
MAX_NAME_CHARS = 200
MAX_TEAM_CHARS = 100


class UnknownKey(LookupError):
    """No such key (by id or shown prefix)."""


class InvalidKeySpec(ValueError):
    """A role, team or name that a key cannot have."""


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's identity, role and team."""

    key_id: str | None  # None for the bootstrap admin key, which has no row
    name: str
    role: Role
    team: str

    @property
    def actor(self) -> str:
        """How the audit trail names this caller."""
        return f"key:{self.key_id}" if self.key_id else "bootstrap-admin"

    @property
    def sees_all_teams(self) -> bool:
        # Reviewers, auditors and admins read every team's batches; submitters only their own.
        return self.role != Role.SUBMITTER

    def can_see_team(self, team: str) -> bool:
        return self.sees_all_teams or team == self.team


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode("utf-8", "surrogatepass")).hexdigest()


def generate_plaintext() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def create_key(session: Session, name: str, role: Role | str, team: str, *, actor: str = "system") -> tuple[ApiKey, str]:
    """Create a key; returns the row and the plaintext, which is never stored. The caller commits."""
    role = _check_spec(name, role, team)
    plaintext = generate_plaintext()
    key = ApiKey(
        id=new_id(), name=name, prefix=plaintext[:SHOWN_PREFIX_CHARS], key_hash=hash_key(plaintext),
        role=role.value, team=team, created_at=utcnow(),
    )
    session.add(key)
    session.flush()
    audit.record(
        session, "key.created", actor=actor,
        payload={"key_id": key.id, "name": name, "role": role.value, "team": team, "prefix": key.prefix},
    )
    return key, plaintext


def _check_spec(name: str, role: Role | str, team: str) -> Role:
    try:
        role = Role(role)
    except ValueError:
        raise InvalidKeySpec(f"unknown role {role!r}; one of: {', '.join(r.value for r in Role)}") from None
    if not name.strip() or len(name) > MAX_NAME_CHARS:
        raise InvalidKeySpec(f"a key name needs 1 to {MAX_NAME_CHARS} characters")
    if not team.strip() or len(team) > MAX_TEAM_CHARS:
        raise InvalidKeySpec(f"a team needs 1 to {MAX_TEAM_CHARS} characters")
    return role


def find_key(session: Session, id_or_prefix: str) -> ApiKey:
    """A key by its id or by the prefix shown on creation (``ib_xxxxxxxx``)."""
    key = session.scalar(select(ApiKey).where(or_(ApiKey.id == id_or_prefix, ApiKey.prefix == id_or_prefix)))
    if key is None:
        raise UnknownKey(f"no API key {id_or_prefix!r}")
    return key


def revoke_key(session: Session, id_or_prefix: str, *, actor: str = "system") -> ApiKey:
    """Revoke a key (idempotent: a revoked key stays revoked, with no second event). The caller commits."""
    key = find_key(session, id_or_prefix)
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        audit.record(
            session, "key.revoked", actor=actor,
            payload={"key_id": key.id, "name": key.name, "role": key.role, "team": key.team, "prefix": key.prefix},
        )
    return key


def list_keys(session: Session, include_revoked: bool = False) -> list[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if not include_revoked:
        query = query.where(ApiKey.revoked_at.is_(None))
    return list(session.scalars(query))


def lookup(session: Session, plaintext: str) -> ApiKey | None:
    """The non-revoked key with this plaintext, or None."""
    if not plaintext.startswith(KEY_PREFIX):
        return None
    return session.scalar(
        select(ApiKey).where(ApiKey.key_hash == hash_key(plaintext), ApiKey.revoked_at.is_(None))
    )


def is_bootstrap_admin(plaintext: str, settings: Settings | None = None) -> bool:
    """True when ``plaintext`` is INSTABATCH_ADMIN_KEY (compared as sha256, in constant time)."""
    configured = (settings or get_settings()).bootstrap_admin_key
    if not configured:
        return False
    return hmac.compare_digest(hash_key(plaintext), hash_key(configured))


def authenticate(session: Session, plaintext: str, settings: Settings | None = None) -> Principal | None:
    """The principal a bearer key stands for, or None when the key is unknown or revoked."""
    if is_bootstrap_admin(plaintext, settings):
        return Principal(key_id=None, name="bootstrap admin", role=Role.ADMIN, team=BOOTSTRAP_TEAM)
    key = lookup(session, plaintext)
    if key is None:
        return None
    return Principal(key_id=key.id, name=key.name, role=Role(key.role), team=key.team)
