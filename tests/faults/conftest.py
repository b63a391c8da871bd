"""Fixtures and reporting of the fault suite (see tests/faults/__init__.py).

``INSTABATCH_FAULTS=full`` (``make faults``) runs every scenario; unset (``make test``) runs the
short form (the ``faults_short`` scenarios on small batches); ``off`` skips them all.
"""
from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults import runner
from tests.faults.services import kill_everything, missing_prerequisites
from tests.faults.stack import FaultStack, Infra

_ROOT: dict[str, Path] = {}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mode = runner.mode()
    missing = missing_prerequisites()
    for item in items:
        if item.get_closest_marker("faults") is None:
            continue
        if missing:
            item.add_marker(pytest.mark.skip(reason=f"fault suite cannot run here: {missing}"))
        elif mode == "off":
            item.add_marker(pytest.mark.skip(reason="INSTABATCH_FAULTS=off"))
        elif mode != "full" and item.get_closest_marker("faults_short") is None:
            item.add_marker(pytest.mark.skip(reason="full fault scenario: run `make faults` (INSTABATCH_FAULTS=full)"))


@pytest.fixture(scope="session")
def faults_infra() -> Iterator[Infra]:
    root = Path(tempfile.mkdtemp(prefix="instabatch-faults-"))
    _ROOT["root"] = root
    infra = Infra(root)
    try:
        yield infra
    finally:
        infra.close()
        kill_everything()
        if runner.RESULTS and all(result.ok for result in runner.RESULTS):
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def fault_stack(faults_infra: Infra, request: pytest.FixtureRequest) -> Iterator[FaultStack]:
    """A fresh stack (database, Redis, bucket, S3 proxy, API, beat) for one scenario; workers are the scenario's."""
    name = request.node.name.removeprefix("test_")
    stack = FaultStack(faults_infra, faults_infra.root / name, name)
    try:
        stack.start_beat()
        stack.start_api()
        stack.create_keys()
        yield stack
    finally:
        stack.close()


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ARG001
    if not runner.RESULTS:
        return
    terminalreporter.section("fault scenarios")
    for result in runner.RESULTS:
        terminalreporter.write_line(result.line())
        if result.diagnosis:
            terminalreporter.write_line(f"  diagnosis: {result.diagnosis}")
    terminalreporter.write_line(runner.summary_line(runner.RESULTS))
    root = _ROOT.get("root")
    if root is not None and root.exists():
        terminalreporter.write_line(f"fault suite logs kept in {root}")
