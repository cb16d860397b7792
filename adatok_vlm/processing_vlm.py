"""Processor of the AdaTok VLM: text with ``<image>`` placeholders + images -> LM inputs with image tokens.

Each ``<image>`` in the text becomes ``[BOI] + [IMG] x L + [EOI]``, where ``L`` is the number of tokens
AdaTok gives that image: its policy's choice (``num_image_tokens="auto"``, paper Sec. 4.2), a fixed int,
or one length per image. The image tokens themselves come back packed, ``[sum L, D]`` in image order,
ready for :meth:`AdaTokVLMForCausalLM.forward` to scatter into the ``[IMG]`` positions.

The processor holds the frozen AdaTok (to encode and decode), an :class:`AdaTokImageProcessor` (any image
-> pixels in [0, 1]) and the text tokenizer that :meth:`AdaTokVLMForCausalLM.from_text_model` extended with
the three special tokens. ``save_pretrained`` writes the AdaTok into an ``adatok/`` sub-folder so that
``AutoProcessor.from_pretrained`` restores all three.
"""

from __future__ import annotations

import numbers
import os
from pathlib import Path

import torch
from PIL import Image
from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .configuration_vlm import BOI_TOKEN, EOI_TOKEN, IMG_TOKEN, check_image_token_strings
from .tokenizer import AdaTokEncoding, AdaTokModel, pack_image_tokens, unpack_image_tokens
from .tokenizer.image_processing_adatok import AdaTokImageProcessor
from .tokenizer.validation import _describe, check_lengths, resolve_num_tokens

ADATOK_SUBFOLDER = "adatok"


