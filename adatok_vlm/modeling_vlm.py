"""The image modality for any Hugging Face causal LM, with AdaTok's variable-length image tokens.

An image is a span ``[BOI] z_1 .. z_L [EOI]`` inside the LM's sequence, where ``L`` is the length
AdaTok's policy chose for it (paper Sec. 4.2) and ``z_i`` are its tokens (a prefix of the ``m``
nested tokens, Sec. 4.1). Because ``L`` varies, the LM itself decides when an image ends by emitting
``[EOI]`` (paper, Limitations a): generation stops early for simple images and that is where the
speed-up of adaptive tokens comes from.

* **Understanding.** The processor expands ``<image>`` into ``[BOI] + [IMG] x L + [EOI]``; the image
  tokens (packed ``[sum L, D]``) go through an MLP projector and are scattered into the ``[IMG]``
  positions of ``inputs_embeds``.
* **Generation, continuous tokens (default).** The LM's last hidden state at ``[BOI]`` and at each image
  position predicts the next image token through a flow-matching head (:mod:`adatok_vlm.flow_head`,
  MAR-style); the sampled token is projected back in as the next input embedding (KV cache on). At
  image positions the LM's own logits, restricted to ``{[IMG], [EOI]}``, decide whether to stop.
* **Generation, discrete tokens.** With an FSQ AdaTok the codes are appended to the vocabulary at
  ``image_code_offset`` and plain ``generate`` writes images, confined to codes + ``[EOI]`` by a
  logits processor.
* **Training.** ``loss = w_text * CE(text) + w_image * flow(image) + w_stop * CE([IMG] vs [EOI])``; the
  stop target at each image position is ``[IMG]`` except after the last token, where it is ``[EOI]``.

The file reads bottom-up: helpers, projector, outputs, the model. The generation loop and its logits
processors live in :mod:`adatok_vlm.generation_vlm` (mixed into the model; re-exported here), the LoRA
helpers in :mod:`adatok_vlm.peft_vlm`, packing image tokens (``pack_image_tokens``) in the tokenizer beside
``token_mask``, and the Auto-class registration of every model family in :mod:`adatok_vlm.registration`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput

from .configuration_vlm import (
    BOI_TOKEN,
    DATA_TO_NOISE,
    EOI_TOKEN,
    IMG_TOKEN,
    NOISE_TO_DATA,
    VLM_TRAINING_INFO,
    AdaTokVLMConfig,
    check_image_token_strings,
)
from .flow_head import AdaLNResBlock, FinalLayer, FlowHead
from .generation_vlm import (
    AdaTokVLMGenerationMixin,
    ExactImageTokensLogitsProcessor,
    ImageLengthLogitsProcessor,
    ImageVocabularyLogitsProcessor,
    MaxImageTokensLogitsProcessor,
    MinImageTokensLogitsProcessor,
    image_span_state,
    position_ids_from_mask,
)
from .tokenizer import AdaTokModel, pack_image_tokens

IGNORE_INDEX = -100


# ============================================================================================
# helpers
# ============================================================================================
def add_image_tokens(text_tokenizer: PreTrainedTokenizerBase, strings: dict[str, str],
                     reuse_existing_tokens: bool = False) -> dict[str, int]:
    """Put the three image tokens into ``text_tokenizer`` (in place); ``{"boi_token": id, ...}``.

    ``strings`` maps ``boi_token``/``img_token``/``eoi_token`` to their strings. New strings become special
    tokens (never split, never merged with the text around them). A string that is already one token of the
    vocabulary is refused unless ``reuse_existing_tokens``, which keeps its id: reusing an LM's own image pair
    is a choice, reusing ``"</s>"`` by accident would make every image end the text.
    """
    check_image_token_strings(strings)
    if strings["eoi_token"] in (text_tokenizer.eos_token, text_tokenizer.pad_token):
        raise ValueError(f"eoi_token={strings['eoi_token']!r} is the text tokenizer's end-of-text or padding token; "
                         "an image's end must be its own token (after it the LM goes on with text)")
    vocab = text_tokenizer.get_vocab()
    existing = {name: value for name, value in strings.items() if value in vocab}
    if existing and not reuse_existing_tokens:
        raise ValueError(f"the text tokenizer already has {existing} as token(s); pass reuse_existing_tokens=True "
                         "to use them as the image tokens, or choose other strings")
    # Existing strings are registered too (their ids stay): as special tokens they are never split.
    text_tokenizer.add_special_tokens({"extra_special_tokens": list(strings.values())},
                                      replace_extra_special_tokens=False)
    ids = {name: text_tokenizer.convert_tokens_to_ids(value) for name, value in strings.items()}
    for name, value in strings.items():
        if text_tokenizer(value, add_special_tokens=False)["input_ids"] != [ids[name]]:
            raise ValueError(f"{name}={value!r} does not tokenize to one token in the text tokenizer")
    return ids


# ============================================================================================
# projector
# ============================================================================================
class ImageProjector(nn.Module):
    """Two-layer MLP (LLaVA-1.5 style): image token ``[..., D]`` -> LM embedding ``[..., H]``."""

    def __init__(self, token_dim: int, hidden_size: int, out_size: int, act: str = "gelu"):
        super().__init__()
        self.linear_1 = nn.Linear(token_dim, hidden_size)
        self.act = ACT2FN[act]
        self.linear_2 = nn.Linear(hidden_size, out_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(tokens)))


# ============================================================================================
# outputs
# ============================================================================================
@dataclass
class AdaTokVLMOutput(ModelOutput):
    """Output of :meth:`AdaTokVLMForCausalLM.forward`.

    Args:
        loss: weighted sum ``w_text * text_loss + w_image * image_loss + w_stop * stop_loss`` (terms that
            have no positions in the batch are left out).
        logits: ``[B, T, V]`` the LM's logits (or the last ``logits_to_keep`` positions).
        cache: the LM's KV cache.
        hidden_states / attentions: as the LM returns them, when asked for.
        text_loss: CE over text targets.
        image_loss: continuous mode: flow-matching loss at image positions; discrete mode: CE on codes.
        stop_loss: CE of the stop decision (``[IMG]`` vs ``[EOI]``) at image positions.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: object | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    text_loss: torch.FloatTensor | None = None
    image_loss: torch.FloatTensor | None = None
    stop_loss: torch.FloatTensor | None = None


