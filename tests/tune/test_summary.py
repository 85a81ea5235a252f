"""The sweep summary's table order, best trial and whether it told its trials apart, on fixed results (no
Ray instance)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from mpmae.tune.summary import best_row, separation, trial_rows

# Ids are random with a search algorithm: the one created first sorts last, and two trials tie.
CREATED = [  # (trial_id, experiment_tag, probe_score), in the order Tune created the trials
    ("f3a9c2d1", "1_loss=uncertainty,mask_ratio=0.6", 0.6),
    ("0b7e4a55", "2_loss=weighted,mask_ratio=0.5", 0.6),
    ("9c1d2e3f", "3_loss=unweighted,mask_ratio=0.8", 0.55),
    ("00aa11bb", "10_loss=weighted,mask_ratio=0.7", 0.6),
]


def _result(trial_id: str, tag: str, score: float) -> SimpleNamespace:
    metrics = {"trial_id": trial_id, "experiment_tag": tag, "probe_score": score, "epochs_done": 2}
    return SimpleNamespace(metrics=metrics, error=None, path=f"/sweep/run_trial_{trial_id}_{tag}", config={})


def test_ties_go_to_the_trial_created_first_as_in_tunes_progress_output() -> None:
    from ray.tune.experimental.output import _current_best_trial

    results = [_result(*CREATED[i]) for i in (3, 1, 2, 0)]  # whatever order the results come in
    rows = trial_rows(SimpleNamespace(epochs=2), results)
    assert [r["trial_id"] for r in rows] == [t[0] for t in CREATED]  # creation order (10 after 3)
    trials = [SimpleNamespace(trial_id=t[0], last_result=_result(*t).metrics) for t in CREATED]
    tune_best, _ = _current_best_trial(trials, "probe_score", "max")  # Tune's "Current best trial"
    assert best_row(rows)["trial_id"] == tune_best.trial_id == "f3a9c2d1"


def test_errored_and_unscored_trials_are_never_best() -> None:
    rows = [{"trial_id": "a", "probe_score": 0.9, "state": "error"},
            {"trial_id": "b", "probe_score": None, "state": "completed"},
            {"trial_id": "c", "probe_score": 0.1, "state": "stopped early"}]
    assert best_row(rows)["trial_id"] == "c"
    assert best_row(rows[:2]) is None


def _row(trial_id: str, score: float, low: float, high: float, state: str = "completed") -> dict[str, Any]:
    return {"trial_id": trial_id, "probe_score": score, "probe_score_low": low, "probe_score_high": high,
            "probe_accuracy": 0.5, "state": state}


def test_rows_carry_each_trials_interval_and_accuracy() -> None:
    metrics = {"trial_id": "a", "experiment_tag": "1_x", "probe_score": 0.41, "probe_score_low": 0.36,
               "probe_score_high": 0.47, "probe_accuracy": 0.55, "epochs_done": 2}
    old = {"trial_id": "b", "experiment_tag": "2_x", "probe_score": 0.6, "epochs_done": 1}  # before intervals
    results = [SimpleNamespace(metrics=m, error=None, path=f"/sweep/{m['trial_id']}", config={})
               for m in (metrics, old)]
    rows = trial_rows(SimpleNamespace(epochs=2), results)
    assert [(r["probe_score_low"], r["probe_score_high"], r["probe_accuracy"]) for r in rows] == [
        (0.36, 0.47, 0.55), (None, None, None)]
    assert separation(rows) is None  # the best has no interval to compare


def test_the_summary_says_when_the_best_interval_is_clear_of_the_worst() -> None:
    rows = [_row("a", 0.40, 0.35, 0.45), _row("b", 0.52, 0.47, 0.57), _row("c", 0.43, 0.38, 0.48),
            _row("d", 0.90, 0.30, 0.95, state="error")]  # an errored trial is neither best nor compared
    assert separation(rows) == ("best trial b 0.5200 [0.4700, 0.5700], worst trial a 0.4000 [0.3500, 0.4500]: "
                                "the 95 % intervals separate; the best's interval is above 1 of the other 2 trials'")


def test_the_summary_says_when_the_sweep_could_not_tell_its_trials_apart() -> None:
    rows = [_row("a", 0.40, 0.35, 0.45), _row("b", 0.44, 0.39, 0.49), _row("c", 0.43, 0.38, 0.48)]
    text = separation(rows)
    assert text is not None and text.startswith("best trial b 0.4400 [0.3900, 0.4900], worst trial a 0.4000")
    assert text.endswith("the 95 % intervals overlap; the sweep could not tell its trials apart "
                         "(the best's interval overlaps every other's)")
    assert separation(rows[1:2]) is None  # one trial: nothing to tell apart
