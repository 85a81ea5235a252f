"""The typed config loader: YAML, overrides, and errors that name the key's path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mpmae.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    OptimConfig,
    PretrainConfig,
    apply_overrides,
    from_dict,
    load_config,
)


def test_yaml_and_overrides_build_typed_sections(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("arch: tiny\npatch_size: 16\ntask_weights: {sentinel2: 2}\n")
    config = load_config(ModelConfig, path, ["mask_ratio=0.75", "targets=[sentinel2, biome]"])
    assert config.arch == "tiny" and config.patch_size == 16 and config.mask_ratio == 0.75
    assert config.targets == ["sentinel2", "biome"]
    assert config.task_weights == {"sentinel2": 2.0} and isinstance(config.task_weights["sentinel2"], float)


def test_exponent_floats_without_a_dot_are_floats() -> None:
    assert load_config(OptimConfig, None, ["blr=2e-4", "min_lr=-1E+2"]).blr == 2e-4
    with pytest.raises(ConfigError, match=r"^blr: expected float, got 'fast'"):
        load_config(OptimConfig, None, ["blr=fast"])


def test_recipe_learning_rate_scales_with_effective_batch() -> None:
    optim = from_dict(OptimConfig, {"batch_size": 256, "accum_steps": 16, "betas": [0.9, 0.95]})
    assert optim.effective_batch == 4096
    assert optim.lr == pytest.approx(2.4e-3)
    assert optim.betas == (0.9, 0.95)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"pth": "x"}, r"^pth: unknown key; valid keys here: \['path'"),
        ({"crop_size": "56"}, r"^crop_size: expected int, got '56'"),
        ({"crop_size": True}, r"^crop_size: expected int"),
        ({"format": "zarr"}, r"^format: 'zarr' is not one of \['mmearth', 'parquet', 'ffcv'\]"),
    ],
)
def test_bad_values_name_the_key(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_dict(DataConfig, data)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.selection=S2", r"^model\.selection: renamed to model\.targets$"),
        ("model.loss_aggregation=unweighted", r"^model\.loss_aggregation: renamed to model\.loss$"),
    ],
)
def test_a_renamed_key_names_the_new_one(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(PretrainConfig, "configs/demo.yaml", [override])


def test_a_renamed_fine_tuning_key_names_the_new_one() -> None:
    from mpmae.config import FinetuneConfig

    with pytest.raises(ConfigError, match=r"^lr: renamed to blr$"):
        from_dict(FinetuneConfig, {"lr": 1e-3})


def test_nested_paths_in_errors() -> None:
    with pytest.raises(ConfigError, match=r"^task_weights\.biome: expected float, got 'high'"):
        from_dict(ModelConfig, {"task_weights": {"biome": "high"}})
    with pytest.raises(ConfigError, match=r"^betas\[1\]: expected float"):
        from_dict(OptimConfig, {"betas": [0.9, "x"]})


def test_override_syntax_errors() -> None:
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["optim.blr"])
    with pytest.raises(ConfigError, match="'blr' is not a section"):
        apply_overrides({"blr": 1.0}, ["blr.x=2"])


def test_unreadable_yaml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("a: [1, 2")
    with pytest.raises(ConfigError, match="broken.yaml: cannot read the config"):
        load_config(DataConfig, path)


def test_cloud_storage_uris_pass_through_to_ray_and_local_paths_become_absolute(tmp_path: Path) -> None:
    from mpmae.config import RunConfig

    assert RunConfig(storage_path="s3://bucket/mpmae").storage == "s3://bucket/mpmae"
    assert RunConfig(storage_path="gs://bucket").storage == "gs://bucket"
    assert RunConfig(storage_path="runs").storage == str(Path("runs").resolve())


def test_sweeps_take_cloud_storage_and_refuse_a_malformed_uri() -> None:
    from mpmae.config import SweepConfig

    search = "search.model.mask_ratio={uniform: [0.5, 0.8]}"
    assert load_config(SweepConfig, None, ["storage_path=s3://b/x", search]).storage_path == "s3://b/x"
    with pytest.raises(ConfigError, match="storage_path: s3:///x is not a URI of the form scheme://bucket/path"):
        load_config(SweepConfig, None, ["storage_path=s3:///x", search])


# -- names used as folders, numeric ranges, storage, and YAML that is not plain -----------------------------


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Relative storage paths resolve in an empty folder."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


UNSAFE_NAMES = ["../../outside", "/etc/cron.d", "a/b", ".hidden", "..", "a..b", "", "-flag", "has space", "naïve",
                "tab\tname", "x" * 129]
SAFE_NAMES = ["demo", "tune-demo-best", "1a2b3_00000", "lr=1e-3+wd=0.05", "pt-all_mod_atto_1M_64_uncertainty_56-8",
              "x" * 128]


@pytest.mark.parametrize("name", UNSAFE_NAMES)
def test_unsafe_names_are_refused_naming_the_key(in_tmp: Path, name: str) -> None:
    from mpmae.config import FinetuneConfig, PretrainConfig, SweepConfig, check_name

    shown = repr(name[:60]) + ("..." if len(name) > 60 else "")
    message = "is not a safe name: use letters, digits and ._=+-"
    quoted = json.dumps(name)  # a YAML double-quoted string
    with pytest.raises(ConfigError) as info:
        load_config(PretrainConfig, None, [f"run.name={quoted}"])
    assert str(info.value).startswith(f"run.name: {shown} {message}")
    with pytest.raises(ConfigError, match=r"^run\.name: "):
        load_config(FinetuneConfig, None, [f"run.name={quoted}"])
    with pytest.raises(ConfigError, match=r"^name: "):
        load_config(SweepConfig, None, [f"name={quoted}", "search.model.mask_ratio={uniform: [0.5, 0.8]}"])
    with pytest.raises(ConfigError, match=r"^--resume: "):
        check_name(name, "--resume")
    assert not (in_tmp.parent / "outside").exists()


@pytest.mark.parametrize("name", SAFE_NAMES)
def test_safe_names_pass(in_tmp: Path, name: str) -> None:
    from mpmae.config import PretrainConfig, check_name

    assert check_name(name, "run.name") == name
    assert load_config(PretrainConfig, None, [f"run.name={name}"]).run.name == name


def test_every_generated_default_name_is_safe() -> None:
    """Default run names embed the shipped configs' values, a data or encoder folder's name, a trial id."""
    from mpmae.config import FinetuneConfig, PretrainConfig, check_name
    from mpmae.finetune.run import default_run_name as finetune_name
    from mpmae.tasks import TASKS
    from mpmae.train.trainer import default_run_name as pretrain_name

    configs = sorted(p for p in Path("configs").glob("*.yaml") if not p.name.startswith(
        ("tune_", "finetune_", "linear_probe_", "unet_", "geobench_suite", "demo_suite")))
    assert len(configs) >= 8
    for path in configs:
        config = load_config(PretrainConfig, path, ["run.name=null"])
        for folder in ("data_1M_v001_64", "data_100k_v001", "demo-data", ".", "shards"):
            check_name(pretrain_name(config, Path(folder).name), f"{path}: default run name")
    for task in TASKS:
        for mode in ("finetune", "linear_probe"):
            for encoder in (None, "exports/all_mod", "runs/pt-S2_atto_1M_64_uncertainty_56-8/"):
                config = FinetuneConfig(task=task, mode=mode, encoder=encoder)
                config.validate()
                check_name(finetune_name(config), "finetune default run name")


@pytest.mark.parametrize(("cls", "overrides", "message"), [
    ("PretrainConfig", ["data.path=/data/my data"], r"^data\.path: the folder name 'my data' goes into the default"),
    ("PretrainConfig", ["data.path=/data/a..b"], r"^data\.path: the folder name 'a..b'"),
    ("FinetuneConfig", ["encoder=exports/x;rm -rf"], r"^encoder: the folder name 'x;rm -rf' goes into"),
])
def test_a_default_name_from_an_unsafe_folder_name_is_refused(in_tmp: Path, cls: str, overrides: list[str],
                                                              message: str) -> None:
    import mpmae.config

    config_class = getattr(mpmae.config, cls)
    with pytest.raises(ConfigError, match=message):
        load_config(config_class, None, overrides)
    assert load_config(config_class, None, [*overrides, "run.name=mine"]).run.name == "mine"  # the remedy


def test_a_default_run_name_from_an_unsafe_data_file_name_is_refused(in_tmp: Path) -> None:
    """The default pretraining name embeds the h5 file's stem, which the folder check cannot see."""
    from mpmae.config import PretrainConfig
    from mpmae.train.trainer import DataSource, run_name

    config = load_config(PretrainConfig)
    source = DataSource(rows=8, image_size=64, selection={}, band_stats={}, name="my data", normalizer={})
    with pytest.raises(ConfigError, match=r"^run\.name \(unset, so the default from the data's name\): "
                                          r"'pt-all_mod_atto_my data_uncertainty_56-8' is not a safe name"):
        run_name(config, source)
    assert run_name(config, DataSource(8, 64, {}, {}, "1M_64", {})) == "pt-all_mod_atto_1M_64_uncertainty_56-8"
    assert run_name(load_config(PretrainConfig, None, ["run.name=mine"]), source) == "mine"


