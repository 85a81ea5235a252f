"""Pictures of a pretraining checkpoint: what the model reconstructs, and how its losses fell.

`write_reconstructions` runs a checkpoint on a few tiles with a seeded mask and writes, per pixel-level
task, one PNG whose rows are tiles and whose columns are the masked Sentinel-2 input, the target and the
reconstruction. As in MAE, the reconstruction shows predictions only in masked patches and the target in
visible ones, because only masked patches are scored. Image-level tasks go to a JSON file of predicted and
target values. `plot_loss_curves` draws the per-epoch metrics a checkpoint carries. Figures are drawn
with matplotlib's Agg canvas directly (no pyplot state, no display) and every file is written atomically.

The checkpoint and the output folder may be URIs (``s3://...``): the checkpoint is downloaded, the files are
drawn into a temporary folder and uploaded when all are drawn, and a file already in the store is never
replaced (a local output folder is drawn into directly, its files rewritten). The data stay a local folder.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor

import mpmae.storage as storage
from mpmae.atomic import atomic_write, atomic_write_json
from mpmae.checkpoint import STATE_FILE, find_checkpoint, load_weights
from mpmae.config import PretrainConfig, from_dict
from mpmae.data.mmearth import MMEarthDataset
from mpmae.export import fetched
from mpmae.modalities import IMAGE_TASKS, MODALITIES, Selection
from mpmae.models.mpmae import INPUT_MODALITY, MPMAE, MPMAEOutput, random_mask
from mpmae.pretext_losses import NORM_PIX_EPS, patchify

#: Sentinel-2 bands shown as red, green, blue.
RGB_BANDS = ("B4", "B3", "B2")
#: Grey painted over masked patches of the input.
MASK_GREY = 0.5
LOSS_CURVES_FILE = "loss_curves.png"
IMAGE_TASKS_FILE = "image_tasks.json"
#: Class colours: -1 (no label) black, then tab20's colours for class 0, 1, ... (enough for 11 classes).
PALETTE = np.concatenate([np.zeros((1, 3)), np.asarray(cast(ListedColormap, colormaps["tab20"]).colors)[:, :3]])


# -- arrays ---------------------------------------------------------------------------------------------


def unpatchify(x: Tensor, patch_size: int) -> Tensor:
    """Inverse of `mpmae.pretext_losses.patchify` for square images: (N, L, p*p*K) -> (N, K, H, W)."""
    n, length, width = x.shape
    p = patch_size
    side = math.isqrt(length)
    if side * side != length or width % (p * p):
        raise ValueError(f"cannot unpatchify {tuple(x.shape)} with patch size {p} into a square image")
    k = width // (p * p)
    x = x.reshape(n, side, side, p, p, k).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(n, k, side * p, side * p)


def mask_image(mask: Tensor, patch_size: int) -> Tensor:
    """The (N, L) patch mask (1 = masked) as an (N, 1, H, W) boolean pixel mask."""
    pixels = mask.bool().unsqueeze(-1).expand(-1, -1, patch_size * patch_size)
    return unpatchify(pixels, patch_size)


def denormalise_patches(pred: Tensor, target: Tensor, patch_size: int) -> Tensor:
    """Undo the norm-pix target normalisation of ``pred`` (N, L, p*p*K) with each target patch's statistics.

    The model predicts each patch standardised by the mean and (unbiased) variance of the patch's valid
    target values; putting those back is the standard MAE way to display such predictions. The result is
    only as good as the target's statistics: it borrows them, the model does not predict them.
    """
    t = patchify(target.float(), patch_size)
    valid = torch.isfinite(t)
    t = torch.where(valid, t, 0.0)
    valid = valid.float()
    count = valid.sum(dim=-1, keepdim=True)
    mean = (t * valid).sum(dim=-1, keepdim=True) / count.clamp_min(1)
    var = ((t - mean).square() * valid).sum(dim=-1, keepdim=True) / (count - 1).clamp_min(1)
    return pred * (var + NORM_PIX_EPS).sqrt() + mean


def composite(pred: Tensor, target: Tensor, pixel_mask: Tensor) -> Tensor:
    """The MAE reconstruction: ``pred`` where the pixel mask is set (masked patches), ``target`` elsewhere."""
    return torch.where(pixel_mask, pred.to(target.dtype), target)


def reconstruct(model: MPMAE, output: MPMAEOutput, batch: Mapping[str, Tensor], task: str) -> Tensor:
    """Task ``task``'s reconstruction in target space: (N, K, H, W) values, or (N, 1, H, W) class indices."""
    p = model.patch_size
    pred, target = output.preds[task].float(), batch[task]
    if MODALITIES[task].task == "segmentation":
        image = unpatchify(pred, p).argmax(dim=1, keepdim=True)
    else:
        if task == INPUT_MODALITY and model.config.norm_pix_loss:
            pred = denormalise_patches(pred, target, p)
        image = unpatchify(pred, p)
    return composite(image, target, mask_image(output.mask, p))


