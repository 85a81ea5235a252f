"""The optimisation recipe, the step guard against non-finite losses, and config cross-checks."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from mpmae.config import ConfigError, ModelConfig, OptimConfig, PretrainConfig, load_config
from mpmae.models.mpmae import MPMAE
from mpmae.optim import WarmupCosine, build_optimizer, fused_adamw_ok, keep_fused, param_groups
from mpmae.train.step import NonFiniteLossError, StepGuard, forward_backward
from mpmae.train.trainer import default_run_name


def test_warmup_then_cosine_schedule() -> None:
    optim = OptimConfig(batch_size=4096, blr=1.5e-4, epochs=200, warmup_epochs=40, min_lr=0.0)
    schedule = WarmupCosine.for_pretraining(optim)
    assert schedule(0.0) == 0.0
    assert schedule(20.0) == pytest.approx(1.2e-3)
    assert schedule(40.0) == pytest.approx(2.4e-3)
    assert schedule(120.0) == pytest.approx(1.2e-3)
    assert schedule(200.0) == pytest.approx(0.0, abs=1e-12)
    assert schedule(250.0) == pytest.approx(0.0, abs=1e-12)


def _tiny_model(**kwargs: object) -> MPMAE:
    return MPMAE(ModelConfig(arch="atto", patch_size=8, targets=["sentinel2", "era5", "biome"],
                             decoder_dim=32, **kwargs))


def test_weight_decay_spares_norms_biases_grn_and_mask_token() -> None:
    model = _tiny_model()
    decayed, exempt = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    exempt_names = {names[id(p)] for p in exempt["params"]}
    decayed_names = {names[id(p)] for p in decayed["params"]}
    assert "mask_token" in exempt_names
    assert any(".grn." in n for n in exempt_names) and not any(".grn." in n for n in decayed_names)
    assert all(not n.endswith(".bias") for n in decayed_names)
    assert all(p.ndim > 1 for p in decayed["params"])
    assert len(exempt["params"]) + len(decayed["params"]) == len(list(model.parameters()))
    assert decayed["weight_decay"] == 0.05 and exempt["weight_decay"] == 0.0
    assert "encoder.stages.0.0.pwconv1.weight" not in model.no_weight_decay()


def test_adamw_is_fused_only_when_every_parameter_is_on_cuda() -> None:
    model = _tiny_model()
    optimizer = build_optimizer(model, OptimConfig(batch_size=2))
    assert not optimizer.defaults["fused"]  # the CPU keeps the default path
    layout = [([id(p) for p in g["params"]], g["weight_decay"]) for g in param_groups(model, 0.05)]
    assert [([id(p) for p in g["params"]], g["weight_decay"]) for g in optimizer.param_groups] == layout
    on_cuda = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16)
    assert fused_adamw_ok([on_cuda, on_cuda])
    assert not fused_adamw_ok([on_cuda, torch.zeros(2)])
    assert not fused_adamw_ok([torch.zeros(2, device="meta")]) and not fused_adamw_ok([])
    assert not fused_adamw_ok([SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.int64)])


def test_a_resumed_optimizer_takes_the_path_of_its_parameters_device() -> None:
    """load_state_dict brings back the saving run's ``fused``; a GPU run's state resumed on the CPU is not fused."""
    model = _tiny_model()
    optimizer = build_optimizer(model, OptimConfig(batch_size=2))
    state = optimizer.state_dict()
    for group in state["param_groups"]:
        group["fused"] = True  # as a GPU run saves it
    optimizer.load_state_dict(state)
    assert all(g["fused"] for g in optimizer.param_groups)
    keep_fused(optimizer)
    assert not any(g["fused"] for g in optimizer.param_groups)


def _batch(n: int = 2) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    biome = torch.zeros(n, 14, dtype=torch.int64)
    biome[:, 3] = 1
    return {"sentinel2": torch.randn(n, 12, 56, 56), "era5": torch.randn(n, 12), "biome": biome}


def test_non_finite_steps_are_skipped_then_stop_the_run_naming_the_task() -> None:
    model = _tiny_model()
    optimizer = build_optimizer(model, OptimConfig(batch_size=2))
    guard = StepGuard(max_consecutive=2)
    batch = _batch()
    era5_bias = model.heads["era5"].bias
    healthy = era5_bias.detach().clone()

    def step(corrupt: bool) -> bool:
        with torch.no_grad():
            era5_bias.copy_(torch.full_like(healthy, math.nan) if corrupt else healthy)
        output = forward_backward(model, batch, 1, torch.device("cpu"), bf16=False)
        return guard.step(model, optimizer, 1.0, output)

    before = [p.detach().clone() for n, p in model.named_parameters() if n != "heads.era5.bias"]
    assert step(corrupt=True) is False and step(corrupt=True) is False
    assert guard.skipped == 2 and guard.consecutive == 2
    after = [p for n, p in model.named_parameters() if n != "heads.era5.bias"]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert step(corrupt=False) is True and guard.consecutive == 0
    assert not all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    with pytest.raises(NonFiniteLossError, match=r"non-finite task losses in the last batch: \['era5'\]"):
        for _ in range(3):
            step(corrupt=True)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.crop_size=60"], r"^data\.crop_size: 60 is not divisible by model\.patch_size 8"),
        (["optim.batch_size=33"], r"^optim\.batch_size: 33 is not divisible by run\.num_workers 2"),
        (["model.arch=gigantic"], r"^model\.arch: 'gigantic' is not one of"),
        (["model.targets=[biome]"], r"^model\.targets: must include sentinel2"),
        (["model.targets=[sentinel2, mars]"], r"^model\.targets: unknown modality 'mars'"),
        (["model.task_weights={biome: 2}"], r"^model\.task_weights: only used with model\.loss 'weighted'"),
        (["model.loss=weighted", "model.targets=S2", "model.task_weights={biome: 2}"],
         r"^model\.task_weights: \['biome'\] are not pretext tasks"),
        (["optim.warmup_epochs=300"], r"^optim\.warmup_epochs: 300 must lie in"),
        (["optim.lr=1"], r"^optim\.lr: unknown key"),
    ],
)
def test_impossible_configs_fail_with_the_key_path(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(PretrainConfig, "configs/demo.yaml", overrides)


def test_shipped_configs_load_and_follow_the_naming_convention() -> None:
    config = load_config(PretrainConfig, "configs/all_mod_atto_1M_64.yaml")
    assert config.optim.effective_batch == 4096 and config.optim.lr == pytest.approx(2.4e-3)
    assert default_run_name(config, "1M_64") == "pt-all_mod_atto_1M_64_uncertainty_56-8"
    config = load_config(PretrainConfig, "configs/all_mod_atto_1M_128.yaml")
    assert default_run_name(config, "1M_128") == "pt-all_mod_atto_1M_128_uncertainty_112-16"
