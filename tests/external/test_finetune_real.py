"""Fine-tuning on Ray Train over real BigEarthNet pixels (the shared GEO-Bench-format mini folder): a random
encoder overfits the 4 real training patches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mpmae.config import FinetuneConfig, load_config
from mpmae.finetune.run import finetune


@pytest.mark.ray
@pytest.mark.timeout(500)
def test_finetune_overfits_real_bigearthnet_patches(ray_cluster: object, realdata: Path, tmp_path: Path) -> None:
    config = load_config(FinetuneConfig, None, [
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
