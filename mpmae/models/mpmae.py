"""The multi-pretext masked autoencoder: masked encoder, mask tokens, decoder trunk, one head per task.

Data flow: ``batch["sentinel2"]`` (sanitised: NaN/inf -> 0, the band mean) -> masked ConvNeXt V2 ->
1x1 projection to ``decoder_dim`` -> mask tokens at masked patches -> decoder trunk (one ConvNeXt V2 block
per depth) -> heads. A pixel-level head is a linear map from a patch's feature to its ``p*p*K`` values; an
image-level head is LayerNorm -> global average pool -> linear. Class and channel counts come from the
modality registry.

``decoder="shared"`` runs one trunk once for all tasks (the released checkpoints' weights,
docs/method.md, D8); ``decoder="per_task"`` gives each task its own trunk (the paper's figure). Image-level heads share
one LayerNorm per trunk.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mpmae.config import ModelConfig
from mpmae.modalities import MODALITIES, Selection, resolve_selection, tasks_of
from mpmae.models.convnextv2 import Block, ConvNeXtV2, encoder_layer_id, grn_parameters, init_weights
from mpmae.pretext_losses import build_aggregator, task_loss

INPUT_MODALITY = "sentinel2"


@dataclass
class MPMAEOutput:
    """Total loss, per-task losses (tensors, no host sync), predictions and the patch mask (1 = masked).

    Pixel-level predictions are (N, L, p*p*K) in `mpmae.pretext_losses.patchify` layout; image-level (N, K).
    """

    loss: Tensor
    task_losses: dict[str, Tensor]
    preds: dict[str, Tensor] = field(repr=False)
    mask: Tensor = field(repr=False)


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Patches left visible per sample: ``floor(L * (1 - ratio))``, as the reference."""
    return int(num_patches * (1 - mask_ratio))