class AdaTokVLMProcessor(ProcessorMixin):
    r"""Turns ``text`` with ``<image>`` placeholders and ``images`` into ``input_ids``, ``attention_mask``,
    ``image_tokens [sum L, D]`` and ``image_lengths [num_images]``; turns generated tokens back into images.

    Args:
        image_processor (`AdaTokImageProcessor`): any image -> ``pixel_values`` in [0, 1] at AdaTok's size.
        tokenizer (`PreTrainedTokenizerBase`): the text tokenizer, holding ``[BOI]``, ``[IMG]``, ``[EOI]``.
        adatok (`AdaTokModel`, *optional*): the frozen tokenizer that encodes and decodes images. Without it
            the processor still expands text for given ``image_encoding``s.
        image_token (`str`): the placeholder in the text, ``"<image>"`` by default.
        num_image_tokens: default length rule: ``"auto"`` (the AdaTok policy; needs one), an int, or the
            quality dial ``{"max_mse": x}`` / ``{"mean_budget": n}`` (AdaTok's ``encode`` reads them).
        boi_token / img_token / eoi_token (`str`): the image tokens' strings, as in the VLM's config
            (``vlm.config.image_token_strings``; defaults ``[BOI]``, ``[IMG]``, ``[EOI]``).

    Example::

        processor = AdaTokVLMProcessor(AdaTokImageProcessor(size=32), text_tokenizer, adatok)
        batch = processor(text=["<image> a shoe"], images=[img], num_image_tokens=8)
        processor.decode_images(vlm.generate_images(prompt_ids))      # -> list of PIL images
    """

    model_input_names = ["input_ids", "attention_mask", "image_tokens", "image_lengths"]

    def __init__(self, image_processor=None, tokenizer=None, adatok: AdaTokModel | None = None,
                 image_token: str = "<image>", num_image_tokens="auto", chat_template=None,
                 boi_token: str = BOI_TOKEN, img_token: str = IMG_TOKEN, eoi_token: str = EOI_TOKEN, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        if adatok is not None and not isinstance(adatok, AdaTokModel):
            raise TypeError(f"adatok must be an AdaTokModel or None, got {type(adatok).__name__}")
        if not isinstance(image_token, str) or not image_token:
            raise ValueError(f"image_token must be a non-empty string, got {image_token!r}")
        strings = {"boi_token": boi_token, "img_token": img_token, "eoi_token": eoi_token}
        check_image_token_strings(strings)
        if image_token in strings.values():
            raise ValueError(f"image_token {image_token!r} must differ from the image tokens {strings}")
        self._check_length_rule(num_image_tokens, "num_image_tokens")
        # Kept out of __dict__'s serialisable names: a model is not processor config.
        self._adatok = adatok
        self.image_token = image_token
        self.num_image_tokens = num_image_tokens
        self.boi_token, self.img_token, self.eoi_token = boi_token, img_token, eoi_token

    @classmethod
    def from_model(cls, vlm, tokenizer, image_processor=None, **kwargs) -> "AdaTokVLMProcessor":
        """The processor of ``vlm`` (an :class:`AdaTokVLMForCausalLM`): its AdaTok (shared, not copied), its image
        token strings, and an :class:`AdaTokImageProcessor` at AdaTok's image size unless one is given."""
        if image_processor is None:
            image_processor = AdaTokImageProcessor(size=vlm.config.tokenizer_config.image_size)
        return cls(image_processor, tokenizer, vlm.adatok, **{**vlm.config.image_token_strings, **kwargs})

    # ------------------------------------------------------------------ the parts
    @property
    def adatok(self) -> AdaTokModel | None:
        return self._adatok

    @adatok.setter
    def adatok(self, value: AdaTokModel | None) -> None:
        if value is not None and not isinstance(value, AdaTokModel):
            raise TypeError(f"adatok must be an AdaTokModel or None, got {type(value).__name__}")
        self._adatok = value

    def special_token_ids(self) -> dict[str, int]:
        """``{"[BOI]": id, "[IMG]": id, "[EOI]": id}`` (keyed by role) of this processor's image token strings in
        the text tokenizer; a clear error if any is missing."""
        ids = {}
        vocab = self.tokenizer.get_vocab()
        for role, name in ((BOI_TOKEN, self.boi_token), (IMG_TOKEN, self.img_token), (EOI_TOKEN, self.eoi_token)):
            if name not in vocab:
                raise ValueError(f"the text tokenizer has no {name} token; AdaTokVLMForCausalLM.from_text_model(lm, "
                                 f"adatok, text_tokenizer) adds {self.boi_token}, {self.img_token} and "
                                 f"{self.eoi_token} to it (build the processor with the model's token strings: "
                                 "AdaTokVLMProcessor.from_model(vlm, tokenizer))")
            ids[role] = vocab[name]
        return ids

    def _require_adatok(self, what: str) -> AdaTokModel:
        if self._adatok is None:
            raise ValueError(f"{what} needs the AdaTok model: build the processor with adatok=... (or load it from a "
                             f"folder with an '{ADATOK_SUBFOLDER}/' sub-folder)")
        return self._adatok

    @staticmethod
    def _check_length_rule(value, name: str) -> None:
        if isinstance(value, bool):
            raise TypeError(f"{name} must be 'auto', an int or a LongTensor, got bool {value!r}")
        if isinstance(value, str) and value not in ("auto", "sample", "search", "oracle"):
            raise ValueError(f"{name} must be 'auto', an int or a LongTensor [num_images], got {value!r}")
        if isinstance(value, numbers.Integral) and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")

    # ------------------------------------------------------------------ images <-> tokens
    def encode_images(self, images, num_image_tokens=None) -> AdaTokEncoding:
        """Images (anything :class:`AdaTokImageProcessor` reads) -> :class:`AdaTokEncoding` on the CPU."""
        adatok = self._require_adatok("encoding images")
        rule = self.num_image_tokens if num_image_tokens is None else num_image_tokens
        self._check_length_rule(rule, "num_image_tokens")
        if rule in ("auto", "sample") and not adatok.has_policy:
            raise ValueError(f"num_image_tokens={rule!r} needs AdaTok's length policy, and this AdaTok has none "
                             "(train one with adatok_vlm.training.train_policy); pass num_image_tokens as an int "
                             "or a LongTensor [num_images]")
        pixel_values = self.image_processor(images, size=adatok.config.image_size, return_tensors="pt")["pixel_values"]
        if not isinstance(rule, (str, dict)):  # an int or one length per image: checked here, under its own name
            rule = resolve_num_tokens(rule, pixel_values.shape[0], adatok.num_latent_tokens, torch.device("cpu"),
                                      name="num_image_tokens")
        enc = adatok.encode(pixel_values, num_tokens=rule)
        return AdaTokEncoding(tokens=enc.tokens.cpu(), lengths=enc.lengths.cpu(),
                              codes=None if enc.codes is None else enc.codes.cpu())

    def decode_images(self, encoding: AdaTokEncoding | tuple) -> list[Image.Image]:
        """Generated (or encoded) tokens -> PIL images, through AdaTok's decoder.

        ``encoding`` is an :class:`AdaTokEncoding` (padded tokens + lengths) or a ``(tokens, lengths)`` pair,
        where ``tokens`` may also be packed ``[sum L, D]``.
        """
        adatok = self._require_adatok("decode_images")
        if isinstance(encoding, AdaTokEncoding):
            tokens, lengths = encoding.tokens, encoding.lengths
        elif isinstance(encoding, (tuple, list)) and len(encoding) == 2:
            tokens, lengths = encoding
        else:
            raise TypeError("decode_images expects an AdaTokEncoding or (tokens, lengths), got "
                            f"{type(encoding).__name__}")
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"tokens must be a float tensor, padded [B, L, D] or packed [sum L, D], got "
                            f"{type(tokens).__name__}")
        if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1:
            raise TypeError(f"lengths must be a LongTensor [B], got {_describe(lengths)}")
        if tokens.dim() == 2:
            lengths = check_lengths(lengths, lengths.shape[0], adatok.num_latent_tokens)
            if int(lengths.sum()) != tokens.shape[0]:
                raise ValueError(f"tokens: packed tokens have {tokens.shape[0]} rows but lengths sum to "
                                 f"{int(lengths.sum())}")
            tokens = unpack_image_tokens(tokens, lengths)
        with torch.no_grad():
            pixels = adatok.decode(tokens.to(adatok.device), lengths.to(adatok.device))
        return self.image_processor.postprocess(pixels)

    # ------------------------------------------------------------------ the call
    def __call__(self, text=None, images=None, num_image_tokens=None, image_encoding: AdaTokEncoding | None = None,
                 return_tensors: str = "pt", padding=True, **text_kwargs) -> BatchFeature:
        """Expand ``<image>`` placeholders and encode images.

        Args:
            text: a string or a list of strings; the ``i``-th placeholder (in reading order across the batch)
                takes the ``i``-th image.
            images: the images (a PIL image, a list, a numpy/torch batch...).
            num_image_tokens: ``"auto"`` (AdaTok's policy), an int, or a LongTensor ``[num_images]``;
                defaults to the processor's ``num_image_tokens``.
            image_encoding: already-encoded images (an :class:`AdaTokEncoding`) instead of ``images``, e.g.
                tokens extracted once for training; needs no AdaTok.
            return_tensors: ``"pt"`` (image tokens are torch tensors).
            padding / text_kwargs: passed to the text tokenizer (``padding_side="left"`` for generation).
        Returns:
            ``BatchFeature`` with ``input_ids``, ``attention_mask`` and, when there are images,
            ``image_tokens [sum L, D]`` and ``image_lengths [num_images]``.
        """
        if text is not None and not isinstance(text, (str, list, tuple)):
            raise TypeError(f"text must be a string or a non-empty list of strings, got {type(text).__name__}")
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors must be 'pt' (image tokens are torch tensors), got {return_tensors!r}")
        if text is None and images is None and image_encoding is None:
            raise ValueError("pass text, images (or image_encoding), or both")
        if images is not None and image_encoding is not None:
            raise ValueError("pass either images or image_encoding, not both")

        encoding = image_encoding
        if images is not None:
            encoding = self.encode_images(images, num_image_tokens)
        elif num_image_tokens is not None and image_encoding is not None:
            raise ValueError("num_image_tokens applies to images; an image_encoding already has its lengths")
        if encoding is not None and not isinstance(encoding, AdaTokEncoding):
            raise TypeError(f"image_encoding must be an AdaTokEncoding, got {type(encoding).__name__}")

        data = {}
        if encoding is not None:
            data["image_tokens"] = pack_image_tokens(encoding.tokens, encoding.lengths)
            data["image_lengths"] = encoding.lengths.long()
        if text is None:
            return BatchFeature(data=data)

        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError("text must be a string or a non-empty list of strings")
        num_placeholders = sum(t.count(self.image_token) for t in texts)
        num_images = 0 if encoding is None else int(encoding.lengths.shape[0])
        if num_placeholders != num_images:
            raise ValueError(f"text has {num_placeholders} {self.image_token!r} placeholder(s) but {num_images} "
                             "image(s) were given; each image needs exactly one placeholder")
        ids = self.special_token_ids()
        expanded = self._expand(texts, [] if encoding is None else encoding.lengths.tolist())
        text_inputs = self.tokenizer(expanded, return_tensors="pt", padding=padding, **text_kwargs)

        # Every image must arrive whole: as many [IMG] as tokens, per row (truncation or a stray "[IMG]" in the
        # text would silently misalign tokens and positions).
        input_ids = text_inputs["input_ids"]
        found = (input_ids == ids[IMG_TOKEN]).sum(dim=1)
        expected = torch.tensor([self._row_tokens(t, encoding, texts) for t in range(len(texts))])
        if not torch.equal(found.cpu(), expected):
            raise ValueError(f"the tokenized text holds {found.tolist()} {self.img_token} tokens per row but the images "
                             f"have {expected.tolist()}; the text may be truncated (raise max_length) or contain a "
                             f"literal {self.img_token}")
        for role, name in ((BOI_TOKEN, self.boi_token), (EOI_TOKEN, self.eoi_token)):
            count = int((input_ids == ids[role]).sum())
            if count != num_images:
                raise ValueError(f"the tokenized text holds {count} {name} tokens for {num_images} image(s)")
        data.update(text_inputs)
        return BatchFeature(data=data)

    def _expand(self, texts: list[str], lengths: list[int]) -> list[str]:
        expanded, k = [], 0
        for t in texts:
            parts = t.split(self.image_token)
            out = parts[0]
            for part in parts[1:]:
                out += self.boi_token + self.img_token * lengths[k] + self.eoi_token + part
                k += 1
            expanded.append(out)
        return expanded

    def _row_tokens(self, row: int, encoding, texts: list[str]) -> int:
        if encoding is None:
            return 0
        start = sum(t.count(self.image_token) for t in texts[:row])
        stop = start + texts[row].count(self.image_token)
        return int(encoding.lengths[start:stop].sum())

    # ------------------------------------------------------------------ save / load
    def to_dict(self) -> dict:
        adatok = self.__dict__.pop("_adatok", None)  # ProcessorMixin deep-copies __dict__: keep the model out
        try:
            return super().to_dict()
        finally:
            self.__dict__["_adatok"] = adatok

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """Save the image processor, the tokenizer, ``processor_config.json`` and AdaTok in ``adatok/``."""
        from .tokenizer.model_card import write_auto_map

        files = super().save_pretrained(save_directory, push_to_hub=False, **kwargs)
        if self._adatok is not None:
            self._adatok.save_pretrained(os.path.join(save_directory, ADATOK_SUBFOLDER))
        # Without `import adatok_vlm`, AutoProcessor would fall back to a plain text tokenizer: the auto_map
        # makes it ask for trust_remote_code=True (then load this class through the installed package).
        write_auto_map(save_directory, {"AutoProcessor": "AdaTokVLMProcessor"}, json_files=("processor_config.json",))
        if push_to_hub:
            self.push_to_hub(kwargs.get("repo_id", os.path.basename(os.path.normpath(save_directory))))
        return files

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoProcessor"):
        """No-op: the class lives in the installed package; :meth:`save_pretrained` writes the ``auto_map``."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, adatok: AdaTokModel | None = None, **kwargs):
        """Load a saved processor. AdaTok comes from ``adatok=`` (e.g. ``vlm.adatok``, shared), else from the
        folder: its ``adatok/`` sub-folder, or the AdaTok inside a saved VLM there (``config.json`` of an
        ``adatok_vlm`` model plus its weights, as ``train_vlm`` exports it)."""
        processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if adatok is None:
            folder = Path(pretrained_model_name_or_path)
            if kwargs.get("subfolder"):
                folder = folder / kwargs["subfolder"]
            if (folder / ADATOK_SUBFOLDER).is_dir():
                adatok = AdaTokModel.from_pretrained(folder / ADATOK_SUBFOLDER).eval()
            else:
                adatok = adatok_from_vlm_folder(folder)
        processor.adatok = adatok
        return processor


def adatok_from_vlm_folder(folder: str | Path) -> AdaTokModel | None:
    """The frozen AdaTok of a VLM saved in ``folder`` (``AdaTokVLMForCausalLM.save_pretrained``), read from its
    ``config.json`` (``tokenizer_config``) and the ``adatok.*`` tensors of its safetensors weights, without
    building the LM; ``None`` when ``folder`` holds no saved VLM."""
    import json

    from safetensors import safe_open

    from .configuration_vlm import AdaTokVLMConfig
    from .tokenizer import AdaTokConfig

    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise OSError(f"{config_file} is not valid JSON ({err}); re-save the model") from err
    if not isinstance(config, dict) or config.get("model_type") != AdaTokVLMConfig.model_type:
        return None
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = sorted({f for key, f in weight_map.items() if key.startswith("adatok.")})
    else:
        files = ["model.safetensors"]
    prefix = "adatok."
    state = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the saved VLM's weights (holding its AdaTok) are missing")
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    if key.startswith(prefix):
                        state[key[len(prefix):]] = f.get_tensor(key)
        except Exception as err:   # safetensors raises its own error type on a damaged file
            raise OSError(f"{path}: cannot read the VLM weights ({err}); the file is damaged, re-save the model") from err
    if not state:
        raise ValueError(f"{folder}: the saved VLM's weights hold no adatok.* tensors; pass adatok= (e.g. vlm.adatok)")
    adatok = AdaTokModel(AdaTokConfig.from_dict(config["tokenizer_config"]))
    result = adatok.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{folder}: the AdaTok weights inside the VLM do not fit its tokenizer_config: missing "
                         f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    return adatok.eval().requires_grad_(False)


__all__ = ["AdaTokVLMProcessor", "adatok_from_vlm_folder"]
