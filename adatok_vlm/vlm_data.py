"""Training sequences for the AdaTok VLM: captioned images -> padded ids, labels and packed image tokens.

One example is a caption and an image, laid out by a template with one ``<image>``:

* **text-to-image** (``"t2i"``, default template ``"{caption}<image>"``): the caption and ``[BOI]`` are the
  condition (no loss), the image is *written*: its ``[IMG] x L [EOI]`` positions carry labels, so the flow head
  learns each token and the LM learns the stop decision (the target after image token ``i`` is ``[IMG]``
  for ``i < L`` and ``[EOI]`` after the last, ``L`` being the length AdaTok's policy chose, paper Sec. 4.2);
* **image-to-text** (``"i2t"``, default ``"<image>{caption}"``): the image is *read* (labels ``-100`` on its
  span: no flow or stop loss) and the caption after it (plus EOS) is the text target.

Images arrive as pixels (``pixel_values [3, S, S]`` in [0, 1]) and are tokenized on the fly by the frozen
AdaTok held by the collator, at the policy's length (``"auto"``, when AdaTok has a policy) or a fixed one;
or they arrive already tokenized (``tokens [L, D]``, e.g. from the token cache written by
``adatok_vlm.training.extract_tokens``). Class-labelled data sets become captions with
:func:`class_captions` (``"Sneaker"`` -> ``"a sneaker"``).

    collator = VLMCollator(text_tokenizer, vlm.config, adatok=vlm.adatok, direction="t2i")
    batch = collator([{"caption": "a sneaker", "pixel_values": px}, ...])
    loss = vlm(**batch).loss        # input_ids, attention_mask, labels, image_tokens [sum L, D], image_lengths

:func:`prompt_ids` is the one place that turns a caption into the ids before ``[BOI]``; generation
(``adatok sample-t2i``) uses it too, so prompts look exactly like training prompts.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from .configuration_vlm import AdaTokVLMConfig
from .tokenizer import AdaTokModel

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
DIRECTIONS = ("t2i", "i2t", "mixed")
DEFAULT_TEMPLATES = {"t2i": "{caption}" + IMAGE_PLACEHOLDER, "i2t": IMAGE_PLACEHOLDER + "{caption}"}


# ============================================================================================
# captions and prompts
# ============================================================================================
def class_captions(class_names: Sequence[str], template: str = "{article} {name_lower}") -> list[str]:
    """One caption per class: ``template`` with ``{name}``, ``{name_lower}`` and ``{article}`` ("a"/"an").

    ``class_captions(["Sneaker", "Ankle boot"])`` -> ``["a sneaker", "an ankle boot"]``.
    """
    out = []
    for name in class_names:
        lower = str(name).lower()
        article = "an" if lower[:1] in "aeiou" and lower else "a"
        out.append(template.format(name=name, name_lower=lower, article=article))
    return out


def split_template(template: str) -> tuple[str, str]:
    """``"{caption}<image>"`` -> ``("{caption}", "")``: the text before and after the one image."""
    if not isinstance(template, str) or template.count(IMAGE_PLACEHOLDER) != 1 or "{caption}" not in template:
        raise ValueError(f"a template needs exactly one {IMAGE_PLACEHOLDER!r} and a '{{caption}}', got {template!r}")
    before, after = template.split(IMAGE_PLACEHOLDER)
    return before, after


def tokenizer_adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether ``tokenizer(text)`` starts with its BOS token (Llama-style tokenizers do, GPT-2's does not)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def text_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def prompt_ids(tokenizer: PreTrainedTokenizerBase, caption: str | None, template: str = DEFAULT_TEMPLATES["t2i"],
               add_bos: bool | None = None) -> list[int]:
    """The ids before ``[BOI]`` for ``caption`` under ``template``: BOS (``add_bos``; ``None``: when the tokenizer
    adds one itself) + the text before ``<image>``. ``caption=None`` is the dropped (unconditional) prompt:
    no ids at all, the sequence starts at ``[BOI]``, the default negative prompt of classifier-free guidance.
    """
    if caption is None:
        return []
    before, _ = split_template(template)
    if add_bos is None:
        add_bos = tokenizer_adds_bos(tokenizer)
    bos = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
    return bos + text_ids(tokenizer, before.format(caption=caption))


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Prompts of different lengths -> left-padded ``input_ids [B, T]`` and ``attention_mask [B, T]``."""
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
    return ids, mask