def center_crop(batch: Mapping[str, Tensor], size: int) -> dict[str, Tensor]:
    """Crop every pixel-level modality to its central ``size`` x ``size`` window (deterministic, unlike
    the training crop); image-level entries pass through."""
    out = dict(batch)
    for key, x in batch.items():
        if MODALITIES[key].level != "pixel":
            continue
        height, width = x.shape[-2:]
        if not 0 < size <= min(height, width):
            raise ValueError(f"crop size {size} does not fit {key!r} images of {height}x{width}")
        top, left = (height - size) // 2, (width - size) // 2
        out[key] = x[..., top:top + size, left:left + size]
    return out


# -- colours --------------------------------------------------------------------------------------------


def _robust_range(reference: np.ndarray) -> tuple[float, float]:
    """The 2nd and 98th percentile of the finite values: a colour scale that a few outliers cannot flatten."""
    finite = reference[np.isfinite(reference)]
    if not finite.size:
        return 0.0, 1.0
    low, high = np.percentile(finite, (2, 98))
    return float(low), max(float(high), float(low) + 1e-6)


def _stretch(x: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Scale ``x`` to [0, 1] by ``reference``'s robust range; NaN -> 0 (black)."""
    low, high = _robust_range(reference)
    return np.clip(np.nan_to_num((x - low) / (high - low), nan=0.0), 0.0, 1.0)


def rgb(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(3, H, W) bands -> (H, W, 3) display colours, each band stretched by the same band of ``reference``."""
    return np.stack([_stretch(image[c], reference[c]) for c in range(3)], axis=-1)


def class_colours(labels: np.ndarray) -> np.ndarray:
    """(H, W) class indices (-1 = no label) -> (H, W, 3) colours of the fixed `PALETTE`."""
    return PALETTE[np.clip(labels, -1, len(PALETTE) - 2) + 1]


def _rgb_indices(bands: Sequence[str]) -> list[int]:
    """Positions of B4, B3, B2 in the input bands; the first band three times if any is missing (grey)."""
    if all(b in bands for b in RGB_BANDS):
        return [bands.index(b) for b in RGB_BANDS]
    return [0, 0, 0]


# -- figures --------------------------------------------------------------------------------------------


def _new_figure(rows: int, cols: int, size: float = 2.2) -> tuple[Figure, np.ndarray]:
    figure = Figure(figsize=(cols * size, rows * size + 0.4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return figure, axes


def _save(figure: Figure, path: Path) -> Path:
    """Write a PNG under a temporary name, then rename, so a reader never sees half a file."""
    return atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))


def _draw(ax: Axes, task: str, image: np.ndarray, target: np.ndarray, input_rgb: list[int]) -> None:
    """One target or reconstruction panel, coloured on the scale of the tile's target."""
    if MODALITIES[task].task == "segmentation":
        ax.imshow(class_colours(image[0]), interpolation="nearest")
    elif task == INPUT_MODALITY:
        ax.imshow(rgb(image[input_rgb], target[input_rgb]), interpolation="nearest")
    else:
        low, high = _robust_range(target[0])
        cmap = colormaps["viridis"].with_extremes(bad="black")
        ax.imshow(np.ma.masked_invalid(image[0]), cmap=cmap, vmin=low, vmax=high, interpolation="nearest")


def _masked_input(s2: np.ndarray, pixel_mask: np.ndarray, input_rgb: list[int]) -> np.ndarray:
    """The input tile in colour with masked patches greyed."""
    colours = rgb(s2[input_rgb], s2[input_rgb])
    colours[pixel_mask[0]] = MASK_GREY
    return colours


def plot_task(task: str, tile_ids: Sequence[str], s2: np.ndarray, pixel_mask: np.ndarray,
              target: np.ndarray, recon: np.ndarray, selection: Selection, path: Path) -> Path:
    """One PNG for a pixel-level task: a row per tile of masked input, target and reconstruction."""
    input_rgb = _rgb_indices(selection[INPUT_MODALITY])
    figure, axes = _new_figure(len(tile_ids), 3)
    if MODALITIES[task].task == "segmentation":
        shown = "classes"
    else:
        shown = "RGB" if task == INPUT_MODALITY else selection[task][0]
    for col, title in enumerate(("masked input (S2 RGB)", f"target ({shown})", "reconstruction")):
        axes[0, col].set_title(title, fontsize=9)
    for row, tile in enumerate(tile_ids):
        axes[row, 0].imshow(_masked_input(s2[row], pixel_mask[row], input_rgb), interpolation="nearest")
        axes[row, 0].set_ylabel(tile, fontsize=7)
        for col, image in enumerate((target[row], recon[row]), start=1):
            _draw(axes[row, col], task, image, target[row], input_rgb)
    figure.suptitle(task, fontsize=10)
    return _save(figure, path)


# -- image-level tasks ----------------------------------------------------------------------------------


def _json_values(x: Tensor) -> list:
    """Floats with NaN and infinities as null (JSON has neither)."""
    return [[v if math.isfinite(v) else None for v in row] for row in x.tolist()]


def image_task_table(output: MPMAEOutput, batch: Mapping[str, Tensor], tasks: Sequence[str]) -> dict:
    """Predicted vs target values of the image-level tasks: class indices for classification tasks,
    z-scored values (the model's output space) for regression tasks."""
    table = {}
    for task in tasks:
        pred, target = output.preds[task].float(), batch[task]
        if MODALITIES[task].task == "classification":
            table[task] = {"kind": "class", "target": target.argmax(dim=-1).tolist(),
                           "prediction": pred.argmax(dim=-1).tolist()}
        else:
            table[task] = {"kind": "z-score", "bands": list(MODALITIES[task].bands),
                           "target": _json_values(target.float()), "prediction": _json_values(pred)}
    return table


# -- entry points ---------------------------------------------------------------------------------------


def load_model(payload: Mapping[str, Any], file: Path | str = STATE_FILE) -> tuple[MPMAE, PretrainConfig]:
    """The checkpoint's model in eval mode on the CPU, and its run config (``file``: the checkpoint, for errors)."""
    config = from_dict(PretrainConfig, payload["config"])
    model = MPMAE(config.model)
    load_weights(model, payload["model"], file)
    return model.eval(), config


def _open_split(data: Path | str, split: str, model: MPMAE) -> MMEarthDataset:
    """The split holding the tiles to show; the train split if ``split`` is empty (small folders)."""
    dataset = MMEarthDataset(data, split, model.selection)
    if len(dataset) == 0 and split != "train":
        dataset = MMEarthDataset(data, "train", model.selection)
    if len(dataset) == 0:
        raise ValueError(f"{data}: splits {split!r} and 'train' hold no tiles")
    return dataset


def _output_names(model: MPMAE) -> list[str]:
    """The files the reconstructions of ``model``'s tasks go to."""
    names = [f"recon_{task}.png" for task in model.tasks if MODALITIES[task].level == "pixel"]
    return names + ([IMAGE_TASKS_FILE] if any(t in IMAGE_TASKS for t in model.tasks) else [])


def _check_output(out_dir: str, names: Sequence[str]) -> None:
    """A URI output folder must be reachable and hold none of ``names``: nothing in a store is replaced.
    (A local output folder's files are rewritten, as by every earlier version.)"""
    if not storage.is_uri(out_dir):
        return
    storage.check_reachable(out_dir, "out")
    present = storage.file_sizes(out_dir)
    taken = [name for name in names if name in present]
    if taken:
        raise FileExistsError(f"{storage.join(out_dir, taken[0])} already exists; nothing was overwritten "
                              "(choose another output folder)")


def _check_data(data: Path | str) -> None:
    if storage.is_uri(data):
        raise ValueError(f"{data}: the data to draw tiles from must be a local MMEarth folder (h5 files), "
                         "not a URI; download it first")


def _reconstructions(model: MPMAE, config: PretrainConfig, data: Path | str, out_dir: Path, tiles: int,
                     split: str, seed: int) -> list[Path]:
    dataset = _open_split(data, split, model)
    raw = dataset.read_batch(np.arange(min(tiles, len(dataset))))
    tile_ids = raw.pop("id")
    raw = {name: torch.from_numpy(values) for name, values in raw.items()}
    batch = center_crop(raw, config.data.crop_size)
    n, side = len(tile_ids), config.data.crop_size // model.patch_size
    mask = random_mask(n, side * side, model.config.mask_ratio, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        output = model(batch, mask)
    s2 = batch[INPUT_MODALITY].numpy()
    pixel_mask = mask_image(mask, model.patch_size).numpy()
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for task in model.tasks:
        if MODALITIES[task].level != "pixel":
            continue
        recon = reconstruct(model, output, batch, task).numpy()
        written.append(plot_task(task, tile_ids, s2, pixel_mask, batch[task].numpy(), recon, model.selection,
                                 out_dir / f"recon_{task}.png"))
    image_tasks = [t for t in model.tasks if t in IMAGE_TASKS]
    if image_tasks:
        table = {"split": dataset.split, "tiles": tile_ids, "tasks": image_task_table(output, batch, image_tasks)}
        written.append(atomic_write_json(out_dir / IMAGE_TASKS_FILE, table, allow_nan=False))
    return written


def _shown(written: Sequence[Path], local: Path, out_dir: str) -> list[Path | str]:
    """The written files as the caller named their folder: the paths when local, else the URIs."""
    if not storage.is_uri(out_dir):
        return list(written)
    return [storage.join(out_dir, path.relative_to(local).as_posix()) for path in written]


def write_reconstructions(checkpoint: Path | str, data: Path | str, out_dir: Path | str, tiles: int = 4,
                          split: str = "val", seed: int = 0) -> list[Path | str]:
    """Reconstruction PNGs (``recon_<task>.png``) of every pixel-level task and ``image_tasks.json``.

    Reads the first ``tiles`` tiles of ``split`` (the train split if ``split`` is empty), crops them
    centrally to the run's crop size and masks them with a mask drawn from ``seed``, so repeated calls
    show the same picture. Sentinel-2 is shown in RGB (B4, B3, B2), other regression targets as their
    first band on the target's 2nd-98th percentile, class maps in a fixed palette (no label black).
    With norm-pix loss the Sentinel-2 predictions are de-normalised with each target patch's mean and std.
    ``checkpoint`` and ``out_dir`` may be URIs (see the module's notes); the files are returned as written
    (URIs for a URI ``out_dir``).
    """
    if tiles < 1:
        raise ValueError(f"tiles must be at least 1, got {tiles}")
    _check_data(data)
    target = str(out_dir)
    with fetched(checkpoint, "checkpoint") as local:
        file, payload = find_checkpoint(local)
        model, config = load_model(payload, file)
        _check_output(target, _output_names(model))
        with storage.output_folder(target) as folder:
            written = _reconstructions(model, config, data, folder, tiles, split, seed)
    return _shown(written, folder, target)


def plot_loss_curves(history: Sequence[Mapping[str, float]], out: Path | str) -> Path:
    """One PNG of the total loss and every ``loss/<task>`` per epoch, with the learning rate below.

    The y axis is logarithmic when every loss is positive (the uncertainty-weighted total can be negative).
    """
    if not history:
        raise ValueError("the metrics history is empty: nothing to plot")
    out = Path(out)
    epochs = [h.get("epoch", i) for i, h in enumerate(history)]
    keys = ["loss", *sorted({k for h in history for k in h if k.startswith("loss/")})]
    figure = Figure(figsize=(8, 7), layout="constrained")
    FigureCanvasAgg(figure)
    loss_ax, lr_ax = figure.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    values = []
    for key in keys:
        series = [float(h.get(key, math.nan)) for h in history]
        values += [v for v in series if math.isfinite(v)]
        loss_ax.plot(epochs, series, marker="o", markersize=3, label=key,
                     linewidth=2.0 if key == "loss" else 1.0)
    if values and min(values) > 0:
        loss_ax.set_yscale("log")
    loss_ax.set_ylabel("loss")
    loss_ax.legend(fontsize=7, ncol=2)
    lr_ax.plot(epochs, [float(h.get("lr", math.nan)) for h in history], marker="o", markersize=3)
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("epoch")
    lr_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    out.parent.mkdir(parents=True, exist_ok=True)
    return _save(figure, out)


def visualize(checkpoint: Path | str, data: Path | str, out_dir: Path | str, tiles: int = 4) -> list[Path | str]:
    """Everything `mpmae visualize` writes: the loss curves of the run, then the reconstructions.

    ``checkpoint`` and ``out_dir`` may be URIs: nothing already in a store's output folder is replaced
    (refused, naming the file, before anything is drawn); ``data`` is a local MMEarth folder.
    """
    if tiles < 1:
        raise ValueError(f"tiles must be at least 1, got {tiles}")
    _check_data(data)
    target = str(out_dir)
    with fetched(checkpoint, "checkpoint") as local:
        file, payload = find_checkpoint(local)
        model, config = load_model(payload, file)
        _check_output(target, [LOSS_CURVES_FILE, *_output_names(model)])
        with storage.output_folder(target) as folder:
            curves = plot_loss_curves(payload.get("history", []), folder / LOSS_CURVES_FILE)
            written = [curves, *_reconstructions(model, config, data, folder, tiles, "val", 0)]
    return _shown(written, folder, target)
