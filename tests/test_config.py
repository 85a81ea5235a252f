"""The typed config loader: YAML, overrides, and errors that name the key's path."""

from __future__ import annotations

from pathlib import Path

import pytest

from mpmae.config import ConfigError, DataConfig, ModelConfig, OptimConfig, apply_overrides, from_dict, load_config


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


def test_sweeps_refuse_cloud_storage_with_a_clear_error() -> None:
    from mpmae.config import SweepConfig

    with pytest.raises(ConfigError, match="storage_path: s3://b/x is a URI"):
        load_config(SweepConfig, None, ["storage_path=s3://b/x", "search.model.mask_ratio={uniform: [0.5, 0.8]}"])
