"""The encoder's shapes: ConvNeXt V2 sizes, stems, and the conventions of the default and reference networks.

Plain data, no torch: configs check names against it before anything heavy loads, and
:mod:`mpmae.models.convnextv2` builds from it. The two conventions are the sparse-equivalent default and
the reference code's dense path (see :mod:`mpmae.models.reference`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ConvNeXtSpec:
    """Blocks per stage and channels per stage of one ConvNeXt V2 size."""

    depths: tuple[int, ...]
    dims: tuple[int, ...]


VARIANTS: dict[str, ConvNeXtSpec] = {
    "atto": ConvNeXtSpec((2, 2, 6, 2), (40, 80, 160, 320)),
    "femto": ConvNeXtSpec((2, 2, 6, 2), (48, 96, 192, 384)),
    "pico": ConvNeXtSpec((2, 2, 6, 2), (64, 128, 256, 512)),
    "nano": ConvNeXtSpec((2, 2, 8, 2), (80, 160, 320, 640)),
    "tiny": ConvNeXtSpec((3, 3, 9, 3), (96, 192, 384, 768)),
    "base": ConvNeXtSpec((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": ConvNeXtSpec((3, 3, 27, 3), (192, 384, 768, 1536)),
    "huge": ConvNeXtSpec((3, 3, 27, 3), (352, 704, 1408, 2816)),
}


#: The stems: MMEarth's 3x3 conv + depthwise patch stem (default) and ConvNeXt V2's single patch conv.
STEMS = ("modified", "original")


def get_spec(arch: str | ConvNeXtSpec) -> ConvNeXtSpec:
    """A variant by name (``VARIANTS``) or an explicit spec, validated."""
    if isinstance(arch, ConvNeXtSpec):
        spec = arch
    elif arch in VARIANTS:
        spec = VARIANTS[arch]
    else:
        raise ValueError(f"unknown ConvNeXt V2 variant {arch!r}; valid: {list(VARIANTS)}")
    if len(spec.depths) != 4 or len(spec.dims) != 4:
        raise ValueError(f"a ConvNeXt V2 spec has 4 stages, got depths {spec.depths} and dims {spec.dims}")
    return spec


@dataclass(frozen=True)
class Conventions:
    """The knobs on which the default and the reference ConvNeXt V2 differ."""

    initial_conv_padding: int
    pad_stem: bool
    grn_eps: float
    remask: bool


CONVENTIONS = {
    "default": Conventions(initial_conv_padding=1, pad_stem=False, grn_eps=1e-6, remask=True),
    "reference": Conventions(initial_conv_padding=0, pad_stem=True, grn_eps=1e-4, remask=False),
}


def get_conventions(architecture: str) -> Conventions:
    """The conventions of ``architecture``; raises ``ValueError`` listing the valid names."""
    try:
        return CONVENTIONS[architecture]
    except KeyError:
        raise ValueError(f"unknown architecture {architecture!r}; valid: {sorted(CONVENTIONS)}") from None
