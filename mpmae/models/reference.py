"""The reference code's conventions and the mapping of its checkpoints onto this package's layout.

`architecture="reference"` reproduces the dense path of vishalned/MMEarth-train (docs/method.md, D9),
so that its checkpoints give its features: an unpadded 3x3 initial conv, a (modified) stem padded by
``stem_k // 2`` (its original stem is unpadded, as ours), GRN with eps 1e-4 and statistics over every
position, and masking applied to the input pixels only. The default architecture is the
sparse-equivalent one: "same" padding, an unpadded patch-aligned stem, GRN eps 1e-6 over visible
positions, and re-masking after every spatial op.

Checkpoints come in three layouts, all mapped by `convert_reference_state_dict`:
dense FCMAE (``encoder.*`` as ``nn.Conv2d``/``nn.Linear``), sparse FCMAE (``encoder.*`` as
MinkowskiEngine tensors, docs/method.md, Pretraining recipe) and the dense fine-tuning classifier (no prefix).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from mpmae.modalities import MODALITIES
from mpmae.models.convnextv2 import ConvNeXtV2

#: First key components of the bare encoder (the fine-tuning classifier's checkpoint has no prefix).
_ENCODER_ROOTS = ("initial_conv", "stem", "stem_orig", "downsample_layers", "stages", "norm", "head")
#: Wrapper components of MinkowskiLayerNorm / MinkowskiLinear that the dense modules do not have.
_MINKOWSKI_WRAPPERS = ("ln", "linear")


def _minkowski_kernel(kernel: Tensor) -> Tensor:
    """A Minkowski kernel ``[k*k, C_in, C_out]`` (or depthwise ``[k*k, C]``) as a conv weight.

    Minkowski enumerates kernel offsets with the first spatial axis fastest, hence the final transpose.
    """
    if kernel.ndim == 2:
        kernel = kernel.unsqueeze(1)  # depthwise: one input channel per group
    if kernel.ndim != 3:
        raise ValueError(f"a Minkowski kernel has 2 or 3 dims, got shape {tuple(kernel.shape)}")
    volume, c_in, c_out = kernel.shape
    k = math.isqrt(volume)
    if k * k != volume:
        raise ValueError(f"Minkowski kernel volume {volume} is not a square")
    return kernel.permute(2, 1, 0).reshape(c_out, c_in, k, k).transpose(2, 3).contiguous()


def _encoder_entry(key: str, value: Tensor) -> tuple[str, Tensor]:
    """Map one encoder key (without the ``encoder.`` prefix), dense or Minkowski, to our layout."""
    parts = key.split(".")
    if parts[-1] == "kernel":
        return ".".join(parts[:-1] + ["weight"]), _minkowski_kernel(value)
    if len(parts) >= 2 and parts[-2] in _MINKOWSKI_WRAPPERS:
        parts.pop(-2)
    name = parts[-1]
    if name in ("gamma", "beta") and value.ndim == 2:
        value = value.reshape(1, 1, 1, -1)
    elif name == "bias" and value.ndim == 2:
        value = value.reshape(-1)
    return ".".join(parts), value


def convert_reference_state_dict(
    state_dict: Mapping[str, Tensor], *, decoder: str = "shared"
) -> dict[str, Tensor]:
    """Map a reference state dict (any of the three layouts; a checkpoint's ``"model"`` entry) to `MPMAE`'s.

    The reference stores its shared decoder trunk once per task (``decoder_dict.<task>.*``) and one
    LayerNorm (``layer_norm_tmp``) for all image-level heads. With ``decoder="shared"`` the copies must be
    identical and become ``decoder.shared.*``; with ``decoder="per_task"`` each task gets its own copy.
    Keys of the bare classifier are returned under ``encoder.``. Unknown keys raise ``KeyError``.
    """
    if decoder not in ("shared", "per_task"):
        raise ValueError(f"decoder must be 'shared' or 'per_task', got {decoder!r}")
    out: dict[str, Tensor] = {}
    image_tasks = sorted({k.split(".")[1] for k in state_dict if k.startswith("pred_dict.")}
                         & {m for m, mod in MODALITIES.items() if mod.level == "image"})
    for key, value in state_dict.items():
        root, _, rest = key.partition(".")
        if key in ("mask_token", "loss_fn.log_vars") or root == "proj":
            out[key] = value
        elif root == "encoder" or root in _ENCODER_ROOTS:
            new_key, new_value = _encoder_entry(rest if root == "encoder" else key, value)
            out["encoder." + new_key] = new_value
        elif root == "pred_dict":
            task, _, param = rest.partition(".")
            out[f"heads.{task}.{param}"] = value.flatten(1) if value.ndim == 4 else value
        elif root == "decoder_dict":
            task, _, param = rest.partition(".")
            _put(out, f"decoder.{'shared' if decoder == 'shared' else task}.{param}", value, key)
        elif root == "layer_norm_tmp":
            for group in (["shared"] if decoder == "shared" else image_tasks):
                out[f"image_norm.{group}.{rest}"] = value
        else:
            raise KeyError(f"unrecognised reference checkpoint key {key!r}")
    return out


def _put(out: dict[str, Tensor], key: str, value: Tensor, source: str) -> None:
    """Store ``value`` under ``key``, insisting that a duplicate of a shared weight is identical."""
    if key in out and not torch.equal(out[key], value):
        raise ValueError(f"{source!r} differs from another copy of the shared decoder weight {key!r}")
    out[key] = value


def load_reference_state_dict(
    module: nn.Module, state_dict: Mapping[str, Tensor], *, ignore: Iterable[str] = ()
) -> None:
    """Convert a reference state dict and load it strictly into an `MPMAE` or a bare `ConvNeXtV2`.

    Every parameter of ``module`` must be supplied and every supplied tensor used, with matching shapes,
    except keys starting with a prefix in ``ignore`` (e.g. ``("norm.", "head.")`` when a sparse
    checkpoint, which has neither, feeds a classifier). Dropped without asking: the final norm and head
    of the reference encoder when ``module``'s encoder is ``features_only`` (masked pretraining never
    trains them), and the pretraining-only keys (decoder, heads, mask token, log-variances) when
    ``module`` is a bare encoder.
    """
    decoder = getattr(getattr(module, "config", None), "decoder", "shared")
    converted = convert_reference_state_dict(state_dict, decoder=decoder)
    bare = isinstance(module, ConvNeXtV2)
    encoder = module if bare else module.get_submodule("encoder")
    prefix = "" if bare else "encoder."
    if bare:
        converted = {k.removeprefix("encoder."): v for k, v in converted.items() if k.startswith("encoder.")}
    prefixes = tuple(ignore)
    dropped = prefixes + ((prefix + "norm.", prefix + "head.") if encoder.features_only else ())
    converted = {k: v for k, v in converted.items() if not k.startswith(dropped)}
    expected = {k: v for k, v in module.state_dict().items() if not k.startswith(prefixes)}
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    wrong = sorted(k for k in set(expected) & set(converted) if expected[k].shape != converted[k].shape)
    if missing or unexpected or wrong:
        shapes = [f"{k}: {tuple(converted[k].shape)} != {tuple(expected[k].shape)}" for k in wrong]
        raise ValueError(
            f"reference checkpoint does not fit {type(module).__name__}: missing {missing}, "
            f"unexpected {unexpected}, shape mismatches {shapes}"
        )
    module.load_state_dict(converted, strict=not prefixes)
