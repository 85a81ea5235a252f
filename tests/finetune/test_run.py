"""Evaluation runs on Ray Train over real BigEarthNet pixels, and the probe table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mpmae.config import FinetuneRunConfig, load_config
from mpmae.data.synth import write_synthetic_mmearth
from mpmae.evaluation.probe_table import probe_table
from mpmae.finetune.run import finetune
from mpmae.tables import format_table


@pytest.mark.ray
@pytest.mark.timeout(500)
def test_finetune_overfits_real_bigearthnet_patches(ray_cluster: object, realdata: Path, tmp_path: Path) -> None:
    config = load_config(FinetuneRunConfig, None, [
        f"geobench_dir={realdata / 'geobench_mini'}", "task=m-bigearthnet", "batch_size=4", "epochs=100",
        "blr=0.0128", "min_lr=2e-4", "weight_decay=0.0", "smoothing=0.0", "drop_path=0.0", "layer_decay=1.0",
        f"run.storage_path={tmp_path}", "run.name=ben", "run.cpus_per_worker=1",
    ])
    results = finetune(config)
    history = results["history"]
    assert len(history) == 100 and results["selected_epoch"] == 99
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    assert history[-1]["train_metric"] == 1.0  # micro F1 over the 4 training patches
    assert 0.0 <= results["test_metric"] <= 1.0
    saved = json.loads((tmp_path / "ben" / "results.json").read_text())
    assert saved["test_metric"] == results["test_metric"] and saved["encoder"] == "random"
    with pytest.raises(FileExistsError, match="results.json already exists"):
        finetune(config)


def test_probe_table_on_the_held_out_land_cover_task(tmp_path: Path) -> None:
    data = write_synthetic_mmearth(tmp_path / "data", tiles=60, seed=4)
    rows = probe_table([None], "land_cover", data=data, epochs=20)
    assert rows[0]["encoder"] == "random init" and rows[0]["train_samples"] == 6
    assert 0.0 <= rows[0]["score"] <= 1.0
    assert "random init  land_cover" in format_table(rows, ["encoder", "task", "score"])
    with pytest.raises(ValueError, match="needs --data"):
        probe_table([None], "land_cover")
