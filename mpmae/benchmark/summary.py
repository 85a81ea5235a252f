"""What a finished suite leaves beside its cell files: ``results.csv`` (one row per cell), ``summary.json`` (IQM
and interval over seeds per encoder, task, mode and partition, and the normalised aggregate over tasks),
``summary.md`` (the paper-style tables) and ``summary.png`` (the same as bars).

They are made from the cell files alone and rewritten whole each time the suite completes (a suite given more
seeds or encoders completes again); the cell files are the record and are never rewritten.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from typing import Any

from numpy.typing import ArrayLike

import mpmae.storage as storage
from mpmae.benchmark.plan import suite_folder, task_name
from mpmae.config import BenchmarkConfig, to_dict
from mpmae.evaluation.statistics import Estimate, estimate, min_max_normalise

RESULTS_FILE = "results.csv"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
SUMMARY_PNG = "summary.png"
RESULT_COLUMNS = ("encoder", "task", "mode", "partition", "seed", "metric", "val_metric", "test_metric",
                  "test_ci_low", "test_ci_high", "train_samples", "val_samples", "test_samples", "epochs", "seconds",
                  "device")
TOLD_APART_NOTE = (
    "**told apart**: two encoders' 95 % intervals do not overlap, each interval widened to cover every one of its "
    "runs' test-sample bootstrap intervals (`test_ci_low`, `test_ci_high` in results.csv): with few seeds the seed "
    "interval alone ignores the test set's sampling error (`apart_low`, `apart_high` in summary.json)."
)
#: The ``task`` of a summary row that aggregates the normalised scores of a table's tasks.
AGGREGATE = "aggregate"
NORMALISATION_NOTE = (
    "**aggregate (normalised)**: per task, every score of the table (all its encoders and seeds) is min-max "
    "normalised, (x - min) / (max - min), 0.5 where all are equal; the entry is the IQM of an encoder's "
    "normalised scores over tasks x seeds, its interval from the stratified bootstrap (seeds resampled within "
    "each task). Only tables of two or more tasks have it."
)


def summary_rows(config: BenchmarkConfig, results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per encoder, task, mode and partition (the test metric over seeds), then per table of two or
    more tasks one aggregate row per encoder."""
    groups: dict[tuple[str, str, str, str], list[float]] = {}
    envelopes: dict[tuple[str, str, str, str], tuple[float, float]] = {}
    metrics: dict[str, str] = {}
    for row in results:
        key = (row["encoder"], row["task"], row["mode"], row["partition"])
        groups.setdefault(key, []).append(row["test_metric"])
        low, high = envelopes.get(key, (row["test_ci_low"], row["test_ci_high"]))
        envelopes[key] = (min(low, row["test_ci_low"]), max(high, row["test_ci_high"]))
        metrics[row["task"]] = row["metric"]
    rows = []
    for key, values in groups.items():
        rows.append(_row(*key, metrics[key[1]], _estimate(config, [values])))
        # the seed interval knows nothing of the test set's sampling error: the runs' own intervals widen it
        rows[-1]["apart_low"] = min(rows[-1]["ci_low"], envelopes[key][0])
        rows[-1]["apart_high"] = max(rows[-1]["ci_high"], envelopes[key][1])
    for mode, partition in tables(config):
        tasks = [task_name(task) for task in config.tasks]
        if len(tasks) < 2:
            continue
        normalised = min_max_normalise({task: {encoder: groups[encoder, task, mode, partition]
                                               for encoder in config.encoders} for task in tasks})
        rows += [_row(encoder, AGGREGATE, mode, partition, "normalised",
                      _estimate(config, [normalised[task][encoder] for task in tasks]))
                 for encoder in config.encoders]
    return rows


def tables(config: BenchmarkConfig) -> list[tuple[str, str]]:
    """The (mode, partition) of each table: encoders against tasks."""
    return [(mode, partition) for mode in config.modes for partition in config.partitions]


def _estimate(config: BenchmarkConfig, strata: Sequence[ArrayLike]) -> Estimate:
    return estimate(strata, **to_dict(config.bootstrap))


def _row(encoder: str, task: str, mode: str, partition: str, metric: str, found: Estimate) -> dict[str, Any]:
    return {"encoder": encoder, "task": task, "mode": mode, "partition": partition, "metric": metric,
            **to_dict(found)}


