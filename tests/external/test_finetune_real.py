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
def test_finetune_overfits_real_bigearthnet_patches(ray_cluster: object, mlflow_server: str, realdata: Path,
                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tracked too: every epoch's train and val metrics, the test metrics and results.json in MLflow, and the
    same metrics in TensorBoard's event files under the run folder."""
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    config = load_config(FinetuneConfig, None, [
        f"geobench_dir={realdata / 'geobench_mini'}", "task=m-bigearthnet", "batch_size=4", "epochs=100",
        "blr=0.0128", "min_lr=2e-4", "weight_decay=0.0", "smoothing=0.0", "drop_path=0.0", "layer_decay=1.0",
        f"run.storage_path={tmp_path}", "run.name=ben", "run.cpus_per_worker=1", "checkpoint_every=25",
        "tracking.mlflow=true", "tracking.tensorboard=true", "tracking.experiment=evaluation",
    ])
    results = finetune(config)
    history = results["history"]
    assert len(history) == 100 and results["selected_epoch"] == 99
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    assert history[-1]["train_metric"] == 1.0  # micro F1 over the 4 training patches
    assert 0.0 <= results["test_metric"] <= 1.0
    saved = json.loads((tmp_path / "ben" / "results.json").read_text())
    assert saved["test_metric"] == results["test_metric"] and saved["encoder"] == "random"

    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("evaluation").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["mpmae.task"] == "m-bigearthnet"
    assert run.data.params["mode"] == "finetune" and run.data.params["epochs"] == "100"
    val = client.get_metric_history(run.info.run_id, "val_metric")
    assert [m.step for m in val] == list(range(1, 101))
    assert [m.value for m in val] == pytest.approx([h["val_metric"] for h in history])
    assert run.data.metrics["test_metric"] == pytest.approx(results["test_metric"])
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["results.json"]
    events = EventAccumulator(str(tmp_path / "ben" / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("train_loss")] == pytest.approx([h["train_loss"] for h in history])
    # checkpoints every 25 epochs (Ray keeps the newest), then the final one with the selected weights
    kept = {p.name for p in (tmp_path / "ben").glob("epoch-*")}
    assert kept and kept <= {"epoch-0025", "epoch-0050", "epoch-0075", "epoch-0100"}
    assert (tmp_path / "ben" / "final" / "complete.json").is_file()
    with pytest.raises(FileExistsError, match="results.json already exists"):
        finetune(config)