# ============================================================================================
# model
# ============================================================================================
class AdaTokVLMPreTrainedModel(PreTrainedModel):
    config_class = AdaTokVLMConfig
    # No attribute carries this name, so ``base_model`` is the VLM itself and no checkpoint key is renamed.
    base_model_prefix = "vlm"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        # Only the projector and the flow head reach this: the LM and AdaTok are PreTrainedModels that
        # initialise themselves (or were loaded) before they were wrapped.
        std = getattr(self.config.get_text_config(), "initializer_range", 0.02) or 0.02
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            if module.weight is not None:
                init.ones_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        # adaLN-Zero (children are initialised first, so these zeros win).
        elif isinstance(module, AdaLNResBlock):
            init.zeros_(module.adaLN_modulation[-1].weight)
            init.zeros_(module.adaLN_modulation[-1].bias)
        elif isinstance(module, FinalLayer):
            init.zeros_(module.adaLN_modulation[-1].weight)
            init.zeros_(module.adaLN_modulation[-1].bias)
            init.zeros_(module.linear.weight)
            init.zeros_(module.linear.bias)


class AdaTokVLMForCausalLM(AdaTokVLMPreTrainedModel, AdaTokVLMGenerationMixin):
    """A causal LM that reads and writes AdaTok images.

    Example::

        vlm = AdaTokVLMForCausalLM.from_text_model(lm, adatok, text_tokenizer)   # adds [BOI] [IMG] [EOI]
        processor = AdaTokVLMProcessor(AdaTokImageProcessor(size=32), text_tokenizer, adatok)
        batch = processor(text=["a cat: <image>"], images=[img], num_image_tokens=8, return_tensors="pt")
        out = vlm(**batch, labels=batch["input_ids"])                              # loss, text/image/stop parts
        enc = vlm.generate_images(prompt_ids, attention_mask)                      # stops at [EOI]
        images = processor.decode_images(enc)

    Submodules: ``language_model`` (any ``AutoModelForCausalLM``), ``adatok`` (frozen), ``projector``
    (trained), ``image_head`` (the flow head; continuous mode only).
    """

    # The LM ties its own weights (gathered by post_init). An empty dict, not None, tells PEFT to look for
    # tied weights in the sub-models, so trainable token rows reach a tied LM head too.
    _tied_weights_keys: dict[str, str] = {}

    def __init__(self, config: AdaTokVLMConfig, language_model: PreTrainedModel | None = None,
                 adatok: AdaTokModel | None = None):
        super().__init__(config)
        if language_model is None:
            language_model = AutoModelForCausalLM.from_config(config.text_config)
        if adatok is None:
            adatok = AdaTokModel(config.tokenizer_config)
        self.language_model = language_model
        self.adatok = adatok
        # One config object per part: resizing the LM's vocabulary updates the composite config too.
        config.text_config = language_model.config
        config.tokenizer_config = adatok.config
        self.adatok.requires_grad_(False)
        self.adatok.eval()

        hidden = self.lm_hidden_size
        token_dim = config.tokenizer_config.token_dim
        self.projector = ImageProjector(token_dim, config.projector_hidden_size or hidden, hidden,
                                        config.projector_hidden_act)
        self.image_head = None
        if config.image_mode == "continuous":
            self.image_head = FlowHead(token_dim, hidden, config.flow_head_width or hidden, config.flow_head_depth,
                                       config.flow_head_mlp_ratio, config.flow_time_sampling)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """``PreTrainedModel.from_pretrained``, after checking the folder: it exists (a missing local path is a
        ``FileNotFoundError`` with no hub request), holds a ``config.json`` object of ``model_type``
        ``"adatok_vlm"`` (an AdaTok tokenizer or DiT folder is refused before anything is built) and readable
        safetensors weights. ``subfolder=`` works as in ``transformers``; nothing downloads unless
        ``local_files_only=False``."""
        from transformers import PretrainedConfig

        from .tokenizer.loading import check_pretrained_folder, check_weight_files

        kwargs.setdefault("local_files_only", True)
        if kwargs.get("use_safetensors", True) is False:
            raise ValueError("use_safetensors=False: AdaTokVLMForCausalLM loads safetensors weights only (pickled "
                             "weights can run code when loaded); drop the argument")
        folder = check_pretrained_folder(
            pretrained_model_name_or_path, cls.config_class.model_type, kwargs.get("subfolder", ""), cls.__name__,
            need_config=not isinstance(kwargs.get("config"), PretrainedConfig), cache_dir=kwargs.get("cache_dir"),
            revision=kwargs.get("revision"), local_files_only=kwargs["local_files_only"])
        if folder is not None:
            check_weight_files(folder, cls.__name__)
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True gives a tuple
        model.adatok.requires_grad_(False)  # loading re-creates parameters; AdaTok stays frozen
        if model.config.flow_time_convention == NOISE_TO_DATA:   # saved before issue 18: convert the head once
            if model.image_head is not None:
                model.image_head.adopt_noise_to_data_time_()      # exact: v_new(x, t) = -v_old(x, 1 - t)
            model.config.flow_time_convention = DATA_TO_NOISE
        return loaded

    # ------------------------------------------------------------------ saving
    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModelForCausalLM"):
        """No-op. transformers calls it after a ``trust_remote_code`` load so that saving copies the class's
        source file; ours lives in the installed package and :meth:`save_pretrained` writes the ``auto_map``."""

    def save_pretrained(self, save_directory, *args, model_card: dict | None = None, **kwargs):
        """``PreTrainedModel.save_pretrained`` (safetensors), plus a ``README.md`` model card (config summary,
        the AdaTok preset, training data/steps/metrics from ``model_card={"training": {...}, "metrics": {...}}``
        or the ``training_info.json`` and ``vlm_training.json`` already in the folder) and the ``auto_map`` that
        loads the folder without ``import adatok_vlm`` (with ``trust_remote_code=True``). ``push_to_hub=True``
        pushes all of it."""
        from .tokenizer.model_card import card_sections, write_auto_map

        push_to_hub = kwargs.pop("push_to_hub", False)
        hub_kwargs = {k: kwargs.pop(k) for k in ("repo_id", "commit_message", "private", "token") if k in kwargs}
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            write_auto_map(save_directory, {"AutoConfig": "AdaTokVLMConfig",
                                            "AutoModelForCausalLM": "AdaTokVLMForCausalLM"})
            self.write_model_card(save_directory, *card_sections(save_directory, model_card))
        if push_to_hub:
            self.push_to_hub(hub_kwargs.pop("repo_id", os.path.basename(os.path.normpath(save_directory))),
                             **hub_kwargs)
        return result

    def write_model_card(self, save_directory, training: dict | None = None, metrics: dict | None = None):
        """Write ``save_directory/README.md`` for this VLM (see :mod:`adatok_vlm.tokenizer.model_card`); the
        training section adds what :data:`VLM_TRAINING_INFO` in the folder records (direction, prompt layout)."""
        from .tokenizer.configuration_adatok import ADATOK_PRESETS
        from .tokenizer.model_card import closest_preset, read_training_info, write_model_card

        c, lm_config = self.config, self.language_model.config
        tc = c.tokenizer_config
        preset, overrides = closest_preset(tc.to_dict(), ADATOK_PRESETS)
        info = read_training_info(save_directory, VLM_TRAINING_INFO)
        training = {**{k: info[k] for k in ("direction", "steps", "finetune", "tokenizer", "class_names",
                                            "t2i_template", "i2t_template") if k in info}, **(training or {})}
        summary = {
            "language model": f"{lm_config.model_type} ({self.language_model.num_parameters():,} parameters)",
            "LM hidden size / layers": f"{self.lm_hidden_size} / {getattr(lm_config, 'num_hidden_layers', '?')}",
            "vocabulary (with image tokens)": self.vocab_size,
            "image_mode": c.image_mode,
            "image tokens (BOI / IMG / EOI)": f"{c.boi_token} / {c.img_token} / {c.eoi_token}",
            "token ids": f"{c.boi_token_id} / {c.img_token_id} / {c.eoi_token_id}",
            "AdaTok image size": tc.image_size,
            "max image tokens (m)": tc.num_latent_tokens,
            "token_dim": tc.token_dim,
            "AdaTok length policy": bool(getattr(self.adatok, "has_policy", False)),
            "flow head (depth, Euler steps)": f"{c.flow_head_depth}, {c.num_flow_steps}" if self.image_head else "-",
            "loss weights (text, image, stop)": f"{c.text_loss_weight}, {c.image_loss_weight}, {c.stop_loss_weight}",
        }
        usage = ("import adatok_vlm, transformers\n"
                 "vlm = transformers.AutoModelForCausalLM.from_pretrained(FOLDER)\n"
                 "processor = transformers.AutoProcessor.from_pretrained(FOLDER)   # finds the AdaTok in the VLM\n"
                 "print(vlm.caption(processor, [image]))                           # image -> text\n"
                 "enc = vlm.generate_images(prompt_ids)                            # text -> image, stops at "
                 f"{c.eoi_token}\n"
                 "images = processor.decode_images(enc)")
        description = (f"An AdaTok VLM: a causal LM ({lm_config.model_type}) that reads and writes images as "
                       f"variable-length AdaTok tokens, {c.boi_token} z_1..z_L {c.eoi_token}, L chosen per image by "
                       "AdaTok's length policy. The LM decides when an image ends by emitting "
                       f"{c.eoi_token} (the paper's [EOS] role; distinct from the LM's end-of-text token).")
        return write_model_card(save_directory, c.model_type, "AdaTok VLM", description, summary,
                                preset=preset, overrides=overrides, training=training or None, metrics=metrics,
                                usage=usage, tags=["vision-language", "image-tokenizer"],
                                pipeline_tag="image-text-to-text")

    # ------------------------------------------------------------------ construction from parts
    @classmethod
    def from_text_model(cls, language_model: PreTrainedModel, adatok: AdaTokModel,
                        text_tokenizer: PreTrainedTokenizerBase, image_mode: str = "continuous",
                        boi_token: str = BOI_TOKEN, img_token: str = IMG_TOKEN, eoi_token: str = EOI_TOKEN,
                        reuse_existing_tokens: bool = False, **config_kwargs) -> "AdaTokVLMForCausalLM":
        """Give a causal LM the image modality.

        Adds the three image tokens (``boi_token``, ``img_token``, ``eoi_token``; by default ``[BOI]``,
        ``[IMG]``, ``[EOI]``) to ``text_tokenizer`` as special tokens (in place), resizes the LM's embeddings
        (and, in discrete mode, appends AdaTok's FSQ codebook to the vocabulary), stores the strings and ids in
        the config and wraps the parts. A string the tokenizer already holds as one token (an LM's own
        ``<|image_start|>``/``<|image_end|>`` pair, say) is an error unless ``reuse_existing_tokens=True``, which
        takes its existing id (and embedding row) instead of adding a new one. ``eoi_token`` may never be the
        LM's end-of-text token: an image's end is not the text's end. ``config_kwargs`` set any other
        :class:`AdaTokVLMConfig` field (head size, loss weights...). The LM keeps its weights; AdaTok is frozen.
        """
        if not isinstance(language_model, PreTrainedModel) or language_model.get_input_embeddings() is None:
            raise TypeError("language_model must be a transformers causal LM (AutoModelForCausalLM), got "
                            f"{type(language_model).__name__}")
        if language_model.get_output_embeddings() is None:
            raise TypeError(f"language_model must have an LM head (a *ForCausalLM class), got "
                            f"{type(language_model).__name__}; load it with AutoModelForCausalLM")
        if not isinstance(adatok, AdaTokModel):
            raise TypeError(f"adatok must be an AdaTokModel, got {type(adatok).__name__}")
        if not isinstance(text_tokenizer, PreTrainedTokenizerBase):
            raise TypeError(f"text_tokenizer must be a transformers tokenizer, got {type(text_tokenizer).__name__}")
        if image_mode == "discrete" and not adatok.is_fsq:
            raise ValueError("image_mode='discrete' needs an FSQ AdaTok (config.bottleneck='fsq'); "
                             "use image_mode='continuous' for continuous tokens")

        strings = {"boi_token": boi_token, "img_token": img_token, "eoi_token": eoi_token}
        ids = add_image_tokens(text_tokenizer, strings, reuse_existing_tokens)
        vocab = max(len(text_tokenizer), language_model.get_input_embeddings().num_embeddings)
        if image_mode == "discrete":
            config_kwargs.update(image_code_offset=vocab, codebook_size=adatok.bottleneck.codebook_size)
            vocab += adatok.bottleneck.codebook_size
        if vocab != language_model.get_input_embeddings().num_embeddings:
            language_model.resize_token_embeddings(vocab)

        # Everything already in the parts is initialised: post_init must only touch the new modules.
        for part in (language_model, adatok):
            for module in part.modules():
                module._is_hf_initialized = True
        # A composite config resets its sub-configs' attention implementation: keep the LM's own choice.
        attn_implementation = language_model.config._attn_implementation
        config = AdaTokVLMConfig(text_config=language_model.config, tokenizer_config=adatok.config,
                                 image_mode=image_mode, **strings, boi_token_id=ids["boi_token"],
                                 img_token_id=ids["img_token"], eoi_token_id=ids["eoi_token"], **config_kwargs)
        language_model.config._attn_implementation_internal = attn_implementation
        model = cls(config, language_model=language_model, adatok=adatok)
        reference = language_model.get_input_embeddings().weight
        model.projector.to(reference.device, reference.dtype)
        if model.image_head is not None:
            model.image_head.to(reference.device, reference.dtype)
        model.adatok.to(reference.device)
        return model

    # ------------------------------------------------------------------ properties and plumbing
    @property
    def lm_hidden_size(self) -> int:
        embeddings = self.language_model.get_input_embeddings()
        return int(getattr(embeddings, "embedding_dim", None) or embeddings.weight.shape[1])

    @property
    def vocab_size(self) -> int:
        """The LM's vocabulary size (rows of its embedding), read from its config (kept in sync by resizing)."""
        size = getattr(self.language_model.config, "vocab_size", None)
        return int(size) if size is not None else int(self.get_input_embeddings().weight.shape[0])

    @property
    def is_discrete(self) -> bool:
        return self.config.image_mode == "discrete"

    @property
    def image_code_ids(self) -> range:
        """Discrete mode: the vocabulary ids of the FSQ codes."""
        self._check_image_vocab()
        offset = self.config.image_code_offset
        return range(offset, offset + self.config.codebook_size)

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def get_decoder(self) -> nn.Module:
        return self.language_model.get_decoder()

    def train(self, mode: bool = True):
        super().train(mode)
        self.adatok.eval()  # frozen: no dropout, no NTM sampling, ever
        return self

    def _check_image_vocab(self) -> None:
        c = self.config
        if not c.has_image_tokens:
            raise ValueError("this AdaTokVLM has no [BOI]/[IMG]/[EOI] token ids in its config (boi_token_id is None): "
                             "build it with AdaTokVLMForCausalLM.from_text_model(lm, adatok, text_tokenizer), which "
                             "adds them to the tokenizer and the LM")
        vocab = self.vocab_size
        for name, value in c.image_token_ids.items():
            if not 0 <= value < vocab:
                raise ValueError(f"the {name} token id {value} is outside the LM's vocabulary of {vocab}; the LM was "
                                 "not resized for the image tokens (use AdaTokVLMForCausalLM.from_text_model)")
        if self.is_discrete:
            if c.image_code_offset is None:
                raise ValueError("discrete mode needs config.image_code_offset and codebook_size "
                                 "(set by from_text_model(..., image_mode='discrete'))")
            if c.image_code_offset + c.codebook_size > vocab:
                raise ValueError(f"the image codes [{c.image_code_offset}, {c.image_code_offset + c.codebook_size}) "
                                 f"do not fit the LM's vocabulary of {vocab}")

    # ------------------------------------------------------------------ images in
    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor, num_tokens="auto") -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels ``[N, 3, H, W]`` in [0, 1] -> (packed tokens ``[sum L, D]``, lengths ``[N]``) with AdaTok."""
        enc = self.adatok.encode(pixel_values, num_tokens=num_tokens)
        return pack_image_tokens(enc.tokens, enc.lengths), enc.lengths

    def _check_image_tokens(self, image_tokens, num_positions: int, image_lengths=None) -> None:
        d = self.config.tokenizer_config.token_dim
        if not isinstance(image_tokens, torch.Tensor) or not image_tokens.is_floating_point():
            raise TypeError(f"image_tokens must be a float tensor [sum L, {d}] (packed), got "
                            f"{getattr(image_tokens, 'dtype', type(image_tokens).__name__)}")
        if image_tokens.dim() != 2 or image_tokens.shape[-1] != d:
            raise ValueError(f"image_tokens must be packed as [sum L, {d}], got shape {tuple(image_tokens.shape)}; "
                             "pack padded tokens with pack_image_tokens(tokens, lengths)")
        if image_tokens.shape[0] != num_positions:
            raise ValueError(f"input_ids hold {num_positions} {IMG_TOKEN} positions but image_tokens has "
                             f"{image_tokens.shape[0]} rows; every image needs one {IMG_TOKEN} per token "
                             "(AdaTokVLMProcessor expands each <image> accordingly)")
        if not bool(torch.isfinite(image_tokens).all()):
            bad = int((~torch.isfinite(image_tokens)).any(-1).sum())
            raise ValueError(f"image_tokens hold NaN or inf values ({bad} of {image_tokens.shape[0]} rows); every image "
                             "token must be finite (were they encoded from NaN pixels, or by a diverged AdaTok?)")
        if image_lengths is not None and int(image_lengths.sum()) != image_tokens.shape[0]:
            raise ValueError(f"image_lengths sum to {int(image_lengths.sum())} but image_tokens has "
                             f"{image_tokens.shape[0]} rows")

    def embed_inputs(self, input_ids: torch.LongTensor, image_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Continuous mode: ``inputs_embeds [B, T, H]`` with ``projector(image_tokens)`` at the ``[IMG]`` positions.

        Image tokens are consumed in row-major order (batch, then position): the packing order of
        :class:`AdaTokVLMProcessor`.
        """
        embeds = self.get_input_embeddings()(input_ids)                                  # [B, T, H]
        if image_tokens is None:
            return embeds
        img = input_ids == self.config.img_token_id                                      # [B, T]
        projected = self.projector(image_tokens.to(embeds.dtype))                        # [sum L, H]
        return embeds.masked_scatter(img[..., None], projected)

    def image_tokens_to_codes(self, image_tokens: torch.Tensor) -> torch.LongTensor:
        """Discrete mode: FSQ tokens ``[N, D]`` -> vocabulary ids ``[N]`` (``code + image_code_offset``)."""
        codes = self.adatok.bottleneck.codes(image_tokens)
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.config.codebook_size):
            raise ValueError("image_tokens are not FSQ tokens of this AdaTok (their codes fall outside "
                             f"[0, {self.config.codebook_size})); encode images with the model's adatok")
        return codes + self.config.image_code_offset

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.FloatTensor | None = None,
        image_tokens: torch.FloatTensor | None = None,
        image_lengths: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> AdaTokVLMOutput:
        """Run the LM over text with images in it; with ``labels``, compute the three-part loss.

        Args:
            input_ids: ``[B, T]`` with each image as ``[BOI] [IMG] x L [EOI]``.
            attention_mask: ``[B, T]`` (1 = token). Positions skip padding (``cumsum(mask) - 1``).
            image_tokens: packed ``[sum L, D]`` AdaTok tokens, one row per ``[IMG]`` in row-major order.
            image_lengths: ``[num_images]`` (optional; checked against ``image_tokens``; with
                ``pixel_values`` it is the ``num_tokens`` to encode with).
            pixel_values: ``[num_images, 3, H, W]`` in [0, 1], encoded here by the frozen AdaTok instead of
                ``image_tokens`` (``image_lengths`` or the policy, ``"auto"``, picks the lengths).
            labels: ``[B, T]``, usually ``input_ids`` with ``-100`` where no loss is wanted. Image tokens whose
                ``[IMG]`` label is ``-100`` are read, not generated (no flow loss, no stop loss).
            cache / use_cache / position_ids / logits_to_keep: passed to the LM.
        """
        if "past_key_values" in kwargs:  # the pre-5.x name of `cache`
            cache = kwargs.pop("past_key_values")
        kwargs.pop("num_items_in_batch", None)  # Trainer's token count: each loss part here is its own mean
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if pixel_values is not None:
            if image_tokens is not None:
                raise ValueError("pass either image_tokens or pixel_values, not both")
            image_tokens, image_lengths = self.encode_images(
                pixel_values, "auto" if image_lengths is None else image_lengths)
        if labels is not None and input_ids is None:
            raise ValueError("labels need input_ids (the loss reads where the image tokens are)")

        lm_input_ids = None
        if input_ids is not None:
            img_mask = None
            if self.config.has_image_tokens:
                img_mask = input_ids == self.config.img_token_id
                num_img = int(img_mask.sum())
            else:
                num_img = 0
            if image_tokens is not None or num_img:
                self._check_image_vocab()
                if image_tokens is None:
                    raise ValueError(f"input_ids hold {num_img} {IMG_TOKEN} positions but no image_tokens (or "
                                     "pixel_values) were given")
                self._check_image_tokens(image_tokens, num_img, image_lengths)
                image_tokens = image_tokens.to(input_ids.device)
            if self.is_discrete:
                if num_img:
                    codes = self.image_tokens_to_codes(image_tokens)
                    input_ids = input_ids.masked_scatter(img_mask, codes)
                    if labels is not None:
                        stray = (labels == self.config.img_token_id) & ~img_mask
                        if stray.any():
                            raise ValueError(f"labels hold {IMG_TOKEN} where input_ids do not")
                        labels = torch.where(labels == self.config.img_token_id, input_ids, labels)
                lm_input_ids = input_ids
            else:
                inputs_embeds = self.embed_inputs(input_ids, image_tokens if num_img else None)

        if position_ids is None and attention_mask is not None and attention_mask.dim() == 2:
            seq_len = (inputs_embeds if lm_input_ids is None else lm_input_ids).shape[1]
            position_ids = position_ids_from_mask(attention_mask)[:, -seq_len:]
        need_hidden = bool(output_hidden_states) or (labels is not None and not self.is_discrete)
        out = self.language_model(
            input_ids=lm_input_ids, inputs_embeds=inputs_embeds if lm_input_ids is None else None,
            attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=use_cache,
            output_hidden_states=need_hidden, logits_to_keep=0 if labels is not None else logits_to_keep,
            **kwargs,
        )

        losses = {}
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, "
                                 f"got {tuple(labels.shape)}")
            if self.is_discrete:
                losses = self._discrete_losses(input_ids, labels, out.logits)
            else:
                losses = self._continuous_losses(input_ids, labels, out.logits, out.hidden_states[-1], image_tokens)
        loss = None
        if labels is not None:
            c = self.config
            weights = {"text_loss": c.text_loss_weight, "image_loss": c.image_loss_weight,
                       "stop_loss": c.stop_loss_weight}
            terms = [weights[k] * v for k, v in losses.items() if v is not None]
            loss = torch.stack(terms).sum() if terms else out.logits.sum() * 0.0
        return AdaTokVLMOutput(
            loss=loss, logits=out.logits, cache=getattr(out, "cache", None),
            hidden_states=out.hidden_states if output_hidden_states else None,
            attentions=getattr(out, "attentions", None), **losses,
        )

    # ------------------------------------------------------------------ losses
    def _continuous_losses(self, input_ids, labels, logits, hidden, image_tokens) -> dict:
        """Text CE, flow loss at image positions, and the two-way ``[IMG]``/``[EOI]`` stop CE.

        Position ``j`` predicts token ``j + 1``: the hidden state at ``[BOI]`` or at image token ``i`` is the
        condition of the flow head for image token ``i + 1``; the logits there decide ``[IMG]`` vs ``[EOI]``.
        """
        c = self.config
        cur, tgt, lg = input_ids[:, :-1], labels[:, 1:], logits[:, :-1]                 # [B, T-1](, V)
        valid = tgt != IGNORE_INDEX
        at_img, at_boi = cur == c.img_token_id, cur == c.boi_token_id
        out = {"text_loss": None, "image_loss": None, "stop_loss": None}

        # Text: everything but image-internal decisions ([BOI] -> [IMG] is fixed, [IMG] -> ? is the stop CE).
        text = valid & ~at_img & ~at_boi
        if text.any():
            out["text_loss"] = F.cross_entropy(lg[text].float(), tgt[text])

        # Stop decision, on the LM's own logits restricted to {[IMG], [EOI]} exactly as in generation.
        stop = valid & at_img & ((tgt == c.img_token_id) | (tgt == c.eoi_token_id))
        if stop.any():
            two = lg[stop][:, [c.img_token_id, c.eoi_token_id]].float()                 # [S, 2]
            out["stop_loss"] = F.cross_entropy(two, (tgt[stop] == c.eoi_token_id).long())

        # Flow matching: the image token at [IMG] position j, conditioned on the hidden state at j - 1.
        img = input_ids == c.img_token_id                                                # [B, T]
        if img.any():
            row = (img.flatten().cumsum(0) - 1).view_as(input_ids)                       # index into image_tokens
            gen = img[:, 1:] & (labels[:, 1:] != IGNORE_INDEX)                           # [B, T-1]
            if gen.any():
                cond = hidden[:, :-1][gen]                                               # [N, H]
                target = image_tokens[row[:, 1:][gen]].detach()                          # [N, D]
                out["image_loss"] = self.image_head.loss(target, cond, c.flow_batch_mul)
        return out

    def _discrete_losses(self, input_ids, labels, logits) -> dict:
        """Plain next-token CE split into text, image codes and ``[EOI]`` after an image."""
        c = self.config
        cur, tgt, lg = input_ids[:, :-1], labels[:, 1:], logits[:, :-1].float()
        valid = tgt != IGNORE_INDEX
        low, high = c.image_code_offset, c.image_code_offset + c.codebook_size
        cur_code = (cur >= low) & (cur < high)
        tgt_code = (tgt >= low) & (tgt < high)
        image = valid & tgt_code
        stop = valid & cur_code & (tgt == c.eoi_token_id)
        text = valid & ~image & ~stop
        return {name: F.cross_entropy(lg[sel], tgt[sel]) if sel.any() else None
                for name, sel in (("text_loss", text), ("image_loss", image), ("stop_loss", stop))}


__all__ = [
    "AdaTokVLMForCausalLM",
    "AdaTokVLMGenerationMixin",
    "AdaTokVLMOutput",
    "AdaTokVLMPreTrainedModel",
    "ExactImageTokensLogitsProcessor",
    "ImageLengthLogitsProcessor",
    "ImageProjector",
    "ImageVocabularyLogitsProcessor",
    "MaxImageTokensLogitsProcessor",
    "MinImageTokensLogitsProcessor",
    "image_span_state",
    "position_ids_from_mask",
]
