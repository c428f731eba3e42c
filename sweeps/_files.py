"""The files poisonsweep keeps in Tune's storage (``storage.path``): a launch's folder holds the
launch file; a trial's final checkpoint holds its poison plan, final metrics and resolved config.

The trainable writes them, the mirror (``poisonsweep sync``) and the driver read them.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

#: A launch's folder: what ``run --resume`` and ``sync`` need to find its parent run and study.
LAUNCH_FILE = "poisonsweep.json"
#: A trial's final checkpoint: its poison plan, final metrics and resolved config.
PLAN_FILE, METRICS_FILE, CONFIG_FILE = "poison_plan.parquet", "metrics.json", "trial_config.yaml"
#: The key, in a trial's result at a rung's epoch (and so in its ``result.json``), of the early-stopping
#: scheduler's decision there: ``{"epoch", "decision" (promoted|stopped), "place", "of", "kept", ...}``.
DECISION_KEY = "rung_decision"

#: The key, in a trial's epoch result, of all the epoch's metrics as JSON text (see :func:`epoch_result`).
EPOCH_REPORT = "epoch_report"


def epoch_result(metrics: dict[str, Any], kept: Sequence[str] | None) -> dict[str, Any]:
    """A trial's epoch report to Tune: ``epoch_metrics`` holds the epoch and the ``kept`` metrics
    (the ones Tune's scheduler and searcher compare: objectives, rung metrics, constraints), and
    :data:`EPOCH_REPORT` all of them as JSON text, which Tune keeps in ``result.json`` but
    computes no statistics of. Tune keeps running statistics of every number a trial reports in
    its experiment state, which it rewrites whole at every save: per trial, they were most of
    that state, whose saves grew with the sweep (``docs/performance.md``). ``kept`` None: every
    metric is a number to Tune."""
    if kept is None:
        return {"epoch_metrics": metrics}
    numbers = {k: metrics[k] for k in ("epoch", *kept) if k in metrics}
    return {"epoch_metrics": numbers, EPOCH_REPORT: json.dumps(metrics)}


def final_result(metrics: dict[str, Any], kept: Sequence[str] | None) -> dict[str, Any]:
    """A trial's final report to Tune: the ``kept`` metrics (every one with ``kept`` None); all of
    them are in the final checkpoint's :data:`METRICS_FILE`, where the driver reads them."""
    return dict(metrics) if kept is None else {k: metrics[k] for k in kept if k in metrics}


def reported_epoch(result: dict[str, Any]) -> dict[str, Any] | None:
    """All of an epoch's metrics from a trial's result (a live one or a ``result.json`` row), or
    None for a result that is no epoch's; a launch's older rows hold them in ``epoch_metrics``."""
    if not isinstance(result, dict) or not result.get("epoch_metrics"):
        return None
    text = result.get(EPOCH_REPORT)
    return json.loads(text) if isinstance(text, str) else result["epoch_metrics"]
