"""One cell in this process: each mode on real BigEarthNet patches, land_cover, a segmentation U-Net, and the
per-sample metric counts behind the test interval."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import TensorDataset

import mpmae.benchmark.cell as cell_module
from mpmae.benchmark.cell import model_counts, run_cell, sample_counts
from mpmae.benchmark.plan import Cell
from mpmae.config import BenchmarkConfig, load_config
from mpmae.data.downstream import land_cover_task
from mpmae.evaluation.split_metrics import make_metric
from mpmae.export import load_encoder
from mpmae.models import UNet
from mpmae.tasks import TaskKind

_DRAWS = torch.Generator().manual_seed(0)


def _config(*overrides: str) -> BenchmarkConfig:
    return load_config(BenchmarkConfig, None, ["epochs=2", "finetune.drop_path=0.0", *overrides])


@pytest.mark.parametrize(("kind", "logits", "target"), [
    ("multilabel", torch.randn(7, 5, generator=_DRAWS), torch.randint(0, 2, (7, 5), generator=_DRAWS)),
    ("multiclass", torch.randn(7, 4, generator=_DRAWS), torch.randint(0, 4, (7,), generator=_DRAWS)),
    ("segmentation", torch.randn(7, 3, 6, 6, generator=_DRAWS), torch.randint(0, 3, (7, 6, 6), generator=_DRAWS)),
])
def test_per_sample_counts_sum_to_the_split_metric(kind: TaskKind, logits: torch.Tensor,
                                                   target: torch.Tensor) -> None:
    """The test interval resamples these counts: their sum must score as the whole split does."""
    classes = logits.shape[1]
    counts = sample_counts(make_metric(kind, classes), logits, target)
    whole = make_metric(kind, classes)
    whole.update(logits, target)
    assert len(counts) == 7
    assert cell_module.metric_of(make_metric(kind, classes), counts.sum(axis=0)) == pytest.approx(whole.compute())
    model = torch.nn.Identity()
    batches = [(logits[:3], target[:3]), (logits[3:], target[3:])]
    assert (model_counts(model, batches, make_metric(kind, classes), torch.device("cpu")) == counts).all()


@pytest.mark.parametrize("mode", ["linear_probe", "finetune"])
def test_a_cell_on_real_bigearthnet_patches(mode: str, geobench_mini: Path, tiny_export: Path) -> None:
    config = _config(f"geobench_dir={geobench_mini}", f"encoders={{tiny: {tiny_export}}}", "linear_probe.blr=1e-2")
    cell = Cell("tiny", "m-bigearthnet", mode, "default", 1)
    row = run_cell(config, cell)
    assert {k: row[k] for k in ("encoder", "task", "mode", "partition", "seed", "metric", "epochs", "device")} == {
        "encoder": "tiny", "task": "m-bigearthnet", "mode": mode, "partition": "default", "seed": 1,
        "metric": "micro F1", "epochs": 2, "device": "cpu"}
    assert (row["train_samples"], row["val_samples"], row["test_samples"]) == (4, 1, 1)
    assert 0.0 <= row["val_metric"] <= 1.0 and 0.0 <= row["test_metric"] <= 1.0
    assert row["test_ci_low"] == row["test_ci_high"] == row["test_metric"]  # one test patch: nothing to resample
    again = run_cell(config, cell)
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in row.items() if k != "seconds"}


@pytest.mark.parametrize("mode", ["linear_probe", "finetune"])
def test_land_cover_trains_on_half_the_val_tiles_and_tests_on_test(mode: str, land_cover_data: Path) -> None:
    config = _config(f"data={land_cover_data}", "tasks=[land_cover]", "encoders={random: null}", "epochs=1")
    val_labels = land_cover_task(land_cover_data, "val")[1]
    test_labels = land_cover_task(land_cover_data, "test")[1]
    row = run_cell(config, Cell("random", "land_cover", mode, "default", 0))
    half = (len(val_labels) + 1) // 2
    assert (row["train_samples"], row["val_samples"], row["test_samples"]) == (
        half, len(val_labels) - half, len(test_labels))
    assert row["metric"] == "accuracy"
    correct = round(row["test_metric"] * len(test_labels))
    assert row["test_metric"] == pytest.approx(correct / len(test_labels))
    assert 0.0 <= row["test_ci_low"] <= row["test_metric"] <= row["test_ci_high"] <= 1.0


@pytest.mark.parametrize(("mode", "trained"), [("linear_probe", False), ("finetune", True)])
def test_a_segmentation_cell_trains_the_unet_and_its_encoder_only_when_fine_tuning(
    mode: str, trained: bool, tiny_export: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """m-cashew-plant's U-Net on 32 px stand-ins (the mini GEO-Bench folder has no segmentation task): with
    ``linear_probe`` the encoder stays as exported, with ``finetune`` it trains after ``freeze_epochs``."""
    generator = torch.Generator().manual_seed(0)

    def splits(config: BenchmarkConfig, cell: Cell, bands: list[str]) -> dict[str, TensorDataset]:
        assert bands == load_encoder(tiny_export)[1]["bands"]
        return {split: TensorDataset(torch.randn(n, 12, 32, 32, generator=generator),
                                     torch.randint(0, 7, (n, 32, 32), generator=generator))
                for split, n in (("train", 4), ("val", 2), ("test", 3))}

    built: list[UNet] = []
    build = cell_module.build_finetune_model

    def keep(config: Any) -> Any:
        model, card = build(config)
        built.append(model)
        return model, card

    monkeypatch.setattr(cell_module, "load_splits", splits)
    monkeypatch.setattr(cell_module, "build_finetune_model", keep)
    config = _config(f"encoders={{tiny: {tiny_export}}}", "tasks=[m-cashew-plant]", "segmentation.epochs=2",
                     "segmentation.freeze_epochs=1", "segmentation.batch_size=2", "segmentation.drop_path=0.0")
    row = run_cell(config, Cell("tiny", "m-cashew-plant", mode, "default", 0))
    assert (row["metric"], row["epochs"], row["test_samples"]) == ("mIoU", 2, 3)
    assert 0.0 <= row["test_ci_low"] <= row["test_metric"] <= row["test_ci_high"] <= 1.0
    exported = torch.load(tiny_export / "encoder.pt", weights_only=True)
    after = built[0].encoder.state_dict()
    changed = any(not torch.equal(after[k], v) for k, v in exported.items())
    assert changed == trained
