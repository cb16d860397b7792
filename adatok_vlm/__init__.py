"""adatok-vlm: AdaTok's adaptive, variable-length image tokens for Hugging Face models.

``import adatok_vlm`` registers every model with the Auto classes::

    import adatok_vlm, transformers
    model = transformers.AutoModel.from_pretrained("path/to/adatok")   # -> AdaTokModel
"""

from .configuration_vlm import AdaTokVLMConfig
from .generator import AdaTokDiT, AdaTokDiTConfig, ClassToImagePipeline
from .modeling_vlm import AdaTokVLMForCausalLM
from .processing_vlm import AdaTokVLMProcessor
from .registration import register as _register
from .tokenizer import AdaTokConfig, AdaTokEncoding, AdaTokImageProcessor, AdaTokModel
from .vlm_data import VLMCollator

__version__ = "0.1.0"

_register()   # the Auto classes of all three families: adatok_vlm.registration

__all__ = [
    "AdaTokConfig", "AdaTokEncoding", "AdaTokModel", "AdaTokImageProcessor",
    "AdaTokDiTConfig", "AdaTokDiT", "ClassToImagePipeline",
    "AdaTokVLMConfig", "AdaTokVLMForCausalLM", "AdaTokVLMProcessor", "VLMCollator", "__version__",
]
