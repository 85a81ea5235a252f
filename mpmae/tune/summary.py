"""What a finished sweep leaves behind: a table of trials, the best config, a plot, the best encoder.

The table (``trials.csv``, ``trials.json``: each trial's last probe score with its 95 % interval and
accuracy), ``best_config.yaml`` and ``probe_score.png`` summarise the whole sweep and are rewritten,
atomically, each time it completes (a resumed sweep adds trials): they are made from Tune's record, which
keeps every trial. The best trial's encoder goes to ``best-encoder-<trial_id>/``, a new folder per best
trial, never overwritten. The sweep folder may be a URI: each file is written whole (a local file renamed
into place, an object uploaded in one piece). The printed summary and the best config's header say whether
the best trial's interval is clear of the worst's, or that the sweep could not tell its trials apart.
"""

from __future__ import annotations

import csv
import io
import json
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

import mpmae.storage as storage
from mpmae.evaluation.probe_task import ACCURACY, SCORE_HIGH, SCORE_LOW
from mpmae.export import CARD_FILE, export_encoder
from mpmae.tables import format_table
from mpmae.tracking import Tracker
from mpmae.tune.plan import METRIC, TIME_ATTR, TRIALS_DIR, Sweep, yaml_ready
from mpmae.tune.space import TASK_WEIGHTS, apply_params

FIXED_COLUMNS = ("trial_id", METRIC, SCORE_LOW, SCORE_HIGH, ACCURACY, "epochs_run", "state")


def trial_rows(sweep: Sweep, results: Any) -> list[dict[str, Any]]:
    """One row per trial, in the order Tune created them (see :func:`creation_index`): id, searched
    values, last probe score with its interval and accuracy (None where the trial reported none), epochs
    run, how it ended."""
    rows, order = [], {}
    for position, result in enumerate(results):
        metrics = result.metrics or {}
        epochs = int(metrics.get(TIME_ATTR, 0))
        if result.error is not None:
            state = "error"
        else:
            state = "completed" if epochs >= sweep.epochs else "stopped early"
        rows.append({"trial_id": metrics.get("trial_id", Path(result.path).name),
                     **{key: metrics.get(key) for key in (METRIC, SCORE_LOW, SCORE_HIGH, ACCURACY)},
                     "epochs_run": epochs, "state": state, **dict(result.config)})
        order[id(rows[-1])] = (creation_index(metrics), position)
    return sorted(rows, key=lambda r: order[id(r)])


def creation_index(metrics: dict[str, Any]) -> float:
    """A trial's place in the order Tune created it: the counter its searcher puts first in the trial's
    ``experiment_tag`` (ids are random with a search algorithm, so their order means nothing)."""
    number = str(metrics.get("experiment_tag", "")).partition("_")[0]
    return int(number) if number.isdigit() else math.inf


def param_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The searched keys that appear in any trial, in a stable order."""
    return sorted({k for row in rows for k in row if k not in FIXED_COLUMNS})


def best_row(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The trial with the highest last probe score (errored trials excluded) among ``rows`` in creation
    order; a tie goes to the trial created first, as in Tune's "Current best trial" (the first of its
    trials, in creation order, with the highest score)."""
    scored = [r for r in rows if r["state"] != "error" and r[METRIC] is not None]
    return max(scored, key=lambda r: r[METRIC], default=None)


def separation(rows: Sequence[dict[str, Any]]) -> str | None:
    """Whether the sweep told its trials apart, in words: the best trial's 95 % interval against the worst
    trial's, and how many other trials lie wholly below it (none: the ranking is within the noise of the
    scored tiles). None with fewer than two trials that have an interval."""
    best = best_row(rows)
    if best is None or best.get(SCORE_LOW) is None:
        return None
    others = [r for r in rows if r is not best and r["state"] != "error" and r.get(SCORE_HIGH) is not None]
    if not others:
        return None
    worst = min(others, key=lambda r: r[METRIC])
    below = [r for r in others if r[SCORE_HIGH] < best[SCORE_LOW]]
    verdict = "separate" if worst[SCORE_HIGH] < best[SCORE_LOW] else "overlap"
    text = (f"best trial {best['trial_id']} {_interval(best)}, worst trial {worst['trial_id']} {_interval(worst)}: "
            f"the 95 % intervals {verdict}; ")
    if not below:
        return text + "the sweep could not tell its trials apart (the best's interval overlaps every other's)"
    return text + f"the best's interval is above {len(below)} of the other {len(others)} trials'"


