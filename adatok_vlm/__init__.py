"""adatok-vlm: AdaTok's adaptive, variable-length image tokens for Hugging Face models.

``import adatok_vlm`` registers every model with the Auto classes::

    import adatok_vlm, transformers
    model = transformers.AutoModel.from_pretrained("path/to/adatok")   # -> AdaTokModel
"""

from transformers import AutoConfig, AutoModel

from .generator import AdaTokDiT, AdaTokDiTConfig, ClassToImagePipeline
from .generator import register as _register_generator
from .configuration_vlm import AdaTokVLMConfig
from .modeling_vlm import AdaTokVLMForCausalLM
from .modeling_vlm import register as _register_vlm
from .processing_vlm import AdaTokVLMProcessor
from .vlm_data import VLMCollator
from .tokenizer import AdaTokConfig, AdaTokEncoding, AdaTokModel

__version__ = "0.1.0"


def _register() -> None:
    AutoConfig.register(AdaTokConfig.model_type, AdaTokConfig, exist_ok=True)
    AutoModel.register(AdaTokConfig, AdaTokModel, exist_ok=True)
    _register_generator()
    _register_vlm()
    try:
        from transformers import AutoImageProcessor

        from .image_processing_adatok import AdaTokImageProcessor
    except ImportError:  # the image processor module is optional at import time
        return
    AutoImageProcessor.register(AdaTokConfig, image_processor_classes={"pil": AdaTokImageProcessor, "torchvision": AdaTokImageProcessor}, exist_ok=True)
    globals()["AdaTokImageProcessor"] = AdaTokImageProcessor


_register()

__all__ = [
    "AdaTokConfig", "AdaTokEncoding", "AdaTokModel", "AdaTokImageProcessor",
    "AdaTokDiTConfig", "AdaTokDiT", "ClassToImagePipeline",
    "AdaTokVLMConfig", "AdaTokVLMForCausalLM", "AdaTokVLMProcessor", "VLMCollator", "__version__",
]
