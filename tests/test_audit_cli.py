"""``instabatch audit verify|export|anchor``: RESULT lines, exit statuses, anchors, offline verify."""
from __future__ import annotations

import csv
import io
import json

import pytest
import typer
from typer.testing import CliRunner

from cli.audit import audit_app
from tests.audit_support import (  # noqa: F401
    as_attacker, fresh_pg_url, ledger, pg_template, rehash_from, write_events,
)

EVENTS = 12


def cli() -> typer.Typer:
    app = typer.Typer()
    app.add_typer(audit_app, name="audit")
    app.command("noop", hidden=True)(lambda: None)  # two commands, so "audit" stays a group
    return app


def run(*args: str):
    return CliRunner().invoke(cli(), ["audit", *args])


@pytest.fixture
def chain(configure, ledger):
    configure(DATABASE_URL=ledger.url.render_as_string(hide_password=False))
    write_events(ledger, EVENTS)
    return ledger


def result_line(output: str) -> str:
    return next(line for line in output.splitlines() if line.startswith("RESULT"))


def test_verify_prints_result_and_exits_0_when_intact(chain):
    result = run("verify")
    assert result.exit_code == 0, result.output
    line = result_line(result.stdout)
    assert line.startswith(f"RESULT ok=true events={EVENTS} head=") and len(line.split("head=")[1].split()[0]) == 64


def test_verify_prints_problems_and_exits_1_when_tampered(chain):
    as_attacker(chain, "DELETE FROM audit_events WHERE seq = 4",
                """UPDATE audit_events SET payload = '{"n": 1}' WHERE seq = 9""")
    result = run("verify")
    assert result.exit_code == 1
    assert "PROBLEM seq=4 kind=deleted" in result.stdout and "PROBLEM seq=9 kind=edited" in result.stdout
    assert result_line(result.stdout).startswith(f"RESULT ok=false events={EVENTS - 1} ")


def test_anchor_then_a_rewritten_chain_fails_verify(chain):
    first = run("anchor")
    assert first.exit_code == 0 and f"RESULT anchored=true created=true seq={EVENTS} " in first.stdout
    assert "created=false" in run("anchor").stdout
    as_attacker(chain, """UPDATE audit_events SET payload = '{"n": 5}' WHERE seq = 2""", lambda c: rehash_from(c, 2))
    assert run("verify", "--no-anchors").exit_code == 0
    result = run("verify")
    assert result.exit_code == 1 and f"PROBLEM seq={EVENTS} kind=anchor_mismatch" in result.stdout


def test_anchor_refuses_a_chain_broken_since_the_last_anchor(chain):
    run("anchor")
    write_events(chain, 3)
    as_attacker(chain, f"DELETE FROM audit_events WHERE seq = {EVENTS + 1}")
    result = run("anchor")
    assert result.exit_code == 1 and "RESULT anchored=false" in result.stdout


def test_export_to_a_file_is_audited_and_verifies_offline(chain, tmp_path):
    out = tmp_path / "audit.jsonl"
    result = run("export", "--format", "jsonl", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert f"through_seq={EVENTS + 1}" in result.stdout
    events = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(events) == EVENTS + 1 and events[-1]["action"] == "audit.exported"
    assert events[-1]["actor"].startswith("cli:")
    assert run("verify", "--file", str(out), "--no-anchors").exit_code == 0

    out.write_text(out.read_text().replace('"n": 3', '"n": 4'))
    tampered = run("verify", "--file", str(out), "--no-anchors")
    assert tampered.exit_code == 1 and "PROBLEM seq=4 kind=edited" in tampered.stdout


def test_export_csv_to_stdout_with_a_filter(chain):
    result = run("export", "--format", "csv", "--action", "probe", "--since", "2000-01-01T00:00:00")
    assert result.exit_code == 0
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [int(row["seq"]) for row in rows] == list(range(1, EVENTS + 1))
    assert "RESULT exported=true format=csv" in result.stderr


def test_export_json_is_one_array(chain, tmp_path):
    out = tmp_path / "audit.json"
    assert run("export", "-f", "json", "-o", str(out)).exit_code == 0
    events = json.loads(out.read_text())
    assert [e["seq"] for e in events] == list(range(1, EVENTS + 2))
