"""docs/grafana-dashboard.json: valid JSON, every panel queries series the product exports, by labels they have."""
from __future__ import annotations

import json
import re

import pytest

from prometheus_client import REGISTRY as PROCESS_REGISTRY

from api.metrics import REGISTRY
from core.settings import REPO_ROOT
from worker import metrics as worker_metrics  # noqa: F401  (registers the worker's series)

DASHBOARD = REPO_ROOT / "docs" / "grafana-dashboard.json"
# name -> (type, labels), checked below against what api/metrics.py and worker/metrics.py export.
SERIES = {
    "instabatch_stage_seconds": ("histogram", {"stage"}),
    "instabatch_images_total": ("counter", {"model", "verdict"}),
    "instabatch_item_failures_total": ("counter", {"reason"}),
    "instabatch_model_load_seconds": ("gauge", set()),
    "instabatch_gpu_memory_bytes": ("gauge", set()),
    "instabatch_queue_depth": ("gauge", {"queue"}),
    "instabatch_items": ("gauge", {"state"}),
    "instabatch_http_requests_total": ("counter", {"method", "route", "status"}),
    "instabatch_http_request_duration_seconds": ("histogram", {"method", "route"}),
    "instabatch_batches_submitted_total": ("counter", {"priority"}),
    "instabatch_outbox_publish_failures_total": ("counter", set()),
}
# Created only where CUDA is initialised (worker/metrics.py), so absent from a CPU process.
PENDING = {"instabatch_gpu_memory_bytes"}
TARGET_LABELS = {"instance", "job"}  # added by Prometheus to every scraped series
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def series_of(expr: str) -> set[str]:
    """The series an expression reads: histogram parts (_bucket, _sum, _count) map to their histogram."""
    names = set()
    for name in re.findall(r"\binstabatch_[a-z0-9_]+", expr):
        base = next((name[: -len(s)] for s in HISTOGRAM_SUFFIXES
                     if name.endswith(s) and SERIES.get(name[: -len(s)], ("",))[0] == "histogram"), name)
        names.add(base)
    return names


def grouping_labels(expr: str) -> set[str]:
    return {label.strip() for group in re.findall(r"\bby \(([^)]*)\)", expr) for label in group.split(",")}


def test_every_panel_queries_known_series_by_their_labels(dashboard):
    assert dashboard["title"] and dashboard["uid"] and dashboard["panels"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(set(ids)) == len(ids)
    seen = set()
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = series_of(target["expr"])
            assert names, f"{panel['title']}: no instabatch series in {target['expr']}"
            unknown = names - set(SERIES)
            assert not unknown, f"{panel['title']}: unknown series {unknown}"
            labels = set().union(*(SERIES[name][1] for name in names)) | TARGET_LABELS | {"le"}
            assert grouping_labels(target["expr"]) <= labels, f"{panel['title']}: grouped by a label it lacks"
            for legend in re.findall(r"\{\{(\w+)\}\}", target.get("legendFormat", "")):
                assert legend in labels, f"{panel['title']}: legend {legend} is not a label"
            seen |= names
    assert seen == set(SERIES), f"series without a panel: {set(SERIES) - seen}"


def test_the_series_it_names_are_the_ones_the_api_and_the_worker_export():
    exported = set()
    for metric in [*REGISTRY.collect(), *PROCESS_REGISTRY.collect()]:
        kind = metric.type
        exported.add(metric.name + "_total" if kind == "counter" else metric.name)
    for name in set(SERIES) - PENDING:
        assert name in exported, f"{name} is exported by neither api/metrics.py nor worker/metrics.py"
