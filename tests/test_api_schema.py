"""Bad input by a tool nobody here wrote: schemathesis against the live OpenAPI schema (issue 10).

``instabatch serve`` runs in its own process on this session's PostgreSQL database and Redis db,
and schemathesis generates requests for every operation in /openapi.json, valid and invalid,
with an admin key (every route is reachable). Every check of schemathesis applies: no 5xx, each
status code declared by its operation, each body and header conforming to its declared schema,
bad input rejected with a 4xx. Bounded by SCHEMA_MAX_EXAMPLES per operation (about 20 s on a
loaded two-core machine); ``INSTABATCH_SCHEMA_EXAMPLES=200`` draws a deeper, random run.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from api.main import create_app
from bench.load import api_server, fresh_database
from core import keys
from core.db import normalize_url
from models import Role
from tests.fixtures.services import PG_ADMIN_URL

DEEPER_RUN = os.environ.get("INSTABATCH_SCHEMA_EXAMPLES")
SCHEMA_MAX_EXAMPLES = int(DEEPER_RUN or "12")


def create_admin_key(database_url: str) -> str:
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    engine = create_engine(normalize_url(database_url))
    try:
        with Session(engine) as session:
            _key, plaintext = keys.create_key(session, "schemathesis", Role.ADMIN, "schema", actor="test")
            session.commit()
    finally:
        engine.dispose()
    return plaintext


@pytest.fixture(scope="module")
def live_api(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path]]:
    """(url, admin key, log file) of one real API process on a database of its own: the batches
    schemathesis submits stay out of the session's ledger."""
    workdir = tmp_path_factory.mktemp("schema-api")
    with fresh_database(PG_ADMIN_URL) as database_url:
        key = create_admin_key(database_url)
        try:
            with api_server(database_url, redis_url, workdir) as (url, _process, log_path):
                yield url, key, log_path
        finally:
            redis.Redis.from_url(redis_url).flushdb()  # no worker runs: drop the chunks the API published


# The operations come from the schema the app builds (pytest collects them before any server runs;
# schemathesis' lazy fixture loader does not work with this pytest); the first test proves the live
# server serves exactly that schema, so the cases below are the live schema's.
APP_SCHEMA = create_app().openapi()
schema = schemathesis.openapi.from_dict(APP_SCHEMA)
# JSON Lines uploads are text, as CSV ones are; schemathesis only knows text/* as text.
schemathesis.serializer.alias("application/x-ndjson", "text/plain")

# Operations whose upload must be a decodable image, which JSON Schema cannot state (a generated
# body is random bytes, or schemathesis' 1x1 grey PNG, too small and without alpha for a logo):
# tests/test_catalogue.py and tests/test_credentials.py upload real ones.
IMAGE_UPLOADS = {"PUT /v1/teams/{team}/logo", "POST /v1/verify"}


def test_the_live_server_serves_the_schema_under_test(live_api) -> None:
    url, _key, _log = live_api
    assert httpx.get(f"{url}/openapi.json", timeout=30).json() == APP_SCHEMA


@schema.parametrize()
# The suite's run is derandomized (the same cases every time: a failure is a change, not luck);
# a deeper run with INSTABATCH_SCHEMA_EXAMPLES draws fresh cases each time.
@settings(max_examples=SCHEMA_MAX_EXAMPLES, deadline=None, derandomize=DEEPER_RUN is None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
def test_live_api_conforms_to_its_schema(case, live_api) -> None:
    url, key, _log = live_api
    # A cursor is opaque: only one a listing handed out is valid, which no schema can say, so a
    # made-up one is rightly a 422 (tested in tests/test_api.py) and not "valid data rejected".
    made_up_cursor = bool((case.query or {}).get("cursor"))
    # A CSV upload's schema is "a string" (its columns and its required ?name= are described in
    # words, which OpenAPI cannot tie to one media type), so a generated one is rarely a batch.
    csv_upload = case.media_type in ("text/csv", "application/x-ndjson")
    # A catalogue's rules tie fields to each other and to the rows' columns (one of rows or
    # catalogue_csv, one of external_id or its column, the template's variables among the columns),
    # which JSON Schema cannot state; tests/test_catalogue.py holds each of them.
    catalogue = isinstance(case.body, dict) and "template" in case.body
    image_upload = case.operation.label in IMAGE_UPLOADS
    # Brand rules may name only a logo uploaded before (its sha256 stored), which no schema can say.
    names_a_logo = (case.operation.label == "PUT /v1/teams/{team}/brand-rules" and isinstance(case.body, dict)
                    and case.body.get("logo") is not None)
    # A canary's model must differ from the batch's (or the team's default) model, and a team has one
    # canary at a time: rules over other fields and the team's state (tests/test_canary.py holds them).
    canary = (isinstance(case.body, dict) and case.body.get("canary") is not None) or \
        case.operation.label == "PUT /v1/teams/{team}/canary"
    waived = made_up_cursor or csv_upload or catalogue or image_upload or names_a_logo or canary
    excluded = [positive_data_acceptance] if waived else None
    case.call_and_validate(base_url=url, headers={"Authorization": f"Bearer {key}"}, excluded_checks=excluded)
