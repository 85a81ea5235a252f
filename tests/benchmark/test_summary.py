"""The summary files of a fixed results table, checked against values worked out by hand."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest

from mpmae.benchmark.summary import RESULT_COLUMNS, summary_rows, told_apart, write_summary
from mpmae.config import BenchmarkConfig

#: Test metrics by task, encoder and seed: the two-task table of tests/evaluation/test_statistics.py.
SCORES = {"m-so2sat": {"A": [0.6, 0.8], "B": [0.7, 1.0]}, "m-cashew-plant": {"A": [0.3, 0.3], "B": [0.1, 0.5]}}
METRICS = {"m-so2sat": "accuracy", "m-cashew-plant": "mIoU"}


def _results() -> list[dict]:
    return [{"encoder": encoder, "task": task, "mode": "linear_probe", "partition": "default", "seed": seed,
             "metric": METRICS[task], "val_metric": 0.5, "test_metric": values[seed], "test_ci_low": 0.0,
             "test_ci_high": 1.0, "train_samples": 4, "val_samples": 1, "test_samples": 2, "epochs": 3,
             "seconds": 1.5, "device": "cpu"}
            for task, by_encoder in SCORES.items() for encoder, values in by_encoder.items() for seed in (0, 1)]


def test_summary_files_of_a_two_task_table(tmp_path: Path) -> None:
    """Per task the IQM of two seeds is their mean and the interval spans them; the aggregate normalises each
    task over both encoders: A 0.5 [0.25, 0.5], B 0.625 [0.125, 1.0] (worked out in test_statistics)."""
    config = BenchmarkConfig(name="hand", storage_path=str(tmp_path), encoders={"A": None, "B": None},
                             tasks=["m-so2sat", "m-cashew-plantation"], seeds=[0, 1])
    written = write_summary(config, _results())
    folder = tmp_path / "hand"
    rows = json.loads((folder / "summary.json").read_text())
    assert rows == written["summary"]
    found = {(r["encoder"], r["task"]): r for r in rows}
    assert len(rows) == 6 and {r["mode"] for r in rows} == {"linear_probe"} and {r["n"] for r in rows} == {2, 4}
    assert (found["A", "m-so2sat"]["iqm"], found["A", "m-so2sat"]["ci_low"], found["A", "m-so2sat"]["ci_high"]) == \
        pytest.approx((0.7, 0.6, 0.8))
    assert found["B", "m-cashew-plant"]["metric"] == "mIoU" and found["B", "m-cashew-plant"]["mean"] == \
        pytest.approx(0.3)
    a, b = found["A", "aggregate"], found["B", "aggregate"]
    assert (a["n"], a["iqm"], a["ci_low"], a["ci_high"]) == pytest.approx((4, 0.5, 0.25, 0.5))
    assert (b["n"], b["iqm"], b["ci_low"], b["ci_high"]) == pytest.approx((4, 0.625, 0.125, 1.0))

    markdown = (folder / "summary.md").read_text()
    assert markdown == written["markdown"]
    assert "| encoder | m-so2sat (accuracy) | m-cashew-plant (mIoU) | aggregate (normalised) |" in markdown
    assert "| A | 0.7000 [0.6000, 0.8000] | 0.3000 [0.3000, 0.3000] | 0.5000 [0.2500, 0.5000] |" in markdown
    assert "| B | 0.8500 [0.7000, 1.0000] | 0.3000 [0.1000, 0.5000] | 0.6250 [0.1250, 1.0000] |" in markdown
    assert "min-max normalised, (x - min) / (max - min)" in markdown and "over 2 seed(s) [0, 1]" in markdown

    table = list(csv.DictReader(io.StringIO((folder / "results.csv").read_text())))
    assert len(table) == 8 and tuple(table[0]) == RESULT_COLUMNS
    assert (folder / "summary.png").read_bytes().startswith(b"\x89PNG")
    assert written["paths"]["summary.md"] == str(folder / "summary.md")
    write_summary(config, _results())  # rewritten when the suite completes again


def test_one_task_has_no_aggregate(tmp_path: Path) -> None:
    config = BenchmarkConfig(name="one", storage_path=str(tmp_path), encoders={"A": None, "B": None},
                             tasks=["m-so2sat"], seeds=[0, 1])
    written = write_summary(config, [r for r in _results() if r["task"] == "m-so2sat"])
    assert [r["task"] for r in written["summary"]] == ["m-so2sat", "m-so2sat"]
    assert "aggregate" not in written["markdown"]


def test_encoders_are_told_apart_only_when_widened_intervals_do_not_overlap() -> None:
    def row(encoder: str, iqm: float, low: float, high: float) -> dict[str, Any]:
        return {"encoder": encoder, "task": "land_cover", "iqm": iqm, "apart_low": low, "apart_high": high}

    line = told_apart([row("random", 0.60, 0.55, 0.67), row("all_mod", 0.80, 0.76, 0.84),
                       row("S2", 0.70, 0.66, 0.74)])
    assert line == ("- land_cover: `all_mod` > `S2`: told apart; "
                    "`S2` > `random`: intervals overlap, cannot tell apart")
    assert told_apart([row("a", 0.7, 0.6, 0.8)]) == "- land_cover: one encoder"


def test_the_test_sample_intervals_widen_the_seed_interval() -> None:
    config = BenchmarkConfig(name="t", encoders={"a": None}, tasks=["land_cover"], seeds=[0, 1])
    results = [{"encoder": "a", "task": "land_cover", "mode": "linear_probe", "partition": "default",
                "metric": "accuracy", "test_metric": value, "test_ci_low": value - 0.1, "test_ci_high": value + 0.05}
               for value in (0.5, 0.6)]
    (summary,) = summary_rows(config, results)
    assert (summary["ci_low"], summary["ci_high"]) == (0.5, 0.6)  # two seeds: the interval is their range
    assert summary["apart_low"] == pytest.approx(0.4) and summary["apart_high"] == pytest.approx(0.65)