def _interval(row: dict[str, Any]) -> str:
    return f"{row[METRIC]:.4f} [{row[SCORE_LOW]:.4f}, {row[SCORE_HIGH]:.4f}]"


def format_rows(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """The table for the terminal."""

    filled = [{c: _cell(r.get(c)) for c in columns} for r in rows]
    return format_table(filled, columns)


def _cell(value: Any) -> Any:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return value


def summarize(sweep: Sweep, results: Any, tracker: Tracker | None = None) -> dict[str, Any]:
    """Print and write the trial table, the best config, the plot, and export the best encoder; with a
    ``tracker`` (the sweep's tracked run) attach the tables and plot, tag the best trial and end the runs."""
    rows = trial_rows(sweep, results)
    columns = [*FIXED_COLUMNS, *param_columns(rows)]
    folder = sweep.folder
    print(format_rows(rows, columns))
    tables = {"trials.json": json.dumps(rows, indent=2, default=str), "trials.csv": _csv(rows, columns)}
    for name, text in tables.items():
        _rewrite(storage.join(folder, name), text)
    plot = plot_scores(rows, sweep, storage.join(folder, "probe_score.png"))
    best = best_row(rows)
    summary: dict[str, Any] = {"folder": folder, "trials": rows, "best": best, "separation": separation(rows)}
    if best is not None:
        summary["best_config"] = str(write_best_config(sweep, best, storage.join(folder, "best_config.yaml"),
                                                       summary["separation"]))
        summary["best_encoder"] = str(export_best_encoder(sweep, best))
        print(f"best trial {best['trial_id']}: {METRIC} {best[METRIC]:.4f} after {best['epochs_run']} epochs")
    if summary["separation"] is not None:
        print(summary["separation"])
    if tracker is not None:
        tracker.guarded("record the sweep's summary", lambda: _track_summary(
            tracker, sweep, rows, best, [*tables, *(["probe_score.png"] if plot else []),
                                         *(["best_config.yaml"] if best else [])]))
        tracker.finish()
    return summary


#: How each trial's tracked run ends, by the trial's state in the table.
_RUN_STATUS = {"completed": "FINISHED", "stopped early": "KILLED", "error": "FAILED"}


def _track_summary(tracker: Tracker, sweep: Sweep, rows: Sequence[dict[str, Any]], best: dict[str, Any] | None,
                   files: Sequence[str]) -> None:
    """The sweep's files on its run; each trial's run ended by its state (ASHA kills a stopped trial's
    driver before it can end its own run); the best trial tagged on its run and the sweep's."""
    if tracker.run_id is None:
        return
    with tempfile.TemporaryDirectory(prefix="mpmae-sweep-") as tmp:
        local = []
        for name in files:
            (Path(tmp) / name).write_bytes(storage.read_bytes(storage.join(sweep.folder, name)))
            local.append(Path(tmp) / name)
        tracker.log_artifacts(local)
    for row in rows:
        run_id = tracker.find_run(storage.join(sweep.folder, TRIALS_DIR, str(row["trial_id"])))
        if run_id is None:
            continue
        trial = tracker.for_run(run_id)
        if best is not None and row["trial_id"] == best["trial_id"]:
            trial.set_tags({"mpmae.best_trial": "true"})
        trial.finish(_RUN_STATUS[row["state"]])
    if best is not None:
        tracker.set_tags({"mpmae.best_trial_id": str(best["trial_id"])})
        tracker.log_metrics({f"best_{METRIC}": best[METRIC]}, int(best["epochs_run"]))


def _rewrite(path: str | Path, content: str | bytes) -> None:
    """A summary file written whole, replacing the one an earlier completion of the sweep wrote."""
    storage.write_bytes(path, content.encode() if isinstance(content, str) else content, overwrite=True)


def _csv(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_best_config(sweep: Sweep, best: dict[str, Any], path: Path | str,
                      separation: str | None = None) -> Path | str:
    """The best trial's pretraining config, ready for ``mpmae pretrain --config``: the full budget, the
    base config's storage, and a run name of its own; the header says how sure the choice is."""
    params = {k: v for k, v in best.items() if k not in FIXED_COLUMNS}
    config = apply_params(sweep.base, params)
    config["run"]["name"] = f"{sweep.config.name}-best"
    header = (f"# Best trial {best['trial_id']} of sweep {sweep.config.name}: {METRIC} {best[METRIC]:.4f} "
              f"after {best['epochs_run']} of {sweep.epochs} epochs.\n")
    if separation is not None:
        header += f"# {separation[0].upper()}{separation[1:]}.\n"
    _rewrite(path, header + yaml.safe_dump(yaml_ready(config), sort_keys=False))
    return path


def export_best_encoder(sweep: Sweep, best: dict[str, Any]) -> str:
    """The best trial's latest checkpoint as an encoder export (kept if this trial was exported before: its
    model card, written last, is there)."""
    out = storage.join(sweep.folder, f"best-encoder-{best['trial_id']}")
    if not storage.exists(storage.join(out, CARD_FILE)):
        export_encoder(storage.join(sweep.folder, TRIALS_DIR, str(best["trial_id"])), out)
    return out


def plot_scores(rows: Sequence[dict[str, Any]], sweep: Sweep, path: Path | str) -> Path | str | None:
    """Probe score against mask ratio, learning rate and each searched weight (log axes where sampled so)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    numeric = [c for c in param_columns(rows) if all(isinstance(r.get(c), float | int | type(None)) for r in rows)
               and any(r.get(c) is not None for r in rows)]
    scored = [r for r in rows if r[METRIC] is not None]
    if not numeric or not scored:
        return None
    cols = min(4, len(numeric))
    grid_rows = math.ceil(len(numeric) / cols)
    fig, axes = plt.subplots(grid_rows, cols, figsize=(4 * cols, 3.2 * grid_rows), squeeze=False)
    for ax in axes.flat[len(numeric):]:
        ax.set_visible(False)
    for ax, column in zip(axes.flat, numeric, strict=False):
        for state, marker in (("completed", "o"), ("stopped early", "x")):
            points = [r for r in scored if r["state"] == state and r.get(column) is not None]
            if points:
                ax.errorbar([r[column] for r in points], [r[METRIC] for r in points], yerr=_error_bars(points),
                            fmt=marker, capsize=3, label=state)
        dist = sweep.space.params.get(column) or sweep.space.task_weights.get(column.removeprefix(f"{TASK_WEIGHTS}."))
        if dist is None:
            dist = sweep.space.task_weights.get("default")
        if dist is not None and dist.kind == "loguniform":
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # a range within a decade labels every minor tick
        ax.set_xlabel(column.removeprefix("model.task_weights.").removeprefix("model.").removeprefix("optim."))
        if column.startswith(f"{TASK_WEIGHTS}."):
            ax.set_xlabel(f"weight of {ax.get_xlabel()}")
        ax.set_ylabel(METRIC)
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.suptitle(f"sweep {sweep.config.name}: last probe score of each trial, with its 95 % interval")
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=100)
    plt.close(fig)
    _rewrite(path, image.getvalue())
    return path


def _error_bars(rows: Sequence[dict[str, Any]]) -> list[list[float]]:
    """Distances from each score down and up to its interval's ends (none for a trial without one)."""
    return [[r[METRIC] - r[SCORE_LOW] if r.get(SCORE_LOW) is not None else 0.0 for r in rows],
            [r[SCORE_HIGH] - r[METRIC] if r.get(SCORE_HIGH) is not None else 0.0 for r in rows]]
