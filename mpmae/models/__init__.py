"""Models: the masked ConvNeXt V2 encoder, the multi-pretext masked autoencoder, the fine-tuning classifier and
U-Net, reference checkpoints."""

from mpmae.architectures import VARIANTS, ConvNeXtSpec
from mpmae.models.classifier import Classifier, new_head
from mpmae.models.convnextv2 import ConvNeXtV2
from mpmae.models.mpmae import MPMAE, MPMAEOutput, random_mask
from mpmae.models.reference import (
    EncoderShape,
    convert_reference_state_dict,
    encoder_shape,
    load_reference_state_dict,
    to_reference_state_dict,
)
from mpmae.models.unet import UNet

__all__ = [
    "MPMAE",
    "Classifier",
    "UNet",
    "VARIANTS",
    "ConvNeXtSpec",
    "ConvNeXtV2",
    "EncoderShape",
    "MPMAEOutput",
    "convert_reference_state_dict",
    "encoder_shape",
    "load_reference_state_dict",
    "new_head",
    "random_mask",
    "to_reference_state_dict",
]
