"""The ConvNeXt V2 encoder with MMEarth's stem, masked so that it computes what a sparse encoder computes.

Masked pretraining follows the dense emulation of sparse convolution (docs/method.md, Encoder and masking): a binary
visibility map ``v`` (1 = visible) is kept at every resolution; the input is zeroed with it, the output of
every spatial op is multiplied by it (this removes bias and leakage into masked sites, and the zero-padded
border behaves like an inactive site), and GRN takes its per-sample statistics over visible positions only.
Pointwise ops need no masking. With every patch visible this is exactly the plain dense network used for
fine-tuning, so pretraining and fine-tuning see the same function.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d, trunc_normal_
from torch import Tensor, nn

from mpmae.architectures import STEMS, Conventions, ConvNeXtSpec, get_conventions, get_spec


class GRN(nn.Module):
    """Global response normalisation on channels-last features, optionally over visible positions only.

    The parameter shape ``(1, 1, 1, C)`` is the reference's, so checkpoints load without reshaping.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: Tensor, visible: Tensor | None = None) -> Tensor:
        """``x``: (N, ..., C), statistics per sample over all middle dims; ``visible``: 0/1, (N, ..., 1)."""
        rows = x.flatten(1, -2)
        seen = rows if visible is None else (x * visible).flatten(1, -2)
        g = torch.linalg.vector_norm(seen, dim=1, keepdim=True)
        scale = 1 + self.gamma.view(1, 1, -1) * g / (g.mean(dim=-1, keepdim=True) + self.eps)
        return torch.addcmul(self.beta.view(1, 1, -1), rows, scale).view_as(x)


