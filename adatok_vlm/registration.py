"""Auto-class registration of every model family, in one place (``import adatok_vlm`` calls :func:`register`).

The three families and what each registers:

* the AdaTok tokenizer: ``AutoConfig`` / ``AutoModel`` and its ``AutoImageProcessor``;
* the DiT: ``AutoConfig`` / ``AutoModel``;
* the VLM: ``AutoConfig`` / ``AutoModelForCausalLM`` and its ``AutoProcessor``.

Registration lives here, above the model and processor files, so that no modeling file imports a processor
and no processor imports a modeling file: a new family adds its lines to :func:`register` and nothing else
learns about it.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM, AutoProcessor

from .configuration_vlm import AdaTokVLMConfig
from .generator import AdaTokDiT, AdaTokDiTConfig
from .modeling_vlm import AdaTokVLMForCausalLM
from .processing_vlm import AdaTokVLMProcessor
from .tokenizer import AdaTokConfig, AdaTokModel
from .tokenizer.image_processing_adatok import AdaTokImageProcessor


def register() -> None:
    """Register the tokenizer, the DiT and the VLM (configs, models, processors) with the Auto classes.

    Idempotent (``exist_ok=True``): calling it again, as tests and ``import adatok_vlm`` both do, changes nothing.
    """
    AutoConfig.register(AdaTokConfig.model_type, AdaTokConfig, exist_ok=True)
    AutoModel.register(AdaTokConfig, AdaTokModel, exist_ok=True)
    # One processor fills both of transformers' back-end slots (PIL and torchvision): there is no fast variant.
    AutoImageProcessor.register(AdaTokConfig, image_processor_classes={
        "pil": AdaTokImageProcessor, "torchvision": AdaTokImageProcessor}, exist_ok=True)

    AutoConfig.register(AdaTokDiTConfig.model_type, AdaTokDiTConfig, exist_ok=True)
    AutoModel.register(AdaTokDiTConfig, AdaTokDiT, exist_ok=True)

    AutoConfig.register(AdaTokVLMConfig.model_type, AdaTokVLMConfig, exist_ok=True)
    AutoModelForCausalLM.register(AdaTokVLMConfig, AdaTokVLMForCausalLM, exist_ok=True)
    AutoProcessor.register(AdaTokVLMConfig, AdaTokVLMProcessor, exist_ok=True)


__all__ = ["register"]