def random_mask(
    n: int, num_patches: int, mask_ratio: float, device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """(n, L) float mask, 1 = masked, with exactly `num_visible` zeros per row at random places."""
    if generator is None:  # torch.compile with dynamic shapes fails on rand(generator=None): sizes must be concrete
        noise = torch.rand(n, num_patches, device=device)
    else:
        noise = torch.rand(n, num_patches, device=device, generator=generator)
    rank = noise.argsort(dim=1).argsort(dim=1)
    return (rank >= num_visible(num_patches, mask_ratio)).float()


class MPMAE(nn.Module):
    """Multi-pretext masked autoencoder; ``forward(batch, mask=None) -> MPMAEOutput``.

    ``config`` is taken as given: `ModelConfig.validate` (via the run config) is where keys are checked.
    """

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or ModelConfig()
        self.selection: Selection = resolve_selection(config.targets)
        if INPUT_MODALITY not in self.selection:
            raise ValueError(f"the selection must contain {INPUT_MODALITY!r} (the encoder input)")
        if config.decoder not in ("shared", "per_task"):
            raise ValueError(f"decoder must be 'shared' or 'per_task', got {config.decoder!r}")
        self.tasks: list[str] = tasks_of(self.selection)
        self.patch_size = p = config.patch_size
        dim = config.decoder_dim
        self.encoder = ConvNeXtV2(
            len(self.selection[INPUT_MODALITY]), config.arch, p,
            drop_path_rate=config.drop_path, architecture=config.architecture, features_only=True,
            stem=config.stem,
        )
        grn_eps = self.encoder.conventions.grn_eps
        self.proj = nn.Conv2d(self.encoder.dims[-1], dim, kernel_size=1)
        self.mask_token = nn.Parameter(torch.zeros(1, dim, 1, 1))
        self.groups = {"shared": self.tasks} if config.decoder == "shared" else {t: [t] for t in self.tasks}
        self.decoder = nn.ModuleDict(
            {g: nn.Sequential(*(Block(dim, grn_eps=grn_eps) for _ in range(config.decoder_depth)))
             for g in self.groups}
        )
        self.image_norm = nn.ModuleDict(
            {g: nn.LayerNorm(dim, eps=1e-6) for g, ts in self.groups.items()
             if any(MODALITIES[t].level == "image" for t in ts)}
        )
        self.heads = nn.ModuleDict({t: nn.Linear(dim, self._head_width(t)) for t in self.tasks})
        self.loss_fn = build_aggregator(config.loss, self.tasks, config.task_weights)
        for module in (self.proj, self.decoder, self.heads):
            module.apply(init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def _head_width(self, task: str) -> int:
        modality = MODALITIES[task]
        width = modality.output_channels(self.selection[task])
        return width * self.patch_size**2 if modality.level == "pixel" else width

    def no_weight_decay(self) -> set[str]:
        """Beyond the 1-D parameters: every GRN gamma/beta (encoder and decoder) and the mask token."""
        return grn_parameters(self) | {"mask_token"}

    def layer_id(self, name: str) -> int:
        """Layer-decay id: the encoder's, with the decoder and heads on top."""
        return encoder_layer_id(self.encoder, name)

    @property
    def log_vars(self) -> dict[str, Tensor]:
        """The uncertainty weighting's log-variance per task (empty for other aggregations)."""
        log_vars = getattr(self.loss_fn, "log_vars", None)
        return {} if log_vars is None else dict(zip(self.tasks, log_vars.detach().unbind(), strict=True))

    def forward(self, batch: Mapping[str, Tensor], mask: Tensor | None = None) -> MPMAEOutput:
        """Encode the masked Sentinel-2 input, predict every task, score the predictions.

        ``mask``: (N, L) with 1 = masked, L = (H/p)*(W/p); drawn with ``config.mask_ratio`` when None.
        """
        missing = [t for t in self.tasks if t not in batch]
        if missing:
            raise ValueError(f"batch lacks pretext targets {missing}; it has {sorted(batch)}")
        x = torch.nan_to_num(batch[INPUT_MODALITY], nan=0.0, posinf=0.0, neginf=0.0)
        n, _, height, width = x.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"input side {height}x{width} is not divisible by the patch size {p}")
        grid = (height // p, width // p)
        visible = None  # known for masks drawn here: lets the encoder skip masked sites
        if mask is None:
            visible = num_visible(grid[0] * grid[1], self.config.mask_ratio)
            mask = random_mask(n, grid[0] * grid[1], self.config.mask_ratio, x.device)
        if mask.shape != (n, grid[0] * grid[1]):
            raise ValueError(f"mask must have shape {(n, grid[0] * grid[1])}, got {tuple(mask.shape)}")
        mask = mask.float()
        latent = self.encoder.forward_intermediates(x, mask.view(n, *grid), visible)[-1]
        if latent.shape[-2:] != grid:
            raise ValueError(
                f"encoder grid {tuple(latent.shape[-2:])} != patch grid {grid}: the reference architecture's "
                f"modified stem only keeps the patch grid for patch_size 16 and up (docs/method.md, D9)"
            )
        preds = self.decode(latent, mask)
        task_losses = {
            t: task_loss(MODALITIES[t], preds[t], batch[t], mask, p,
                         norm_pix=self.config.norm_pix_loss and t == INPUT_MODALITY)
            for t in self.tasks
        }
        loss = self.loss_fn(torch.stack([task_losses[t] for t in self.tasks]))
        return MPMAEOutput(loss, task_losses, preds, mask)

    def decode(self, latent: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """Predictions of every task from the (N, C, h, w) encoder map and the (N, L) patch mask."""
        n, _, h, w = latent.shape
        z = self.proj(latent)
        z = torch.where(mask.view(n, 1, h, w) > 0, self.mask_token.to(z.dtype), z)
        preds = {}
        for group, tasks in self.groups.items():
            y = self.decoder[group](z).permute(0, 2, 3, 1)  # (N, h, w, D)
            pooled = self.image_norm[group](y).mean(dim=(1, 2)) if group in self.image_norm else None
            for t in tasks:
                if MODALITIES[t].level == "pixel":
                    preds[t] = self.heads[t](y).reshape(n, h * w, -1)
                else:
                    preds[t] = self.heads[t](pooled)
        return preds