# ============================================================================================
# a captioned-image data set
# ============================================================================================
class CaptionedImages(torch.utils.data.Dataset):
    """Pairs the items of an image data set with captions.

    ``images[i]`` is a dict with ``pixel_values [3, S, S]`` or ``tokens [L, D]`` (and usually ``label``), or a
    skipped item (anything else, e.g. ``training.data.SkippedImage``), passed through for the collator to
    count. Captions come per item (``captions``, one per image) or per class (``label_captions[item["label"]]``,
    e.g. from :func:`class_captions`). Items get ``caption`` and ``index``. (Plain lists, no closures: the data
    set pickles into DataLoader workers under any start method.)
    """

    def __init__(self, images: torch.utils.data.Dataset, captions: Sequence[str] | None = None,
                 label_captions: Sequence[str] | None = None):
        if (captions is None) == (label_captions is None):
            raise ValueError("pass exactly one of captions (one per image) and label_captions (one per class)")
        if captions is not None and len(captions) != len(images):
            raise ValueError(f"captions: expected one per image ({len(images)}), got {len(captions)}")
        self.images = images
        self.captions = None if captions is None else list(captions)
        self.label_captions = None if label_captions is None else list(label_captions)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        item = self.images[int(index)]
        if not isinstance(item, dict):
            return item
        if self.captions is not None:
            caption = self.captions[int(index)]
        else:
            label = int(item.get("label", -1))
            if not 0 <= label < len(self.label_captions):
                raise ValueError(f"item {index} has label {label}, outside the {len(self.label_captions)} "
                                 "class captions")
            caption = self.label_captions[label]
        return {**item, "caption": str(caption), "index": int(index)}


