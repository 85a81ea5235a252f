"""The fine-tuning classifier (docs/method.md) on a features-only encoder, and the head initialisation it shares with
the linear probe (so a probe's head plugs into it as is)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mpmae.models.convnextv2 import ConvNeXtV2, encoder_layer_id, grn_parameters

HEAD_INIT_STD = 2e-5


def new_head(in_features: int, num_classes: int, generator: torch.Generator | None = None) -> nn.Linear:
    """A fresh linear head: weight truncated normal, std 2e-5 cut at 2 std (the reference's), bias 0."""
    head = nn.Linear(in_features, num_classes)
    nn.init.trunc_normal_(head.weight, std=HEAD_INIT_STD, a=-2 * HEAD_INIT_STD, b=2 * HEAD_INIT_STD,
                          generator=generator)
    nn.init.zeros_(head.bias)
    return head


class Classifier(nn.Module):
    """Encoder, global average pool, LayerNorm, linear head.

    The norm and head live here (``norm.*``, ``head.*``), not in the encoder, so that the encoder stays
    the features-only export and fine-tuning states keep their keys.
    """

    def __init__(self, encoder: ConvNeXtV2, num_classes: int) -> None:
        super().__init__()
        if not encoder.features_only:
            raise ValueError("expected a features_only encoder")
        self.encoder = encoder
        self.norm = nn.LayerNorm(encoder.dims[-1], eps=1e-6)
        self.head = new_head(encoder.dims[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.encoder.forward_features(x).mean(dim=(-2, -1))))

    def no_weight_decay(self) -> set[str]:
        return grn_parameters(self)

    def layer_id(self, name: str) -> int:
        """The encoder's layer ids; the norm and head on top."""
        return encoder_layer_id(self.encoder, name)