@pytest.mark.parametrize(("overrides", "message"), [
    (["run.num_workers=0"], "run.num_workers: 0 must be >= 1"),
    (["run.cpus_per_worker=0"], "run.cpus_per_worker: 0.0 must be > 0"),
    (["optim.blr=-2e-3"], "optim.blr: -0.002 must be > 0"),
    (["optim.blr=.nan"], "optim.blr: nan must be > 0"),
    (["optim.blr=.inf"], "optim.blr: inf must be > 0"),
    (["optim.min_lr=-1e-6"], "optim.min_lr: -1e-06 must be >= 0"),
    (["optim.min_lr=1.0"], "optim.min_lr: 1 exceeds the peak learning rate 0.00015 (from optim.blr)"),
    (["optim.weight_decay=-0.05"], "optim.weight_decay: -0.05 must be >= 0"),
    (["optim.clip_grad=0"], "optim.clip_grad: 0.0 must be > 0"),
    (["optim.batch_size=0"], "optim.batch_size: 0 must be >= 1"),
    (["optim.accum_steps=0"], "optim.accum_steps: 0 must be >= 1"),
    (["optim.betas=[0.9, 1.0]"], r"optim.betas[1]: 1.0 must lie in [0, 1)"),
    (["optim.betas=[0.9]"], "optim.betas: expected two values"),
    (["model.decoder_dim=0"], "model.decoder_dim: 0 must be >= 1"),
    (["model.decoder_depth=-1"], "model.decoder_depth: -1 must be >= 0"),
    (["model.mask_ratio=.nan"], "model.mask_ratio: nan must lie strictly between 0 and 1"),
    (["model.loss=weighted", "model.task_weights={sentinel2: .inf}"], "model.task_weights: weights of ['sentinel2']"),
    (["data.crop_size=0"], "data.crop_size: 0 must be >= 1"),
    (["data.loader_workers=-1"], "data.loader_workers: -1 must be >= 0"),
    (["run.keep_checkpoints=0"], "run.keep_checkpoints: 0 must be >= 1"),
    (["run.max_failures=-1"], "run.max_failures: -1 must be >= 0"),
    (["run.max_nonfinite_steps=-1"], "run.max_nonfinite_steps: -1 must be >= 0"),
    (["run.log_every_steps=0"], "run.log_every_steps: 0 must be >= 1"),
    (["run.seed=-1"], "run.seed: -1 must be >= 0"),
    (["probe.task=land_cover", "probe.every_epochs=0"], "probe.every_epochs: 0 must be >= 1"),
])
def test_pretrain_values_out_of_range_name_the_key(in_tmp: Path, overrides: list[str], message: str) -> None:
    from mpmae.config import PretrainConfig

    with pytest.raises(ConfigError) as info:
        load_config(PretrainConfig, None, overrides)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize(("overrides", "message"), [
    (["blr=-1e-4"], "blr: -0.0001 must be > 0"),
    (["min_lr=-1"], "min_lr: -1.0 must be >= 0"),
    (["weight_decay=-0.3"], "weight_decay: -0.3 must be >= 0"),
    (["layer_decay=0"], "layer_decay: 0.0 must lie in (0, 1]"),
    (["layer_decay=1.5"], "layer_decay: 1.5 must lie in (0, 1]"),
    (["drop_path=1"], "drop_path: 1.0 must lie in [0, 1)"),
    (["smoothing=-0.1"], "smoothing: -0.1 must lie in [0, 1)"),
    (["epochs=0"], "epochs: 0 must be >= 1"),
    (["batch_size=0"], "batch_size: 0 must be >= 1"),
    (["warmup_epochs=101"], "warmup_epochs: 101 must lie in [0, epochs 100]"),
    (["freeze_epochs=-1"], "freeze_epochs: -1 must be >= 0"),
    (["checkpoint_every=0"], "checkpoint_every: 0 must be >= 1"),
    (["patch_size=12"], "patch_size: 12 is not one of [8, 16, 32]"),
    (["arch=gigantic"], "arch: 'gigantic' is not one of"),
    (["run.num_workers=0"], "run.num_workers: 0 must be >= 1"),
    (["run.keep_checkpoints=0"], "run.keep_checkpoints: 0 must be >= 1"),
])
def test_finetune_values_out_of_range_name_the_key(in_tmp: Path, overrides: list[str], message: str) -> None:
    from mpmae.config import FinetuneConfig

    with pytest.raises(ConfigError) as info:
        load_config(FinetuneConfig, None, overrides)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize(("overrides", "message"), [
    (["num_samples=0"], "num_samples: 0 must be >= 1"),
    (["max_concurrent_trials=0"], "max_concurrent_trials: 0 must be >= 1"),
    (["max_failures=-1"], "max_failures: -1 must be >= 0"),
    (["search_alg.seed=-1"], "search_alg.seed: -1 must be >= 0"),
    (["scheduler.grace_period=0"], "scheduler.grace_period: 0 must be >= 1"),
    (["scheduler.reduction_factor=1"], "scheduler.reduction_factor: 1.0 must be > 1"),
])
def test_sweep_values_out_of_range_name_the_key(in_tmp: Path, overrides: list[str], message: str) -> None:
    from mpmae.config import SweepConfig

    with pytest.raises(ConfigError) as info:
        load_config(SweepConfig, None, [*overrides, "search.model.mask_ratio={uniform: [0.5, 0.8]}"])
    assert str(info.value).startswith(message)


