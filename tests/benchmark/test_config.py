"""The suite config: the shipped protocol, and every key refused by name before any file is read."""

from __future__ import annotations

from pathlib import Path

import pytest

from mpmae.benchmark.plan import Cell, cell_spec, finetune_config, plan_cells, recipe
from mpmae.config import BenchmarkConfig, ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
SUITE = REPO / "configs" / "geobench_suite.yaml"


@pytest.fixture(autouse=True)
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_shipped_suite_is_the_papers_protocol() -> None:
    """docs/method.md: probe and fine-tune at eff. batch 1024 and blr 2e-4 (lr 8e-4), 100 epochs; the U-Net
    at batch 32 and blr 1e-2, 200 epochs, the encoder frozen for the first 50."""
    config = load_config(BenchmarkConfig, SUITE)
    assert config.tasks == ["m-bigearthnet", "m-so2sat", "m-eurosat", "m-brick-kiln", "m-cashew-plant",
                            "m-SA-crop-type"]
    assert config.modes == ["linear_probe", "finetune"] and config.epochs == 100
    assert config.linear_probe.lr == pytest.approx(8e-4) and config.finetune.lr == pytest.approx(8e-4)
    assert (config.finetune.layer_decay, config.finetune.drop_path, config.finetune.smoothing) == (0.9, 0.1, 0.2)
    segmentation = config.segmentation
    assert (segmentation.epochs, segmentation.batch_size, segmentation.freeze_epochs) == (200, 32, 50)
    assert segmentation.lr == pytest.approx(1.25e-3) and segmentation.smoothing == 0.0
    assert len(plan_cells(config)) == 3 * 6 * 1 * 2 * 5
    assert config.bootstrap.confidence == 0.95


def test_the_demo_suite_compares_the_demo_encoders_on_the_held_out_task() -> None:
    config = load_config(BenchmarkConfig, REPO / "configs" / "demo_suite.yaml")
    config.validate()
    assert config.encoders == {"all_mod": "runs/demo", "S2": "runs/demo-s2", "random": None}
    assert config.tasks == ["land_cover"] and config.data == "runs/demo-probe" and config.modes == ["linear_probe"]
    assert len(plan_cells(config)) == 3


def test_each_cell_takes_its_modes_recipe_and_segmentation_its_own() -> None:
    config = load_config(BenchmarkConfig, SUITE, ["epochs=3", "segmentation.epochs=4", "segmentation.freeze_epochs=1"])
    probe = Cell("all_mod", "m-so2sat", "linear_probe", "default", 0)
    assert recipe(config, probe) == {"epochs": 3, "batch_size": 1024, "blr": 2e-4, "min_lr": 1e-6,
                                     "weight_decay": 0.3, "smoothing": 0.2}
    unet = finetune_config(config, Cell("random", "m-cashew-plant", "finetune", "default", 1))
    assert (unet.epochs, unet.frozen_epochs, unet.batch_size, unet.smoothing, unet.select) == (4, 1, 32, 0.0, "last")
    frozen = finetune_config(config, Cell("random", "m-cashew-plant", "linear_probe", "default", 1))
    assert frozen.mode == "linear_probe" and frozen.frozen_epochs == 4
    assert "freeze_epochs" not in cell_spec(config, Cell("random", "m-cashew-plant", "linear_probe", "default", 1))[
        "recipe"]
    assert cell_spec(config, Cell("random", "m-so2sat", "finetune", "default", 0))["arch"] == "atto"


def test_an_alias_names_its_task_in_the_cells() -> None:
    config = load_config(BenchmarkConfig, None, ["encoders={a: null}", "tasks=[m-cashew-plantation]"])
    assert plan_cells(config) == [Cell("a", "m-cashew-plant", "linear_probe", "default", 0)]


@pytest.mark.parametrize(("overrides", "message"), [
    (["encoders={}"], "encoders: none given"),
    (["encoders={../x: null}"], "encoders.../x: '../x' is not a safe name"),
    (["tasks=[m-so2sat, m-nope]"], "tasks[1]: unknown GEO-Bench task 'm-nope'"),
    (["tasks=[m-so2sat, m-eurosat, m-so2sat]"], "tasks[2]: 'm-so2sat' is listed twice"),
    (["tasks=[]"], "tasks: the list is empty"),
    (["partitions=[default, 0.3x_train]"], "partitions[1]: '0.3x_train' is not one of ['default', '0.01x_train'"),
    (["seeds=[0, 1, 0]"], "seeds[2]: 0 is listed twice"),
    (["seeds=[-1]"], "seeds[0]: -1 must be >= 0"),
    (["modes=[zero_shot]"], "modes[0]: 'zero_shot' is not one of ['linear_probe', 'finetune']"),
    (["epochs=0"], "epochs: 0 must be >= 1"),
    (["cpus_per_cell=0"], "cpus_per_cell: 0.0 must be > 0"),
    (["max_concurrent_cells=0"], "max_concurrent_cells: 0 must be >= 1"),
    (["finetune.drop_path=1.5"], "finetune.drop_path: 1.5 must lie in [0, 1)"),
    (["linear_probe.min_lr=0.1"], "linear_probe.min_lr: 0.1 exceeds the peak learning rate 0.0008"),
    (["segmentation.freeze_epochs=300"], "segmentation.freeze_epochs: 300 must lie in [0, epochs 200]"),
    (["bootstrap.confidence=1.0"], "bootstrap.confidence: 1.0 must lie in (0, 1)"),
    (["tasks=[land_cover]"], "tasks[0]: land_cover is read from an MMEarth folder; set data"),
    (["tasks=[m-so2sat, land_cover]", "data=x", "partitions=[default, 0.01x_train]"],
     "partitions: land_cover (tasks[1]) has only the 'default' partition, not ['0.01x_train']"),
    (["arch=giant"], "arch: 'giant' is not one of"),
    (["name=../up"], "name: '../up' is not a safe name"),
])
def test_bad_keys_are_named(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(BenchmarkConfig, None, ["encoders={a: null}", *overrides])
    assert str(info.value).startswith(message), str(info.value)
