from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from mpmae.finetune.finetune import Finetuner, evaluate, fit
from mpmae.models import Classifier
from mpmae.models.convnextv2 import ConvNeXtV2
from tests.crafted.tiny import recipe, templated_images, tiny_encoder


def test_classifier_overfits_a_separable_problem(encoder: ConvNeXtV2) -> None:
    x, y = templated_images(16, 4)
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    config = recipe(epochs=12, lr=3e-3, weight_decay=0.05, smoothing=0.1)
    finetuner = Finetuner(Classifier(encoder, 4), config, "multiclass", 4, steps_per_epoch=len(loader))
    before = finetuner.evaluate(loader)
    history = [finetuner.train_epoch(loader) for _ in range(config.epochs)]
    after = finetuner.evaluate(loader)
    assert after["loss"] < 0.2 * before["loss"]
    assert history[-1]["loss"] < history[0]["loss"]
    assert after["metric"] == 1.0
    assert history[-1]["lr"] == pytest.approx(config.min_lr, rel=0.5, abs=1e-4)  # cosine ran to its end
    assert finetuner.step == 12 * 2 and finetuner.epoch == 12


def test_encoder_trains_with_layer_decay(encoder: ConvNeXtV2) -> None:
    config = recipe(epochs=1, lr=1e-3, layer_decay=0.5)
    finetuner = Finetuner(Classifier(encoder, 3), config, "multilabel", 3, steps_per_epoch=1)
    scales = {g["layer_id"]: g["lr_scale"] for g in finetuner.optimizer.param_groups}
    assert scales == {i: 0.5 ** (5 - i) for i in range(6)}  # tiny encoder: 4 blocks -> ids 0..5
    x, _ = templated_images(4, 2)
    finetuner.train_epoch([(x, torch.ones(4, 3))])
    lrs = {g["layer_id"]: g["lr"] for g in finetuner.optimizer.param_groups}
    assert lrs[0] == pytest.approx(1e-3 * 0.5 ** 5) and lrs[5] == pytest.approx(1e-3)


def test_state_dict_resumes_exactly() -> None:
    x, y = templated_images(8, 2)
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    config = recipe(epochs=3, lr=1e-3)
    straight = Finetuner(Classifier(tiny_encoder(), 2), config, "multiclass", 2, steps_per_epoch=2)
    for _ in range(2):
        straight.train_epoch(batches)
    first = Finetuner(Classifier(tiny_encoder(), 2), config, "multiclass", 2, steps_per_epoch=2)
    first.train_epoch(batches)
    resumed = Finetuner(Classifier(tiny_encoder(seed=1), 2), config, "multiclass", 2, steps_per_epoch=2)
    resumed.load_state_dict(first.state_dict())
    resumed.train_epoch(batches)
    assert (resumed.epoch, resumed.step) == (2, 4)
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name


def test_evaluate_over_batches_is_unsmoothed_split_loss_and_metric(encoder: ConvNeXtV2) -> None:
    model = Classifier(encoder, 2)
    x, y = templated_images(6, 2)
    result = evaluate(model, [(x[:4], y[:4]), (x[4:], y[4:])], kind="multiclass", num_classes=2)
    logits = model(x)
    expected = torch.nn.functional.cross_entropy(logits, y).item()
    assert not model.training
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["metric"] == pytest.approx((logits.argmax(1) == y).float().mean().item())


class ScriptedFinetuner:
    """Stands in for a `Finetuner`: weights equal the epoch number, val metrics follow a script."""

    def __init__(self, val_metrics: list[float], select: str) -> None:
        self.model = torch.nn.Linear(1, 1)
        self.config = SimpleNamespace(epochs=len(val_metrics), select=select)
        self.val_metrics, self.epoch = val_metrics, 0

    def train_epoch(self, batches: object) -> dict[str, float]:
        with torch.no_grad():
            self.model.weight.fill_(self.epoch)
        self.epoch += 1
        return {"loss": 1.0, "metric": 0.0, "lr": 0.1}

    def evaluate(self, batches: object) -> dict[str, float]:
        return {"loss": 1.0, "metric": self.val_metrics[self.epoch - 1]}


@pytest.mark.parametrize(("select", "epoch"), [("last", 3), ("best_val", 1)])
def test_fit_selects_checkpoint_by_rule(select: str, epoch: int) -> None:
    scripted = ScriptedFinetuner([0.5, 0.9, 0.9, 0.7], select)
    result = fit(scripted, [], [])  # type: ignore[arg-type]
    assert result.selected_epoch == epoch
    assert scripted.model.weight.item() == epoch
    assert [row["epoch"] for row in result.history] == [0, 1, 2, 3]
    assert result.history[1]["val_metric"] == 0.9 and result.history[1]["train_loss"] == 1.0


def test_unknown_selection_rule_rejected(encoder: ConvNeXtV2) -> None:
    with pytest.raises(ValueError, match="select"):
        Finetuner(Classifier(encoder, 2), recipe(1e-3, select="best"), "multiclass", 2, 1)  # type: ignore[arg-type]
