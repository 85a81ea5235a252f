"""U-Net segmentation model on the ConvNeXt V2 encoder (docs/method.md, Fine-tuning and linear probing recipe, D15).

Skips: the initial 3x3 conv's output (dims[0], full resolution) and every stage output, stage 0
included (the reference skips from the stem and drops stage 0). Decoder: from the last stage up,
each `UpsampleBlock` (nearest upsampling, 3x3 conv, LayerNorm, GELU) is followed by concatenation
with the skip of its resolution; the last one upsamples by ``stem_k`` to full resolution. Then a 3x3
block and a 1x1 head. For atto: 320->160, 320->80, 160->40, 80->40, 80->20, 20->K; no unused final norm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import Tensor, nn

from mpmae.models.convnextv2 import ConvNeXtV2, encoder_layer_id, grn_parameters, init_weights


class UpsampleBlock(nn.Sequential):
    """Nearest upsampling by ``scale`` (none for 1), 3x3 conv, channels-first LayerNorm, GELU."""

    def __init__(self, in_chans: int, out_chans: int, scale: int) -> None:
        upsample = [nn.Upsample(scale_factor=scale, mode="nearest")] if scale > 1 else []
        super().__init__(
            *upsample, nn.Conv2d(in_chans, out_chans, 3, padding=1), LayerNorm2d(out_chans, eps=1e-6), nn.GELU()
        )


class UNet(nn.Module):
    """``forward(x) -> (N, num_classes, H, W)`` logits at the input's resolution.

    Inputs whose sides are not multiples of the patch size are zero-padded at the bottom/right and the
    logits cropped back. The encoder (``self.encoder``) must be features-only with the modified stem and
    the default padding (3x3 conv "same", unpadded stem), so that every skip lines up.
    """

    def __init__(self, encoder: ConvNeXtV2, num_classes: int) -> None:
        super().__init__()
        conventions = encoder.conventions
        if not encoder.features_only or encoder.stem_type != "modified":
            raise ValueError("the U-Net needs a features_only encoder with the modified stem")
        if conventions.initial_conv_padding != 1 or conventions.pad_stem:
            raise ValueError("the U-Net needs the default architecture's padding (docs/method.md, D9)")
        self.encoder = encoder
        d = encoder.dims
        stem_k = encoder.patch_size // 2 ** (len(d) - 1)
        self.up = nn.ModuleList(
            [UpsampleBlock(d[-1], d[-2], 2)]
            + [UpsampleBlock(2 * d[i], d[i - 1], 2) for i in range(len(d) - 2, 0, -1)]
            + [UpsampleBlock(2 * d[0], d[0], stem_k)]
        )
        self.fuse = UpsampleBlock(2 * d[0], d[0] // 2, 1)
        self.head = nn.Conv2d(d[0] // 2, num_classes, kernel_size=1)
        for module in (self.up, self.fuse, self.head):
            module.apply(init_weights)

    def encode(self, x: Tensor) -> list[Tensor]:
        """The skips, finest first: initial conv output, then the four stage maps."""
        return self.encoder.forward_intermediates(x, include_stem=True)

    def no_weight_decay(self) -> set[str]:
        return grn_parameters(self)

    def layer_id(self, name: str) -> int:
        """The encoder's layer ids; the decoder and head on top."""
        return encoder_layer_id(self.encoder, name)

    def decode(self, maps: list[Tensor]) -> Tensor:
        """Logits at the resolution of the finest skip."""
        y = maps[-1]
        for block, skip in zip(self.up, reversed(maps[:-1]), strict=True):
            y = torch.cat([block(y), skip], dim=1)
        return self.head(self.fuse(y))

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        p = self.encoder.patch_size
        x = F.pad(x, (0, -width % p, 0, -height % p))
        return self.decode(self.encode(x))[..., :height, :width]
