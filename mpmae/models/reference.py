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
`encoder_shape` reads the encoder's construction off any of them; `to_reference_state_dict` maps an encoder
of ours back to the dense FCMAE layout.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mpmae.architectures import ConvNeXtSpec
from mpmae.modalities import MODALITIES
from mpmae.models.convnextv2 import ConvNeXtV2

#: First key components of the bare encoder (the fine-tuning classifier's checkpoint has no prefix).
_ENCODER_ROOTS = ("initial_conv", "stem", "stem_orig", "downsample_layers", "stages", "norm", "head")
#: Wrapper components of MinkowskiLayerNorm / MinkowskiLinear that the dense modules do not have.
_MINKOWSKI_WRAPPERS = ("ln", "linear")
#: The pretraining loss's log-variances: every reference FCMAE stores them, also one trained unweighted.
LOG_VARS_KEY = "loss_fn.log_vars"
_BLOCK_KEY = re.compile(r"stages\.(\d+)\.(\d+)\.dwconv\.weight")


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
        if key in ("mask_token", LOG_VARS_KEY) or root == "proj":
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
    trains them), the pretraining-only keys (decoder, heads, mask token, log-variances) when
    ``module`` is a bare encoder, and the log-variances when ``module``'s loss has none (the reference
    keeps them in every checkpoint, also of a run trained unweighted).
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
    if LOG_VARS_KEY not in expected:
        converted.pop(LOG_VARS_KEY, None)
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


@dataclass(frozen=True)
class EncoderShape:
    """How a ConvNeXt V2 encoder was built, as its weights tell."""

    spec: ConvNeXtSpec
    in_chans: int
    patch_size: int
    stem: str


def encoder_shape(state_dict: Mapping[str, Tensor]) -> EncoderShape:
    """The construction of the encoder in a reference state dict (any layout) or in one of ours: blocks and
    channels per stage, input channels, stem, and the patch size (8 x the stem kernel).

    Raises ``ValueError`` naming the key that is missing or out of place.
    """
    encoder = {k.removeprefix("encoder."): v for k, v in convert_reference_state_dict(state_dict).items()
               if k.startswith("encoder.")}
    stem = "original" if "stem_orig.0.weight" in encoder else "modified"
    first = _weight(encoder, "stem_orig.0.weight" if stem == "original" else "initial_conv.0.weight")
    stem_kernel = _weight(encoder, "stem_orig.0.weight" if stem == "original" else "stem.0.weight").shape[-1]
    stages: dict[int, list[int]] = {}
    for key in encoder:
        if found := _BLOCK_KEY.fullmatch(key):
            stages.setdefault(int(found[1]), []).append(int(found[2]))
    if sorted(stages) != list(range(len(stages))) or any(sorted(b) != list(range(len(b))) for b in stages.values()):
        raise ValueError("the encoder's blocks are not stages.S.B numbered from 0 without gaps")
    depths = tuple(len(stages[stage]) for stage in range(len(stages)))
    dims = tuple(int(_weight(encoder, f"stages.{stage}.0.dwconv.weight").shape[0]) for stage in range(len(depths)))
    # each stage after the first halves the grid: the patch is the stem kernel times 2 ** (stages - 1)
    patch_size = int(stem_kernel) * 2 ** (len(depths) - 1)
    return EncoderShape(ConvNeXtSpec(depths, dims), int(first.shape[1]), patch_size, stem)


def _weight(encoder: Mapping[str, Tensor], key: str) -> Tensor:
    """``encoder[key]``, or an error saying the weights are not a ConvNeXt V2 encoder."""
    if key not in encoder:
        raise ValueError(f"no encoder weight {key!r}: not a ConvNeXt V2 encoder")
    return encoder[key]


def to_reference_state_dict(encoder: ConvNeXtV2) -> dict[str, Tensor]:
    """An encoder of ours in the reference's dense FCMAE layout: ``encoder.*`` keys, GRN parameters (1, C).

    The reference's loader (``remap_checkpoint_keys``) turns every GRN tensor from (1, C), the shape its
    released (sparse) checkpoints store, into (1, 1, 1, C); our reader takes both shapes.
    """
    return {f"encoder.{key}": (value.reshape(1, -1) if key.endswith((".grn.gamma", ".grn.beta")) else value)
            .detach().clone() for key, value in encoder.state_dict().items()}
