"""Tests of `mpmae.viz`: the array rules behind the pictures, and one end-to-end `visualize` run."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import pytest
import torch
from matplotlib.image import imread

from mpmae.checkpoint import TrainState, save_checkpoint
from mpmae.config import DataConfig, ModelConfig, PretrainConfig, to_dict
from mpmae.data.synth import write_synthetic_mmearth
from mpmae.modalities import IMAGE_TASKS, PIXEL_TASKS
from mpmae.models import MPMAE
from mpmae.pretext_losses import NORM_PIX_EPS, patchify
from mpmae.viz import (
    IMAGE_TASKS_FILE,
    LOSS_CURVES_FILE,
    composite,
    denormalise_patches,
    mask_image,
    plot_loss_curves,
    unpatchify,
    visualize,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HISTORY = [
    {"epoch": e, "step": 5 * (e + 1), "loss": 3.0 - e, "loss/sentinel2": 1.0 / (e + 1), "loss/biome": 2.0 - 0.5 * e,
     "lr": 1e-4 * (e + 1), "samples_per_s": 10.0, "weight/sentinel2": 1.0}
    for e in range(3)
]


def _assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 0 and image.shape[1] > 0


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A synthetic folder (2 val tiles) and an untrained all-task checkpoint with a 3-epoch history."""
    root = tmp_path_factory.mktemp("viz")
    data = write_synthetic_mmearth(root / "data", tiles=20, seed=0)
    config = PretrainConfig(data=DataConfig(path=str(data), crop_size=56), model=ModelConfig(decoder_dim=32))
    torch.manual_seed(0)
    model = MPMAE(config.model)
    optimizer = torch.optim.AdamW(model.parameters())
    state = TrainState(epoch=3, step=15, history=HISTORY)
    save_checkpoint(root / "ckpt", model, optimizer, state, to_dict(config), {}, lr=3e-4)
    return {"root": root, "data": data, "checkpoint": root / "ckpt"}


def test_unpatchify_inverts_patchify() -> None:
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(unpatchify(patchify(x, 4), 4), x)


def test_unpatchify_rejects_non_square_grids() -> None:
    with pytest.raises(ValueError, match="square"):
        unpatchify(torch.zeros(1, 6, 16), 4)


def test_mask_image_covers_exactly_the_masked_patches() -> None:
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    pixels = mask_image(mask, 2)[0, 0]
    assert pixels[:2, :2].all() and pixels[2:, 2:].all()
    assert not pixels[:2, 2:].any() and not pixels[2:, :2].any()


def test_reconstruction_is_target_on_visible_patches() -> None:
    target, pred = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 1.0]])
    pixels = mask_image(mask, 4).expand_as(target)
    recon = composite(pred, target, pixels)
    assert torch.equal(recon[~pixels], target[~pixels])
    assert torch.equal(recon[pixels], pred[pixels])


def test_denormalise_patches_inverts_norm_pix() -> None:
    target = torch.randn(1, 2, 8, 8) * 3 + 1
    target[0, 0, 0, 0] = float("nan")
    t = patchify(target, 4)
    valid = torch.isfinite(t)
    values = [row[ok] for row, ok in zip(t[0], valid[0], strict=True)]
    normalised = torch.stack([
        torch.where(ok, (row - v.mean()) / (v.var() + NORM_PIX_EPS).sqrt(), 0.0)
        for row, ok, v in zip(t[0], valid[0], values, strict=True)
    ])[None]
    restored = denormalise_patches(normalised, target, 4)
    torch.testing.assert_close(restored[valid], t[valid], rtol=1e-4, atol=1e-4)


def test_plot_loss_curves_writes_a_png_and_overwrites(tmp_path: Path) -> None:
    out = tmp_path / "curves" / "loss.png"
    assert plot_loss_curves(HISTORY, out) == out
    plot_loss_curves(HISTORY[:1], out)
    _assert_png(out)
    assert [p.name for p in out.parent.iterdir()] == ["loss.png"]


def test_plot_loss_curves_needs_a_history(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty"):
        plot_loss_curves([], tmp_path / "loss.png")


def test_visualize_writes_every_artefact(run: dict[str, Path]) -> None:
    out = run["root"] / "viz"
    written = visualize(run["checkpoint"], run["data"], out, tiles=4)
    expected = {LOSS_CURVES_FILE, IMAGE_TASKS_FILE, *(f"recon_{t}.png" for t in PIXEL_TASKS)}
    assert {p.name for p in written} == expected
    assert {p.name for p in out.iterdir()} == expected  # no temporary files left
    for path in written:
        if path.suffix == ".png":
            _assert_png(path)
    table = json.loads((out / IMAGE_TASKS_FILE).read_text())
    assert table["split"] == "val" and len(table["tiles"]) == 2
    assert set(table["tasks"]) == set(IMAGE_TASKS)
    for entry in table["tasks"].values():
        assert len(entry["target"]) == len(entry["prediction"]) == 2


def test_missing_checkpoint_is_a_clear_error(run: dict[str, Path]) -> None:
    with pytest.raises(FileNotFoundError, match="state.pt"):
        visualize(run["root"] / "nowhere", run["data"], run["root"] / "out")


def test_data_without_a_pretext_modality_is_named(run: dict[str, Path]) -> None:
    data = write_synthetic_mmearth(run["root"] / "no_aster", tiles=4, seed=1)
    (h5_path,) = data.glob("*.h5")
    with h5py.File(h5_path, "a") as h5:
        del h5["aster"]
    with pytest.raises(ValueError, match="aster"):
        visualize(run["checkpoint"], data, run["root"] / "out")
