"""The sweep summary's table order and best trial, on fixed results (no Ray instance)."""

from __future__ import annotations

from types import SimpleNamespace

from mpmae.tune.summary import best_row, trial_rows

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
