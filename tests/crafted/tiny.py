"""Tiny encoders and separable synthetic problems for the evaluation and fine-tuning tests (their conftests
export the thread fixture)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from mpmae.architectures import ConvNeXtSpec
from mpmae.config import FinetuneConfig
from mpmae.models.convnextv2 import ConvNeXtV2

TINY = ConvNeXtSpec((1, 1, 1, 1), (8, 16, 32, 64))


def tiny_encoder(in_chans: int = 3, patch_size: int = 8, seed: int = 0) -> ConvNeXtV2:
    torch.manual_seed(seed)
    return ConvNeXtV2(in_chans, TINY, patch_size, features_only=True)


def recipe(lr: float, smoothing: float = 0.0, **fields: Any) -> FinetuneConfig:
    """A fine-tuning config whose lr is ``lr`` (blr at batch 256), unsmoothed unless asked."""
    return FinetuneConfig(batch_size=256, blr=lr, smoothing=smoothing, **fields)


def templated_images(n: int, num_classes: int, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images = one random template per class + small noise; labels balanced class indices."""
    g = torch.Generator().manual_seed(seed)
    templates = 2 * torch.randn(num_classes, 3, size, size, generator=torch.Generator().manual_seed(99))
    y = torch.arange(n) % num_classes
    return templates[y] + 0.1 * torch.randn(n, 3, size, size, generator=g), y


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    """Tiny tensors gain nothing from intra-op threads, and on a loaded machine spinning threads cost 30x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
