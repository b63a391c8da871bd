"""Helpers for tests that drive the API: a client with a key per role, sample bodies, row counts.

Used by ``tests/test_api*.py`` and open to the other routers' tests (audit, review)::

    harness = ApiHarness.start(team="mkt")      # settings must point at a migrated ledger already
    harness.post("submitter", "/v1/batches", json=sample_batch(3))
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import func, select

from api.main import create_app
from core import keys
from core.db import session_scope
from models import AuditEvent, Batch, Item, Outbox, Role

# Who can call: one key per role, a submitter of another team, and a revoked key.
PRINCIPALS = ("submitter", "other_team", "reviewer", "auditor", "admin", "revoked")


def create_role_keys(team: str, other_team: str) -> dict[str, str]:
    """Plaintext keys by principal name (see PRINCIPALS), written to the configured ledger."""
    specs = {
        "submitter": (Role.SUBMITTER, team), "other_team": (Role.SUBMITTER, other_team),
        "reviewer": (Role.REVIEWER, "qa"), "auditor": (Role.AUDITOR, "compliance"),
        "admin": (Role.ADMIN, "ops"), "revoked": (Role.SUBMITTER, team),
    }
    plaintexts: dict[str, str] = {}
    with session_scope() as session:
        for name, (role, key_team) in specs.items():
            key, plaintexts[name] = keys.create_key(session, f"test {name}", role, key_team, actor="test")
            if name == "revoked":
                keys.revoke_key(session, key.id, actor="test")
    return plaintexts


@dataclass
class ApiHarness:
    client: TestClient
    team: str
    other_team: str
    keys: dict[str, str] = field(default_factory=dict)

    @classmethod
    def start(cls, team: str | None = None, raise_server_exceptions: bool = True) -> "ApiHarness":
        team = team or f"team-{uuid.uuid4().hex[:8]}"
        other_team = f"{team}-other"
        client = TestClient(create_app(), raise_server_exceptions=raise_server_exceptions)
        return cls(client=client, team=team, other_team=other_team, keys=create_role_keys(team, other_team))

    def headers(self, who: str | None, **extra: str) -> dict[str, str]:
        auth = {"Authorization": f"Bearer {self.keys[who]}"} if who else {}
        return {**auth, **extra}

    def request(self, who: str | None, method: str, path: str, headers: dict[str, str] | None = None, **kwargs: Any):
        return self.client.request(method, path, headers=self.headers(who, **(headers or {})), **kwargs)

    def get(self, who: str | None, path: str, **kwargs: Any):
        return self.request(who, "GET", path, **kwargs)

    def post(self, who: str | None, path: str, **kwargs: Any):
        return self.request(who, "POST", path, **kwargs)

    def submit(self, who: str = "submitter", body: dict[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
        """Submit a batch and return it; fails loudly unless accepted."""
        response = self.post(who, "/v1/batches", json=body or sample_batch(), **kwargs)
        assert response.status_code in (200, 202), response.text
        return response.json()


def sample_batch(n: int = 3, name: str = "spring catalogue", **overrides: Any) -> dict[str, Any]:
    items = [{"prompt": f"a ceramic mug, product photo, variant {i}", "external_id": f"sku-{i}", "seed": i}
             for i in range(n)]
    return {"name": name, "items": items, **overrides}


def ledger_rows() -> dict[str, int]:
    """Row counts of the tables a submission writes: bad requests must leave them unchanged."""
    with session_scope() as session:
        return {
            table.__tablename__: session.scalar(select(func.count()).select_from(table))
            for table in (Batch, Item, Outbox, AuditEvent)
        }
