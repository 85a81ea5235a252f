"""Material of the benchmark tests: the real GEO-Bench mini folder (m-bigearthnet: 4 train, 1 val, 1 test
patches; missing material is an error, never a skip), a tiny encoder export and a small MMEarth folder for
land_cover."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mpmae.data.synth import write_synthetic_mmearth
from mpmae.export import CARD_FILE, ENCODER_FILE
from mpmae.modalities import SENTINEL2_INPUT_BANDS
from tests.crafted.tiny import TINY, single_thread, tiny_encoder
from tests.external.conftest import realdata_dir

__all__ = ["single_thread"]


@pytest.fixture(scope="session")
def geobench_mini() -> Path:
    return realdata_dir() / "geobench_mini"


def write_tiny_export(folder: Path, seed: int = 0) -> Path:
    """An export of a one-block-per-stage encoder on the 12 Sentinel-2 input bands, patch 8."""
    folder.mkdir(parents=True)
    torch.save(tiny_encoder(len(SENTINEL2_INPUT_BANDS), seed=seed).state_dict(), folder / ENCODER_FILE)
    card = {"architecture": {"depths": list(TINY.depths), "dims": list(TINY.dims), "patch_size": 8,
                             "stem": "modified"}, "bands": list(SENTINEL2_INPUT_BANDS)}
    (folder / CARD_FILE).write_text(json.dumps(card))
    return folder


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_export(tmp_path_factory.mktemp("benchmark") / "tiny-export")


@pytest.fixture(scope="session")
def land_cover_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 synthetic tiles: 4 val tiles (2 to train, 2 to validate) and 4 test tiles for land_cover."""
    return write_synthetic_mmearth(tmp_path_factory.mktemp("benchmark") / "mmearth", tiles=40, seed=3)
