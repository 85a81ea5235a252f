"""Uncertainty weighting against the upstream reference's golden FCMAE run (golden_fcmae_tiny.npz)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mpmae.modalities import TASK_ORDER
from mpmae.pretext_losses import UncertaintyWeighting


def test_uncertainty_weighting_reproduces_the_golden_total(realdata: Path) -> None:
    golden = np.load(realdata / "golden" / "golden_fcmae_tiny.npz")
    agg = UncertaintyWeighting(len(TASK_ORDER))
    with torch.no_grad():
        agg.log_vars.copy_(torch.from_numpy(golden["log_vars"]))
    losses = torch.tensor([float(golden[f"loss/{t}"]) for t in TASK_ORDER])
    assert agg(losses).item() == pytest.approx(float(golden["loss"]), rel=1e-6)