class Visibility:
    """A patch mask (N, h, w), 1 = masked, seen at the resolution of any stage.

    With ``num_visible`` (every sample shows that many patches) it also gathers the visible sites of a
    map into dense rows and scatters rows back, so that pointwise layers skip the masked sites.
    """

    def __init__(self, mask: Tensor, num_visible: int | None = None) -> None:
        self.mask = mask
        self.indices: Tensor | None = None
        if num_visible is not None:
            self.indices = torch.argsort(mask.flatten(1), dim=1, stable=True)[:, :num_visible]
        self._maps: dict[tuple[int, int, torch.dtype], Tensor] = {}
        self._site_index: dict[int, Tensor] = {}

    def map(self, size: tuple[int, int] | torch.Size, dtype: torch.dtype) -> Tensor:
        """(N, 1, H, W) visibility at a multiple of the patch grid, 1 = visible."""
        key = (size[0], size[1], dtype)
        if key not in self._maps:
            scale = size[0] // self.mask.shape[1]
            v = (1 - self.mask.to(dtype)).unsqueeze(1)
            self._maps[key] = v.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
        return self._maps[key]

    def _sites(self, cells: int) -> Tensor:
        """(N, S, 1) flat site indices of the visible patches on a grid with ``cells`` sites per patch side."""
        if cells not in self._site_index:
            assert self.indices is not None, "gathering needs num_visible"
            w = self.mask.shape[2]
            row, col = self.indices // w, self.indices % w
            offsets = torch.arange(cells, device=self.mask.device)
            offsets = (offsets[:, None] * w * cells + offsets[None, :]).flatten()
            base = row * cells * w * cells + col * cells
            self._site_index[cells] = (base.unsqueeze(-1) + offsets).flatten(1).unsqueeze(-1)
        return self._site_index[cells]

    def gather(self, x: Tensor) -> Tensor:
        """The visible sites of channels-last ``x`` (N, H, W, C) as (N, S, C) rows."""
        n, height, width, ch = x.shape
        idx = self._sites(height // self.mask.shape[1])
        return x.reshape(n, height * width, ch).gather(1, idx.expand(-1, -1, ch))

    def scatter(self, rows: Tensor, like: Tensor) -> Tensor:
        """Rows from `gather` back into a zero channels-last map shaped like ``like`` (N, H, W, C)."""
        n, height, width, ch = like.shape
        idx = self._sites(height // self.mask.shape[1])
        out = rows.new_zeros(n, height * width, ch).scatter(1, idx.expand(-1, -1, ch), rows)
        return out.view(n, height, width, ch)


class Block(nn.Module):
    """ConvNeXt V2 block: 7x7 depthwise conv, LayerNorm, MLP with GRN, residual (no layer scale)."""

    def __init__(self, dim: int, drop_path: float = 0.0, grn_eps: float = 1e-6) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.grn = GRN(4 * dim, eps=grn_eps)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def mlp(self, x: Tensor, visible: Tensor | None = None) -> Tensor:
        """The pointwise part on channels-last features (N, ..., C)."""
        return self.pwconv2(self.grn(self.act(self.pwconv1(self.norm(x))), visible))

    def forward(self, x: Tensor, vis: Visibility | None = None) -> Tensor:
        """``x``: (N, C, H, W), zero at the masked sites of ``vis``; the output is too.

        Dense path: the residual branch is masked, which stands for re-masking after the depthwise conv
        since everything between is pointwise. Gathered path: the pointwise part runs on visible sites only.
        """
        y = self.dwconv(x).permute(0, 2, 3, 1)
        if vis is None:
            y = self.mlp(y)
        elif vis.indices is None:
            v = vis.map(x.shape[-2:], x.dtype).permute(0, 2, 3, 1)
            y = self.mlp(y, v) * v
        else:
            y = vis.scatter(self.mlp(vis.gather(y)), y)
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class ConvNeXtV2(nn.Module):
    """ConvNeXt V2 with MMEarth's stem; ``stem_k = patch_size / 8``, so the last stage's grid is the patch grid.

    ``stem="modified"`` (default, all MMEarth experiments): ``initial_conv`` = 3x3 conv -> LayerNorm -> GELU,
    then ``stem`` = depthwise conv with kernel = stride = ``stem_k`` -> LayerNorm. ``stem="original"``
    (ConvNeXt V2's, the reference's ``--use_orig_stem``): ``stem_orig`` = one conv ``in_chans -> dims[0]``
    with kernel = stride = ``stem_k`` -> LayerNorm, unpadded under either architecture (as in the
    reference). Module names are the reference's, so its checkpoints map key for key.

    The timm encoder API: ``forward_intermediates`` returns the four stage maps (masked when a patch
    mask is given), ``forward_features`` the last one, ``forward_head`` pools, norms and classifies it,
    ``forward`` chains the two (``num_classes=0``: the pooled, normed feature). ``features_only=True``
    leaves out the final norm and head (the masked pretraining encoder, or a U-Net backbone): ``forward``
    then returns the four stage maps, as a timm ``features_only`` model does, and ``forward_head`` norms
    without affine parameters (the reference's untrained final norm: the linear-probe feature).
    """

    def __init__(
        self,
        in_chans: int,
        arch: str | ConvNeXtSpec = "atto",
        patch_size: int = 8,
        num_classes: int = 0,
        drop_path_rate: float = 0.0,
        architecture: str = "default",
        features_only: bool = False,
        stem: str = "modified",
    ) -> None:
        super().__init__()
        spec = get_spec(arch)
        self.conventions: Conventions = get_conventions(architecture)
        self.dims = spec.dims
        self.patch_size = patch_size
        stem_k = patch_size // 2 ** (len(spec.dims) - 1)
        if stem_k < 1 or stem_k * 2 ** (len(spec.dims) - 1) != patch_size:
            raise ValueError(f"patch_size must be a multiple of 8, got {patch_size}")
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
        self.stem_type = stem
        d0, conv = spec.dims[0], self.conventions
        if stem == "original":
            self.stem_orig = nn.Sequential(
                nn.Conv2d(in_chans, d0, kernel_size=stem_k, stride=stem_k), LayerNorm2d(d0, eps=1e-6)
            )
        else:
            self.initial_conv = nn.Sequential(
                nn.Conv2d(in_chans, d0, kernel_size=3, padding=conv.initial_conv_padding),
                LayerNorm2d(d0, eps=1e-6),
                nn.GELU(),
            )
            pad = stem_k // 2 if conv.pad_stem else 0
            self.stem = nn.Sequential(
                nn.Conv2d(d0, d0, stem_k, stride=stem_k, padding=pad, groups=d0), LayerNorm2d(d0, eps=1e-6)
            )
        self.downsample_layers = nn.ModuleList(
            nn.Sequential(LayerNorm2d(a, eps=1e-6), nn.Conv2d(a, b, kernel_size=2, stride=2))
            for a, b in zip(spec.dims[:-1], spec.dims[1:], strict=True)
        )
        rates = torch.linspace(0, drop_path_rate, sum(spec.depths), device="cpu").tolist()  # meta-safe
        starts = [sum(spec.depths[:i]) for i in range(len(spec.depths))]
        self.stages = nn.ModuleList(
            nn.Sequential(*(Block(dim, rates[start + j], conv.grn_eps) for j in range(depth)))
            for dim, depth, start in zip(spec.dims, spec.depths, starts, strict=True)
        )
        self.features_only = features_only
        if not features_only:  # masked pretraining never uses them: no parameters left without gradient
            self.norm = nn.LayerNorm(spec.dims[-1], eps=1e-6)
            self.head = nn.Linear(spec.dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_weights)

    @property
    def depths(self) -> tuple[int, ...]:
        """Blocks per stage, read off the modules."""
        return tuple(len(cast(nn.Sequential, stage)) for stage in self.stages)

    def forward_intermediates(
        self, x: Tensor, mask: Tensor | None = None, num_visible: int | None = None, include_stem: bool = False
    ) -> list[Tensor]:
        """The four stage maps of ``x`` (N, C, H, W); ``mask`` (N, H/p, W/p), 1 = masked, or None.

        Default architecture: masked sites are zero in every returned map; ``num_visible``, the number of
        visible patches of every sample if they are all equal, lets the blocks skip masked sites (same
        result, less work). Reference architecture: the mask only zeroes the input pixels.
        ``include_stem``: the initial conv's full-resolution output comes first (the U-Net's finest skip).
        """
        if include_stem and self.stem_type != "modified":
            raise ValueError("include_stem needs the modified stem (the original stem has no initial conv)")
        x = x.contiguous(memory_format=torch.channels_last)
        vis = None
        if mask is not None:
            seen = Visibility(mask, num_visible)
            x = x * seen.map(x.shape[-2:], x.dtype)
            vis = seen if self.conventions.remask else None

        def run(layer: nn.Module, t: Tensor) -> Tensor:
            t = layer(t)
            return t if vis is None else t * vis.map(t.shape[-2:], t.dtype)

        maps = []
        if self.stem_type == "original":
            x = run(self.stem_orig, x)
        else:
            x = run(self.initial_conv, x)
            if include_stem:
                maps.append(x)
            x = run(self.stem, x)
        for i, stage in enumerate(self.stages):
            if i > 0:
                x = run(self.downsample_layers[i - 1], x)
            for block in cast(nn.Sequential, stage):
                x = block(x, vis)
            maps.append(x)
        return maps

    def forward_features(self, x: Tensor) -> Tensor:
        """The last stage map (N, dims[-1], H/p, W/p), as timm's ``forward_features``."""
        return self.forward_intermediates(x)[-1]

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Global average pool -> final norm -> head on a last-stage map; ``pre_logits``: skip the head.

        A features-only encoder has no norm or head: it norms without affine parameters and only
        ``pre_logits=True`` is possible.
        """
        pooled = x.mean(dim=(-2, -1))
        if self.features_only:
            if not pre_logits:
                raise RuntimeError("this encoder was built with features_only=True: it has no head")
            return F.layer_norm(pooled, pooled.shape[-1:], eps=1e-6)
        normed = self.norm(pooled)
        return normed if pre_logits else self.head(normed)

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        """The head's output, or with ``features_only`` the four unmasked stage maps (U-Net skips)."""
        if self.features_only:
            return self.forward_intermediates(x)
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh head for ``num_classes`` (0: none, ``forward`` gives the pooled, normed feature)."""
        if self.features_only:
            raise RuntimeError("this encoder was built with features_only=True: it has no head")
        self.head = nn.Linear(self.dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.head.apply(init_weights)

    def set_drop_path(self, rate: float) -> None:
        """Drop-path rates ``linspace(0, rate)`` over the blocks in order, replacing the current ones."""
        blocks = [block for stage in self.stages for block in cast(nn.Sequential, stage)]
        for block, block_rate in zip(blocks, torch.linspace(0, rate, len(blocks)).tolist(), strict=True):
            block.drop_path = DropPath(block_rate) if block_rate > 0 else nn.Identity()

    def no_weight_decay(self) -> set[str]:
        """Parameters exempt from weight decay beyond the 1-D ones (see `grn_parameters`)."""
        return grn_parameters(self)

    def layer_id(self, name: str) -> int:
        """Layer-decay id of a parameter name: 0 the stem, then one per block (a downsampling layer takes
        its next block's id), ``sum(depths) + 1`` for the final norm and head."""
        depths = self.depths
        parts = name.split(".")
        if parts[0] in INPUT_END:
            return 0
        if parts[0] == "stages":
            stage, block = int(parts[1]), int(parts[2])
            return sum(depths[:stage]) + block + 1
        if parts[0] == "downsample_layers":
            return sum(depths[: int(parts[1]) + 1]) + 1
        return sum(depths) + 1


#: The modules before the first stage: layer id 0.
INPUT_END = ("initial_conv", "stem", "stem_orig")


def grn_parameters(module: nn.Module) -> set[str]:
    """Names of every GRN gamma/beta in ``module``: norm parameters, so never weight-decayed.

    The reference decays them (and the mask token) in pretraining but not in fine-tuning (docs/method.md, D11).
    """
    return {f"{name}.{p}" for name, m in module.named_modules() if isinstance(m, GRN) for p in ("gamma", "beta")}


def encoder_layer_id(encoder: ConvNeXtV2, name: str, prefix: str = "encoder.") -> int:
    """Layer id in a model holding ``encoder`` at ``prefix``; everything else (head, decoder) is on top."""
    if name.startswith(prefix):
        return encoder.layer_id(name[len(prefix):])
    return sum(encoder.depths) + 1


def init_weights(module: nn.Module) -> None:
    """Truncated normal std 0.02 for every conv and linear layer, zero bias (docs/method.md, D10)."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)

