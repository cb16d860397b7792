"""The AdaTok tokenizer: latent space, ViT encoder/decoder, bottleneck, Nested Tail Masking, policy, and its
image processor (any image -> ``pixel_values`` in [0, 1]).

Installed as ``adatok_vlm.tokenizer``; knows nothing about language models or trainers.
"""

from .configuration_adatok import ADATOK_PRESETS, VAE_ARCHITECTURES, AdaTokConfig
from .image_processing_adatok import AdaTokImageProcessor
from .modeling_adatok import (
    AdaTokEncoding,
    AdaTokModel,
    AdaTokOutput,
    AdaTokPreTrainedModel,
    pack_image_tokens,
    token_mask,
    unpack_image_tokens,
)

__all__ = [
    "ADATOK_PRESETS",
    "VAE_ARCHITECTURES",
    "AdaTokConfig",
    "AdaTokEncoding",
    "AdaTokImageProcessor",
    "AdaTokModel",
    "AdaTokOutput",
    "AdaTokPreTrainedModel",
    "pack_image_tokens",
    "token_mask",
    "unpack_image_tokens",
]
