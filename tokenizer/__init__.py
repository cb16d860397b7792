"""The AdaTok tokenizer: latent space, ViT encoder/decoder, bottleneck, Nested Tail Masking, policy.

Installed as ``adatok_vlm.tokenizer``; knows nothing about language models or trainers.
"""

from .configuration_adatok import ADATOK_PRESETS, VAE_ARCHITECTURES, AdaTokConfig
from .modeling_adatok import AdaTokEncoding, AdaTokModel, AdaTokOutput, AdaTokPreTrainedModel, token_mask

__all__ = [
    "ADATOK_PRESETS",
    "VAE_ARCHITECTURES",
    "AdaTokConfig",
    "AdaTokEncoding",
    "AdaTokModel",
    "AdaTokOutput",
    "AdaTokPreTrainedModel",
    "token_mask",
]
