"""A run started again after its latest checkpoint was cut short resumes, on Ray Train, from the one before."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from mpmae.checkpoint import load_checkpoint
from mpmae.config import PretrainConfig, load_config
from mpmae.data.synth import write_synthetic_mmearth
from mpmae.train.trainer import pretrain
from tests.crafted.checkpoints import truncated

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.ray]
STEPS_PER_EPOCH = 4  # 32 train tiles, batch 8 over 2 workers


@pytest.mark.timeout(400)
def test_a_truncated_latest_checkpoint_is_skipped_on_resume(
        ray_cluster: object, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = write_synthetic_mmearth(tmp_path / "data", tiles=40, seed=3)
    config = load_config(PretrainConfig, REPO / "configs" / "demo.yaml", [
        f"data.path={data}", f"run.storage_path={tmp_path / 'runs'}", "run.name=cut", "optim.batch_size=8",
        "optim.epochs=2", "model.decoder_dim=64", "run.max_failures=0",
    ])
    pretrain(config)
    run = tmp_path / "runs" / "cut"
    truncated(run / "epoch-0002" / "state.pt")  # Ray's record still names it as the latest

    with caplog.at_level(logging.WARNING, logger="mpmae.checkpoint"):
        result = pretrain(config)  # max_failures=0: a worker failing to load it would fail the run
    assert f"skipping a checkpoint: {run / 'epoch-0002' / 'state.pt'}: incomplete" in caplog.text
    assert Path(result.checkpoint.path).name == "epoch-0002.1"  # the broken one is neither reused nor lost
    payload = load_checkpoint(result.checkpoint.path)
    assert payload["epoch"] == 2 and payload["step"] == 2 * STEPS_PER_EPOCH
    assert [h["epoch"] for h in payload["history"]] == [0, 1]
    assert (run / "epoch-0002" / "state.pt").is_file()