def summary_markdown(config: BenchmarkConfig, rows: Sequence[dict[str, Any]]) -> str:
    """The paper's tables, one per mode and partition: encoders as rows, tasks as columns,
    ``iqm [ci_low, ci_high]``."""
    found = {(r["encoder"], r["task"], r["mode"], r["partition"]): r for r in rows}
    metrics = {r["task"]: r["metric"] for r in rows}
    tasks = [task_name(task) for task in config.tasks]
    boot = config.bootstrap
    lines = [f"# Benchmark {config.name}", "",
             f"Test metric of each encoder: the interquartile mean (IQM) over {len(config.seeds)} seed(s) "
             f"{list(config.seeds)}, with its {100 * boot.confidence:g} % stratified-bootstrap percentile interval "
             f"({boot.resamples} resamples, seed {boot.seed}): `iqm [ci_low, ci_high]`. Each run's test metric and its "
             f"interval over the test samples are in {RESULTS_FILE}."]
    for mode, partition in tables(config):
        columns = [*tasks, *([AGGREGATE] if len(tasks) > 1 else [])]
        headers = [f"{t} ({metrics[t]})" if t != AGGREGATE else "aggregate (normalised)" for t in columns]
        lines += ["", f"## {mode}, partition {partition}", "", "| encoder | " + " | ".join(headers) + " |",
                  "| --- " * (len(columns) + 1) + "|"]
        for encoder in config.encoders:
            entries = [_entry(found[encoder, task, mode, partition]) for task in columns]
            lines.append(f"| {encoder} | " + " | ".join(entries) + " |")
        lines += [""] + [told_apart([found[e, task, mode, partition] for e in config.encoders]) for task in tasks]
    lines += ["", TOLD_APART_NOTE]
    if len(tasks) > 1:
        lines += ["", NORMALISATION_NOTE]
    return "\n".join(lines) + "\n"


def told_apart(rows: Sequence[dict[str, Any]]) -> str:
    """One task's encoders in order of IQM, each neighbouring pair said to be told apart or not."""
    ranked = sorted(rows, key=lambda r: r["iqm"], reverse=True)
    pairs = [f"`{a['encoder']}` > `{b['encoder']}`: " +
             ("told apart" if a["apart_low"] > b["apart_high"] else "intervals overlap, cannot tell apart")
             for a, b in zip(ranked, ranked[1:], strict=False)]
    return f"- {ranked[0]['task']}: " + ("; ".join(pairs) if pairs else "one encoder")


def _entry(row: dict[str, Any]) -> str:
    return f"{row['iqm']:.4f} [{row['ci_low']:.4f}, {row['ci_high']:.4f}]"


def results_csv(results: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(RESULT_COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(results)
    return buffer.getvalue()


def plot_summary(config: BenchmarkConfig, rows: Sequence[dict[str, Any]]) -> bytes:
    """A PNG of the tables: per table, the IQM of each encoder on each task as bars, the intervals as
    error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = {(r["encoder"], r["task"], r["mode"], r["partition"]): r for r in rows}
    tasks = [task_name(task) for task in config.tasks]
    columns = [*tasks, *([AGGREGATE] if len(tasks) > 1 else [])]
    encoders = list(config.encoders)
    width = 0.8 / len(encoders)
    shown = tables(config)
    fig, axes = plt.subplots(len(shown), 1, figsize=(max(6.0, 1.8 * len(columns)), 3.4 * len(shown)),
                             squeeze=False)
    for ax, (mode, partition) in zip(axes[:, 0], shown, strict=True):
        for k, encoder in enumerate(encoders):
            entries = [found[encoder, column, mode, partition] for column in columns]
            centres = [i - 0.4 + (k + 0.5) * width for i in range(len(columns))]
            errors = [[e["iqm"] - e["ci_low"] for e in entries], [e["ci_high"] - e["iqm"] for e in entries]]
            ax.bar(centres, [e["iqm"] for e in entries], width, yerr=errors, capsize=3, label=encoder)
        ax.set_xticks(range(len(columns)), [c if c != AGGREGATE else "aggregate\n(normalised)" for c in columns])
        ax.set_ylabel("test metric, IQM")
        ax.set_ylim(0.0, 1.05)
        ax.set_title(f"{config.name}: {mode}, partition {partition}")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=100)
    plt.close(fig)
    return image.getvalue()


def write_summary(config: BenchmarkConfig, results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Write (replacing) the results table, the summary JSON and Markdown and the plot into the suite folder;
    returns the summary rows, the Markdown and each file's path."""
    rows = summary_rows(config, results)
    markdown = summary_markdown(config, rows)
    folder = suite_folder(config)
    contents = {RESULTS_FILE: results_csv(results).encode(), SUMMARY_JSON: json.dumps(rows, indent=2).encode(),
                SUMMARY_MD: markdown.encode(), SUMMARY_PNG: plot_summary(config, rows)}
    paths = {}
    for name, content in contents.items():
        paths[name] = storage.join(folder, name)
        storage.write_bytes(paths[name], content, overwrite=True)
    return {"summary": rows, "markdown": markdown, "paths": paths}
