"""PEFT for the AdaTok VLM: LoRA on the language model; the projector and the flow head train fully.

The image modality adds modules the LM never had (the projector, the flow head) and three token rows
(``[BOI]``, ``[IMG]``, ``[EOI]``; the stop decision lives in the last two): LoRA adapts the LM's linear
layers, the new modules are saved whole (``modules_to_save``) and the new rows train through PEFT's
``trainable_token_indices``. ``apply_lora`` wraps a model, ``load_lora`` puts a saved adapter back on a base
model, and ``peft``'s ``merge_and_unload()`` folds it in (a plain :class:`AdaTokVLMForCausalLM` again).

``peft`` is imported inside the functions: the rest of the package works without it.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from .modeling_vlm import AdaTokVLMForCausalLM


def _module_name(root: nn.Module, target: nn.Module) -> str:
    return next(name for name, module in root.named_modules() if module is target)


def apply_lora(vlm: "AdaTokVLMForCausalLM", r: int = 16, alpha: int = 32, target_modules=None,
               dropout: float = 0.0, train_new_token_rows: bool = True, **lora_kwargs):
    """Wrap ``vlm`` in a PEFT LoRA model: adapters on the LM only; projector and flow head fully trained.

    Args:
        r / alpha / dropout: LoRA rank, scaling numerator and dropout.
        target_modules: LM module names to adapt (e.g. ``["q_proj", "v_proj"]``), matched only inside
            ``language_model`` (AdaTok and the heads are never adapted); a ``str`` is used as a full regex.
            Default: PEFT's choice for the LM's model type, else every linear layer of the LM but its head.
        train_new_token_rows: also train the embedding (and LM-head) rows of ``[BOI]``/``[IMG]``/``[EOI]``
            (and of the image codes in discrete mode) through PEFT's ``trainable_token_indices``: the stop
            decision lives in those rows.
        lora_kwargs: any other ``peft.LoraConfig`` field.
    Returns:
        a ``peft.PeftModel``; ``save_pretrained`` writes the adapter, the projector and the head.
        :func:`load_lora` reloads it onto a base VLM and ``merge_and_unload()`` merges it.
    """
    from peft import LoraConfig, get_peft_model
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    from .modeling_vlm import AdaTokVLMForCausalLM

    if not isinstance(vlm, AdaTokVLMForCausalLM):
        raise TypeError(f"apply_lora expects an AdaTokVLMForCausalLM, got {type(vlm).__name__}")
    lm = vlm.language_model
    if target_modules is None:
        target_modules = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(lm.config.model_type)
    if target_modules is None:
        head = lm.get_output_embeddings()
        target_modules = sorted({name.rsplit(".", 1)[-1] for name, module in lm.named_modules()
                                 if isinstance(module, nn.Linear) and module is not head})
    if not isinstance(target_modules, str):
        names = "|".join(re.escape(name) for name in target_modules)
        target_modules = rf"language_model\..*\b(?:{names})"
    modules_to_save = ["projector"] + (["image_head"] if vlm.image_head is not None else [])
    token_kwargs = {}
    if train_new_token_rows and vlm.config.has_image_tokens:
        rows = [vlm.config.boi_token_id, vlm.config.img_token_id, vlm.config.eoi_token_id]
        if vlm.is_discrete:
            rows += list(vlm.image_code_ids)
        embed_name = _module_name(vlm, vlm.get_input_embeddings())
        if vlm.config.text_config.tie_word_embeddings:
            token_kwargs["trainable_token_indices"] = {embed_name: rows}
        else:
            head_name = _module_name(vlm, vlm.get_output_embeddings())
            token_kwargs["trainable_token_indices"] = {embed_name: rows, head_name: rows}
    if "fan_in_fan_out" not in lora_kwargs:  # GPT-2-style Conv1D layers store their weight transposed
        from transformers.pytorch_utils import Conv1D

        lora_kwargs["fan_in_fan_out"] = any(isinstance(module, Conv1D) for module in lm.modules())
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        modules_to_save=modules_to_save, **token_kwargs, **lora_kwargs)
    return get_peft_model(vlm, config)


def load_lora(vlm: "AdaTokVLMForCausalLM", adapter_dir: str, is_trainable: bool = False):
    """Load a LoRA adapter saved from :func:`apply_lora` onto a base VLM (``peft.PeftModel``)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(vlm, adapter_dir, is_trainable=is_trainable)


__all__ = ["apply_lora", "load_lora"]
