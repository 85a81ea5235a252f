"""``run.compile``: the worker's torch.compile changes no result. The compiled MPMAE's losses, total and per
task, equal the eager model's on a fixed batch, before and after an AdamW step, and checkpoints still see
the MPMAE's own state-dict keys."""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from mpmae.config import ModelConfig, OptimConfig
from mpmae.models import MPMAE, ConvNeXtSpec
from mpmae.models.mpmae import MPMAEOutput
from mpmae.optim import build_optimizer
from mpmae.runtime.run import channels_last, compiled
from mpmae.train.step import forward_backward, unwrap

TINY = ConvNeXtSpec((1, 1, 1, 1), (8, 16, 24, 32))
#: One task of each kind of head and loss: pixel regression (the input), pixel classes, an image class.
TARGETS = ["sentinel2", "esa_worldcover", "biome"]
SIDE, PATCH, BATCH = 32, 8, 2
#: Inductor fuses kernels and sums fp32 reductions in another order than eager ATen, so the losses (1 to 6
#: here) differ by float32 rounding: seen <= 2e-7 relative, before and after the step. rtol 1e-5 leaves 50x
#: room (other CPUs' vector widths reorder differently) yet fails a real difference: the step itself moves
#: every loss by >= 2e-4 relative, a wrong mask or a dropped loss term by far more.
RTOL, ATOL = 1e-5, 1e-6


def _batch(n: int, side: int) -> dict[str, Tensor]:
    """Sentinel-2 with no-data pixels, a world-cover map with ignored (-1) pixels, a one-hot biome."""
    gen = torch.Generator().manual_seed(0)
    sentinel2 = torch.randn(n, 12, side, side, generator=gen)
    sentinel2[:, :, :3, :5] = float("nan")
    return {
        "sentinel2": sentinel2,
        "esa_worldcover": torch.randint(-1, 11, (n, 1, side, side), generator=gen),
        "biome": torch.eye(14, dtype=torch.long)[torch.randint(14, (n,), generator=gen)],
    }


def _losses(output: MPMAEOutput) -> Tensor:
    return torch.stack([output.loss, *output.task_losses.values()]).detach()


def test_compiled_model_gives_the_eager_losses_before_and_after_an_adamw_step() -> None:
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    eager = channels_last(MPMAE(ModelConfig(arch=TINY, patch_size=PATCH, targets=TARGETS, decoder_dim=16)))
    model = compiled(copy.deepcopy(eager), enabled=True)
    assert unwrap(model) is model and list(model.state_dict()) == list(eager.state_dict())
    optim = OptimConfig(batch_size=256, blr=1e-3)  # lr = blr at batch 256
    optimizers = {"eager": build_optimizer(eager, optim), "compiled": build_optimizer(model, optim)}
    batch, cpu = _batch(BATCH, SIDE), torch.device("cpu")
    losses: dict[str, list[Tensor]] = {"eager": [], "compiled": []}
    # The mask is drawn inside forward: with fallback_random Inductor draws it from ATen's generator, as eager.
    with torch._inductor.config.patch(fallback_random=True):
        for step in range(2):  # the second step's losses show that the AdamW updates matched too
            for name, module in (("eager", eager), ("compiled", model)):
                torch.manual_seed(100 + step)  # the same mask for both
                output = forward_backward(module, batch, 1, cpu, bf16=False)
                losses[name].append(_losses(output))
                optimizers[name].step()
                optimizers[name].zero_grad(set_to_none=True)
    assert set(output.task_losses) == set(TARGETS)
    # rows: the two steps; columns: the total, then each task's loss
    torch.testing.assert_close(torch.stack(losses["compiled"]), torch.stack(losses["eager"]), rtol=RTOL, atol=ATOL)
    assert not torch._dynamo.utils.counters["graph_break"]  # one graph: nothing falls back to eager
