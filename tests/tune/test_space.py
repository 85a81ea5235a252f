"""The search space: parsing, conditional task weights, and errors raised before any trial starts."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from mpmae.config import ConfigError, PretrainConfig, SweepConfig, from_dict, load_config, to_dict
from mpmae.data.synth import write_synthetic_mmearth
from mpmae.tune.space import TASK_WEIGHTS, apply_params, candidate_configs, parse_search_space
from mpmae.tune.sweep import prepare_sweep, tune

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_mmearth(tmp_path_factory.mktemp("space") / "data", tiles=40, seed=5)


def _sweep(synth: Path, storage: Path, *overrides: str) -> SweepConfig:
    return load_config(SweepConfig, REPO / "configs" / "tune_demo.yaml", [
        f"base={REPO / 'configs' / 'demo.yaml'}", f"pretrain.data.path={synth}", f"storage_path={storage}",
        "pretrain.optim.batch_size=8", *overrides,
    ])


def _sample(space, seed: int) -> dict:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    trial = study.ask()
    space.sample(trial)
    return trial.params


def test_weights_are_sampled_only_for_weighted_trials_and_per_target_task() -> None:
    base = PretrainConfig()
    base.model.targets = ["sentinel2", "biome", "esa_worldcover"]
    space = parse_search_space({
        "model.mask_ratio": {"uniform": [0.4, 0.9]},
        "model.loss": {"choice": ["uncertainty", "weighted"]},
        TASK_WEIGHTS: {"biome": {"loguniform": [0.1, 10]}, "default": 2.0},
    }, base)
    samples = [_sample(space, seed) for seed in range(20)]
    weighted = [s for s in samples if s["model.loss"] == "weighted"]
    plain = [s for s in samples if s["model.loss"] != "weighted"]
    assert weighted and plain
    assert all(not any(k.startswith(TASK_WEIGHTS) for k in s) for s in plain)
    for params in weighted:
        assert 0.1 <= params[f"{TASK_WEIGHTS}.biome"] <= 10  # the fixed default is no Optuna parameter
        config = apply_params(to_dict(base), {**params, f"{TASK_WEIGHTS}.sentinel2": 2.0})
        assert config["model"]["task_weights"] == {"biome": params[f"{TASK_WEIGHTS}.biome"], "sentinel2": 2.0}
    config = from_dict(PretrainConfig, apply_params(to_dict(base), plain[0]))
    assert config.model.task_weights is None and config.model.loss == "uncertainty"
    assert 0.4 <= config.model.mask_ratio <= 0.9


def test_target_choice_by_label_and_weights_follow_the_trial_targets() -> None:
    space = parse_search_space({
        "model.targets": {"choice": [["sentinel2", "biome"], "S2"]},
        "model.loss": "weighted",
        TASK_WEIGHTS: {"uniform": [0.5, 1.5]},
    }, PretrainConfig())
    seen = {}
    for seed in range(12):
        params = _sample(space, seed)
        weights = sorted(k.removeprefix(f"{TASK_WEIGHTS}.") for k in params if k.startswith(TASK_WEIGHTS))
        seen[params["model.targets"]] = weights
    assert seen == {"sentinel2+biome": ["biome", "sentinel2"], "S2": ["sentinel2"]}


@pytest.mark.parametrize(("search", "message"), [
    ({"model.mask_ratios": {"uniform": [0.4, 0.9]}}, r"unknown key\(s\) \['model.mask_ratios'\]"),
    ({"model.loss": "weighted", TASK_WEIGHTS: {"dynamic_world": {"uniform": [0.5, 2]}}},
     r"\['dynamic_world'\] are not pretext tasks"),
    ({TASK_WEIGHTS: {"uniform": [0.5, 2]}}, "only used when model.loss is 'weighted'"),
    ({"model.mask_ratio": {"uniform": [0.4, 1.2]}}, "mask_ratio: 1.2 must lie strictly between 0 and 1"),
    ({"optim.blr": {"loguniform": [0, 1e-3]}}, "loguniform needs low > 0"),
    ({"optim.blr": {"normal": [0, 1]}}, r"search.optim.blr: expected one of"),
    ({"model.loss": {"choice": ["uncertainty", "focal"]}}, r"\['focal'\] are not among"),
    ({"model.targets": {"choice": ["all_mod", "no_such_preset"]}}, "unknown modality preset or name .no_such_preset"),
])
def test_invalid_search_space_is_rejected(search: dict, message: str) -> None:
    base = PretrainConfig()
    base.model.targets = ["sentinel2", "biome"]
    with pytest.raises(ConfigError, match=message):
        candidate_configs(to_dict(base), parse_search_space(search, base))


def test_invalid_sweep_fails_before_ray_or_any_trial(
    synth: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`tune` validates first: Ray is never joined and no sweep folder is written."""
    import mpmae.tune.sweep

    def no_ray() -> None:
        raise AssertionError("tune() reached Ray with an invalid sweep")

    monkeypatch.setattr(mpmae.tune.sweep, "ensure_ray", no_ray)
    cases = [
        (["search.model.decoder_dim={uniform: [64, 128]}"], "unknown key"),
        (["pretrain.model.targets=[sentinel2, biome]", "search.model.loss=weighted",
          "search.model.task_weights={era5: {uniform: [0.5, 2]}}"], r"\['era5'\] are not pretext tasks"),
        (["pretrain.probe.task=null"], "name the probe task"),
        (["search.model.targets={choice: [all_mod, [sentinel2, no_modality]]}"], "model.targets: .*no_modality"),
        (["scheduler.grace_period=9"], "grace_period: 9 exceeds"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            tune(_sweep(synth, tmp_path, *overrides))
    assert not any(tmp_path.iterdir())


def test_data_must_hold_every_candidate_target(synth: Path, tmp_path: Path) -> None:
    """A targets choice the data cannot serve fails up front, naming the modality and the data."""
    import h5py

    shallow = write_synthetic_mmearth(tmp_path / "shallow", tiles=40, seed=5)
    with h5py.File(next(shallow.glob("data_*.h5")), "a") as h5:
        del h5["era5"]
    sweep = _sweep(shallow, tmp_path / "runs", "search.model.targets={choice: [[sentinel2, biome], all_mod]}")
    with pytest.raises(ConfigError, match="era5"):
        prepare_sweep(sweep)
    ok = prepare_sweep(_sweep(synth, tmp_path / "runs"))
    assert ok.base["data"]["path"] == str(synth.resolve()) and ok.base["probe"]["task"] == "land_cover"
    assert ok.space.searched == ["model.mask_ratio", "model.loss", "optim.blr"]


def test_a_trial_restored_after_its_final_checkpoint_reports_its_last_epoch_again(tmp_path: Path) -> None:
    """Train would report nothing for a run that already checkpointed its last epoch; Tune still needs a result."""
    from mpmae.checkpoint import atomic_save
    from mpmae.tune.sweep import _finished_run_metrics

    run = tmp_path / "trial"
    assert _finished_run_metrics(run, epochs=2) is None
    history = [{"epochs_done": 1, "probe_score": 0.4}, {"epochs_done": 2, "probe_score": 0.5}]
    for epoch in (1, 2):
        (run / f"epoch-{epoch:04d}").mkdir(parents=True)
        atomic_save({"model": {}, "config": {}, "epoch": epoch, "step": 4 * epoch, "history": history[:epoch]},
                    run / f"epoch-{epoch:04d}" / "state.pt")
    assert _finished_run_metrics(run, epochs=2) == {"epochs_done": 2, "probe_score": 0.5}
    assert _finished_run_metrics(run, epochs=3) is None  # unfinished: Train resumes and reports the rest
