from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from mpmae.evaluation.linear_probe import extract_features, linear_probe, score_head, train_head
from mpmae.models.convnextv2 import ConvNeXtV2
from tests.crafted.tiny import templated_images

FAST = {"epochs": 30, "lr": 1e-2, "weight_decay": 0.0, "batch_size": 8, "smoothing": 0.0}


def test_probe_separates_classes_and_is_deterministic(encoder: ConvNeXtV2) -> None:
    train, val = templated_images(24, 3, seed=0), templated_images(12, 3, seed=1)
    scores = [linear_probe(encoder, train, val, kind="multiclass", num_classes=3, seed=5, **FAST) for _ in range(2)]
    assert scores[0] == scores[1] == 1.0


def test_multilabel_probe(encoder: ConvNeXtV2) -> None:
    x, c = templated_images(32, 4)
    labels = torch.stack([c % 2, c // 2, torch.zeros_like(c)], dim=1).float()  # two learnable bits, one empty
    f1 = linear_probe(encoder, (x[:24], labels[:24]), (x[24:], labels[24:]), kind="multilabel", num_classes=3,
                      **FAST)
    assert f1 == 1.0


def test_same_seed_same_head_other_seed_other_head() -> None:
    features, labels = torch.randn(20, 6), torch.arange(20) % 2
    kwargs = {"kind": "multiclass", "num_classes": 2, "epochs": 3, "batch_size": 4}
    a, b = train_head(features, labels, seed=1, **kwargs), train_head(features, labels, seed=1, **kwargs)
    c = train_head(features, labels, seed=2, **kwargs)
    assert torch.equal(a.weight, b.weight)
    assert not torch.equal(a.weight, c.weight)


def test_features_once_per_split_in_eval_mode(encoder: ConvNeXtV2, monkeypatch: pytest.MonkeyPatch) -> None:
    encoder.set_drop_path(0.9)  # would make features random if drop-path were active
    encoder.train()
    calls: list[bool] = []
    original = encoder.forward_features

    def counting(x: torch.Tensor) -> torch.Tensor:
        calls.append(encoder.training or torch.is_grad_enabled())
        return original(x)

    monkeypatch.setattr(encoder, "forward_features", counting)
    x, y = templated_images(10, 2)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    first, labels = extract_features(encoder, loader)
    second, _ = extract_features(encoder, (x, y), batch_size=3)
    assert calls == [False] * (3 + 4)  # one pass per split, no grad, eval mode
    assert torch.allclose(first, second, atol=1e-6) and torch.equal(labels, y)
    assert encoder.training  # mode restored
    calls.clear()
    linear_probe(encoder, (x, y), (x, y), kind="multiclass", num_classes=2, epochs=5, batch_size=2)
    assert len(calls) == 2  # 5 epochs x 5 steps of the head, still one encoder pass per split


def test_score_head_uses_the_task_metric() -> None:
    head = torch.nn.Linear(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
        head.bias.zero_()
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    assert score_head(head, features, torch.tensor([0, 1, 1, 1]), kind="multiclass", num_classes=2) == 0.5


def test_segmentation_is_not_linearly_probed(encoder: ConvNeXtV2) -> None:
    data = templated_images(4, 2)
    with pytest.raises(ValueError, match="U-Net"):
        linear_probe(encoder, data, data, kind="segmentation", num_classes=2)
