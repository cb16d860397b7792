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

from .configuration_vlm import BOI_TOKEN, EOI_TOKEN, IMG_TOKEN
from .modeling_vlm import pack_image_tokens, unpack_image_tokens
from .tokenizer import AdaTokEncoding, AdaTokModel
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
        num_image_tokens: default length rule, ``"auto"`` (the AdaTok policy; needs one) or an int.

    Example::

        processor = AdaTokVLMProcessor(AdaTokImageProcessor(size=32), text_tokenizer, adatok)
        batch = processor(text=["<image> a shoe"], images=[img], num_image_tokens=8)
        processor.decode_images(vlm.generate_images(prompt_ids))      # -> list of PIL images
    """

    model_input_names = ["input_ids", "attention_mask", "image_tokens", "image_lengths"]

    def __init__(self, image_processor=None, tokenizer=None, adatok: AdaTokModel | None = None,
                 image_token: str = "<image>", num_image_tokens="auto", chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        if adatok is not None and not isinstance(adatok, AdaTokModel):
            raise TypeError(f"adatok must be an AdaTokModel or None, got {type(adatok).__name__}")
        if not isinstance(image_token, str) or not image_token:
            raise ValueError(f"image_token must be a non-empty string, got {image_token!r}")
        self._check_length_rule(num_image_tokens, "num_image_tokens")
        # Kept out of __dict__'s serialisable names: a model is not processor config.
        self._adatok = adatok
        self.image_token = image_token
        self.num_image_tokens = num_image_tokens

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
        """The ids of ``[BOI]``, ``[IMG]``, ``[EOI]`` in the text tokenizer; a clear error if any is missing."""
        ids = {}
        vocab = self.tokenizer.get_vocab()
        for name in (BOI_TOKEN, IMG_TOKEN, EOI_TOKEN):
            if name not in vocab:
                raise ValueError(f"the text tokenizer has no {name} token; AdaTokVLMForCausalLM.from_text_model(lm, "
                                 f"adatok, text_tokenizer) adds {BOI_TOKEN}, {IMG_TOKEN} and {EOI_TOKEN} to it")
            ids[name] = vocab[name]
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
            raise ValueError(f"the tokenized text holds {found.tolist()} {IMG_TOKEN} tokens per row but the images "
                             f"have {expected.tolist()}; the text may be truncated (raise max_length) or contain a "
                             f"literal {IMG_TOKEN}")
        for name in (BOI_TOKEN, EOI_TOKEN):
            count = int((input_ids == ids[name]).sum())
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
                out += BOI_TOKEN + IMG_TOKEN * lengths[k] + EOI_TOKEN + part
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
        files = super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        if self._adatok is not None:
            self._adatok.save_pretrained(os.path.join(save_directory, ADATOK_SUBFOLDER))
        return files

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, adatok: AdaTokModel | None = None, **kwargs):
        """Load a saved processor; AdaTok comes from ``adatok=`` (e.g. ``vlm.adatok``, shared) or ``adatok/``."""
        processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if adatok is None:
            folder = Path(pretrained_model_name_or_path) / ADATOK_SUBFOLDER
            if folder.is_dir():
                adatok = AdaTokModel.from_pretrained(folder).eval()
        processor.adatok = adatok
        return processor


__all__ = ["AdaTokVLMProcessor"]
