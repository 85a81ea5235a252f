"""The probe table on synthetic data (fine-tuning on real BigEarthNet pixels: tests/external/test_finetune_real.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mpmae.data.synth import write_synthetic_mmearth
from mpmae.evaluation.probe_table import probe_table
from mpmae.tables import format_table


def test_probe_table_on_the_held_out_land_cover_task(tmp_path: Path) -> None:
    data = write_synthetic_mmearth(tmp_path / "data", tiles=60, seed=4)
    rows = probe_table([None], "land_cover", data=data, epochs=20)
    assert rows[0]["encoder"] == "random init" and rows[0]["train_samples"] == 6
    assert 0.0 <= rows[0]["score"] <= 1.0
    assert "random init  land_cover" in format_table(rows, ["encoder", "task", "score"])
    with pytest.raises(ValueError, match="needs --data"):
        probe_table([None], "land_cover")