def test_a_storage_path_that_is_or_lies_under_a_file_is_refused(in_tmp: Path) -> None:
    from mpmae.config import FinetuneConfig, PretrainConfig, SweepConfig

    (in_tmp / "notes.txt").write_text("")
    with pytest.raises(ConfigError, match=r"^run\.storage_path: notes\.txt is a file; expected a folder"):
        load_config(PretrainConfig, None, ["run.storage_path=notes.txt"])
    with pytest.raises(ConfigError, match=rf"^run\.storage_path: notes\.txt/a/b lies under {in_tmp}/notes\.txt, "):
        load_config(FinetuneConfig, None, ["run.storage_path=notes.txt/a/b"])
    with pytest.raises(ConfigError, match=r"^storage_path: notes\.txt is a file"):
        load_config(SweepConfig, None, ["storage_path=notes.txt", "search.model.mask_ratio={uniform: [0.5, 0.8]}"])
    assert load_config(PretrainConfig, None, ["run.storage_path=new/runs"]).run.storage_path == "new/runs"
    assert load_config(PretrainConfig, None, ["run.storage_path=s3://bucket/runs"]).run.storage == "s3://bucket/runs"
    assert not (in_tmp / "new").exists()  # checked, not created


def test_yaml_tags_are_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(ModelConfig, None, ['mask_ratio=!!python/object/apply:os.system ["echo pwned"]'])
    assert str(info.value).startswith("mask_ratio: the override's value '!!python/object/apply:os.system")
    assert "\n" not in str(info.value)
    path = tmp_path / "tagged.yaml"
    path.write_text("arch: atto\nmask_ratio: !!python/name:os.system\n")
    with pytest.raises(ConfigError) as info:
        load_config(ModelConfig, path)
    assert str(info.value) == (f"{path}: cannot read the config (could not determine a constructor for the tag "
                               "'tag:yaml.org,2002:python/name:os.system' at line 2, column 13)")


def test_a_config_file_must_hold_a_mapping_and_empty_sections_take_overrides(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- arch: atto\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: expected a mapping of sections, got list"):
        load_config(ModelConfig, path, ["arch=tiny"])
    path.write_text("optim:\n")
    from mpmae.config import PretrainConfig

    assert load_config(PretrainConfig, path, ["optim.blr=1e-3", "run.storage_path=s3://b/r"]).optim.blr == 1e-3