# ============================================================================================
# the collator
# ============================================================================================
class VLMCollator:
    """Items ``{"caption", "pixel_values" | "tokens", ["index"], ["direction"]}`` -> a VLM training batch.

    Args:
        tokenizer: the text tokenizer holding ``[BOI]``/``[IMG]``/``[EOI]`` (after ``from_text_model``).
        config: the VLM's :class:`AdaTokVLMConfig` (special-token ids, ``token_dim``, ``m``).
        adatok: the frozen AdaTok that tokenizes ``pixel_values`` items (on its own device); not needed when
            every item brings ``tokens``.
        num_image_tokens: ``"auto"`` (AdaTok's policy) or an int; with ``"auto"`` and an AdaTok without a
            policy, ``fallback_num_image_tokens`` (an error when that is ``None``).
        direction: ``"t2i"``, ``"i2t"`` or ``"mixed"`` (each item's direction drawn from ``(seed, epoch, index)``).
        t2i_template / i2t_template: layouts with one ``<image>`` and a ``{caption}``.
        prompt_dropout: t2i only: probability of dropping the whole prompt (classifier-free guidance).
        max_text_tokens: captions are cut to this many tokens (an image span is never cut).
        add_bos: put BOS first (``None``: when the tokenizer adds one itself); add_eos: end i2t text with EOS.
        loss_on_prompt: t2i: also train on the caption tokens (default: the caption is only a condition).
        pad_to_multiple_of: pad ``T`` up to a multiple (fewer shapes on GPUs).
        seed: the base of the per-item draws (direction in mixed mode, prompt dropout).

    Returns (``__call__``): ``input_ids [B, T]`` (right-padded), ``attention_mask [B, T]``, ``labels [B, T]``
    (``-100`` on padding, on conditions and on images that are read), ``image_tokens [sum L, D]`` (packed in
    batch order, one image per example), ``image_lengths [B]``, ``directions`` (list of str), ``num_skipped``
    and ``skipped`` (``{reason: count}``). Items that are not dicts are skipped and counted.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, config: AdaTokVLMConfig, adatok: AdaTokModel | None = None,
                 num_image_tokens: int | str = "auto", fallback_num_image_tokens: int | None = None,
                 direction: str = "t2i", t2i_template: str = DEFAULT_TEMPLATES["t2i"],
                 i2t_template: str = DEFAULT_TEMPLATES["i2t"], prompt_dropout: float = 0.0,
                 max_text_tokens: int = 64, add_bos: bool | None = None, add_eos: bool = True,
                 loss_on_prompt: bool = False, pad_to_multiple_of: int | None = None, seed: int = 0):
        if not isinstance(config, AdaTokVLMConfig) or not config.has_image_tokens:
            raise ValueError("config must be the AdaTokVLMConfig of a model built with from_text_model (it holds the "
                             "[BOI]/[IMG]/[EOI] ids)")
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        if not 0.0 <= prompt_dropout <= 1.0:
            raise ValueError(f"prompt_dropout must be in [0, 1], got {prompt_dropout!r}")
        if adatok is not None and not isinstance(adatok, AdaTokModel):
            raise TypeError(f"adatok must be an AdaTokModel or None, got {type(adatok).__name__}")
        split_template(t2i_template), split_template(i2t_template)  # validate now
        self.tokenizer, self.config, self.adatok = tokenizer, config, adatok
        self.direction, self.templates = direction, {"t2i": t2i_template, "i2t": i2t_template}
        self.prompt_dropout, self.max_text_tokens = float(prompt_dropout), int(max_text_tokens)
        self.add_bos = tokenizer_adds_bos(tokenizer) if add_bos is None else bool(add_bos)
        self.add_eos, self.loss_on_prompt = add_eos, loss_on_prompt
        self.pad_to_multiple_of, self.seed, self.epoch = pad_to_multiple_of, int(seed), 0
        self.num_image_tokens = self._length_rule(num_image_tokens, fallback_num_image_tokens)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_token_id = 0 if pad is None else int(pad)

    def _length_rule(self, rule, fallback):
        m = self.config.max_image_tokens
        if isinstance(rule, str) and rule.strip().isdigit():
            rule = int(rule)
        if rule == "auto":
            if self.adatok is None or self.adatok.has_policy:
                return "auto"
            if fallback is None:
                raise ValueError("num_image_tokens='auto' needs AdaTok's length policy and this AdaTok has none: "
                                 "train one (adatok_vlm.training.train_policy) or set fallback_num_image_tokens")
            rule = fallback
        if isinstance(rule, bool) or not isinstance(rule, int) or not 1 <= rule <= m:
            raise ValueError(f"num_image_tokens must be 'auto' or an int in 1..{m}, got {rule!r}")
        return rule

    def set_epoch(self, epoch: int) -> None:
        """Per-item draws (mixed directions, prompt dropout) depend on the epoch: call it every epoch."""
        self.epoch = int(epoch)

    def _rng(self, index: int) -> random.Random:
        return random.Random((self.seed * 1_000_003 + self.epoch) * 1_000_003 + index)

    # ------------------------------------------------------------------ images
    @torch.no_grad()
    def tokenize_images(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """``[N, 3, S, S]`` -> N tensors ``[L_i, D]`` (CPU, float32) from the frozen AdaTok."""
        if self.adatok is None:
            raise ValueError("items bring pixel_values but the collator has no AdaTok: pass adatok= (e.g. vlm.adatok) "
                             "or use pre-tokenized items (tokens [L, D], e.g. from extract_tokens' cache)")
        dev = self.adatok.device
        enc = self.adatok.encode(pixel_values.to(dev, self.adatok.dtype), num_tokens=self.num_image_tokens)
        tokens, lengths = enc.tokens.float().cpu(), enc.lengths.cpu()
        return [tokens[i, :int(n)] for i, n in enumerate(lengths)]

    def _check_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        d, m = self.config.tokenizer_config.token_dim, self.config.max_image_tokens
        tokens = torch.as_tensor(tokens, dtype=torch.float32)
        if tokens.dim() != 2 or tokens.shape[-1] != d or not 1 <= tokens.shape[0] <= m:
            raise ValueError(f"an item's tokens must be [L, {d}] with 1 <= L <= {m} (this VLM's AdaTok), got "
                             f"{tuple(tokens.shape)}; was the token cache made with another tokenizer?")
        return tokens

    # ------------------------------------------------------------------ one sequence
    def build_sequence(self, caption: str, length: int, direction: str, drop_prompt: bool = False):
        """``(ids, labels)`` lists for one example whose image has ``length`` tokens."""
        c = self.config
        before, after = split_template(self.templates[direction])
        image = [c.boi_token_id] + [c.img_token_id] * length + [c.eoi_token_id]
        cut = self.max_text_tokens
        if direction == "t2i":
            pre = [] if drop_prompt else prompt_ids(self.tokenizer, caption, self.templates["t2i"], self.add_bos)
            pre = pre[:cut]
            post = text_ids(self.tokenizer, after.format(caption=caption))[:cut]
            ids = pre + image + post
            # The caption is the condition and [BOI] is forced in generation: neither is a target (unless
            # loss_on_prompt); the image span is, so its last token's target is [EOI].
            if self.loss_on_prompt:
                return ids, list(pre) + list(image) + list(post)
            return ids, [IGNORE_INDEX] * (len(pre) + 1) + image[1:] + list(post)
        bos = [self.tokenizer.bos_token_id] if self.add_bos and self.tokenizer.bos_token_id is not None else []
        pre = (bos + text_ids(self.tokenizer, before.format(caption=caption)))[:cut]
        post = text_ids(self.tokenizer, after.format(caption=caption))[:cut]
        if self.add_eos and self.tokenizer.eos_token_id is not None:
            post = post + [self.tokenizer.eos_token_id]
        ids = pre + image + post
        return ids, [IGNORE_INDEX] * (len(pre) + len(image)) + list(post)

    # ------------------------------------------------------------------ the batch
    def __call__(self, items: list) -> dict:
        good = [item for item in items if isinstance(item, dict)]
        skipped = Counter(getattr(item, "reason", "unknown") for item in items if not isinstance(item, dict))
        if not good:
            return {"input_ids": torch.empty(0, 0, dtype=torch.long), "num_skipped": sum(skipped.values()),
                    "skipped": dict(skipped)}
        for item in good:
            if "caption" not in item or not (("pixel_values" in item) ^ ("tokens" in item)):
                raise ValueError("each item needs a 'caption' and exactly one of 'pixel_values' / 'tokens', got keys "
                                 f"{sorted(item)}")

        # Image tokens: pre-tokenized items as they are, pixel items through AdaTok in one call.
        tokens: list[torch.Tensor | None] = [item.get("tokens") for item in good]
        pixel_rows = [i for i, item in enumerate(good) if "pixel_values" in item]
        if pixel_rows:
            encoded = self.tokenize_images(torch.stack([torch.as_tensor(good[i]["pixel_values"]) for i in pixel_rows]))
            for i, t in zip(pixel_rows, encoded):
                tokens[i] = t
        tokens = [self._check_tokens(t) for t in tokens]

        ids, labels, directions = [], [], []
        for k, (item, t) in enumerate(zip(good, tokens)):
            rng = self._rng(int(item.get("index", k)))
            direction = item.get("direction") or self.direction
            if direction == "mixed":
                direction = "t2i" if rng.random() < 0.5 else "i2t"
            if direction not in ("t2i", "i2t"):
                raise ValueError(f"an item's direction must be 't2i' or 'i2t', got {direction!r}")
            drop = direction == "t2i" and self.prompt_dropout > 0 and rng.random() < self.prompt_dropout
            seq, lab = self.build_sequence(item["caption"], t.shape[0], direction, drop)
            ids.append(seq)
            labels.append(lab)
            directions.append(direction)

        width = max(len(s) for s in ids)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
        label_ids = torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long)
        for b, (seq, lab) in enumerate(zip(ids, labels)):
            input_ids[b, :len(seq)] = torch.tensor(seq)
            attention_mask[b, :len(seq)] = 1
            label_ids[b, :len(lab)] = torch.tensor(lab)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": label_ids,
            "image_tokens": torch.cat(tokens),                                        # [sum L, D]
            "image_lengths": torch.tensor([t.shape[0] for t in tokens], dtype=torch.long),
            "directions": directions,
            "num_skipped": sum(skipped.values()),
            "skipped": dict(skipped),
        }


__all__ = ["CaptionedImages", "DEFAULT_TEMPLATES", "VLMCollator", "class_captions", "left_pad", "prompt_ids",
           "split_template", "text_ids", "tokenizer_adds_bos"]
