"""Models: the masked ConvNeXt V2 encoder, the multi-pretext masked autoencoder, reference checkpoints."""

from mpmae.architectures import VARIANTS, ConvNeXtSpec
from mpmae.models.convnextv2 import ConvNeXtV2
from mpmae.models.mpmae import MPMAE, MPMAEConfig, MPMAEOutput, build_mpmae, random_mask
from mpmae.models.reference import convert_reference_state_dict, load_reference_state_dict

__all__ = [
    "MPMAE",
    "VARIANTS",
    "ConvNeXtSpec",
    "ConvNeXtV2",
    "MPMAEConfig",
    "MPMAEOutput",
    "build_mpmae",
    "convert_reference_state_dict",
    "load_reference_state_dict",
    "random_mask",
]
