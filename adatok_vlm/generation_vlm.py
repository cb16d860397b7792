"""Image generation for :class:`~adatok_vlm.modeling_vlm.AdaTokVLMForCausalLM`: the loop that halts at ``[EOI]``.

AdaTok images are variable-length (paper Sec. 4): the policy gives each training image its own ``L``,
so an LM trained on ``[BOI] z_1 .. z_L [EOI]`` learns *when to stop*, and generation costs ``L`` steps
instead of ``m`` (paper, Limitations a). This module holds everything that writes images:

* logits processors (usable with plain ``generate`` too): the ``min``/``max``/exact image-length bounds and
  the image vocabulary (``[IMG]`` or the FSQ codes, plus ``[EOI]``);
* :class:`AdaTokVLMGenerationMixin`, mixed into the model: :meth:`~AdaTokVLMGenerationMixin.generate_images`
  (continuous tokens through the flow head with a KV cache, or discrete codes through ``generate``) and its
  helpers. With ``synced_gpus=True`` (ZeRO-3, several processes) a rank whose images are all closed keeps
  taking dummy steps until every rank is done, so the ranks' collective weight gathers stay in step.

The model file (:mod:`adatok_vlm.modeling_vlm`) re-exports the public names.
"""

from __future__ import annotations

import inspect
import math
import numbers

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import GenerationMixin, LogitsProcessor, LogitsProcessorList

from .tokenizer import AdaTokEncoding, token_mask


# ============================================================================================
# helpers
# ============================================================================================
def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.LongTensor:
    """Positions that skip (left) padding: ``cumsum(mask) - 1``, 0 at padded slots (as ``generate`` does)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def image_span_state(input_ids: torch.LongTensor, boi_token_id: int, eoi_token_id: int):
    """Where each row stands w.r.t. its last image.

    Returns ``inside [B]`` (the last ``[BOI]`` is not yet closed by an ``[EOI]``) and ``count [B]`` (tokens
    after that ``[BOI]``: the image tokens generated so far; meaningful where ``inside``).
    """
    t = input_ids.shape[1]
    pos = torch.arange(t, device=input_ids.device).expand_as(input_ids)
    last_boi = torch.where(input_ids == boi_token_id, pos, -1).amax(-1)
    last_eoi = torch.where(input_ids == eoi_token_id, pos, -1).amax(-1)
    inside = (last_boi >= 0) & (last_boi > last_eoi)
    return inside, t - 1 - last_boi


def _as_row_values(value, batch_size: int, device, name: str) -> torch.Tensor | None:
    """An int or a LongTensor ``[B]`` -> LongTensor ``[B]`` (None stays None)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a LongTensor [B], got bool {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
        return torch.full((batch_size,), value, dtype=torch.long, device=device)
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
        if value.dim() == 0:
            return _as_row_values(int(value), batch_size, device, name)
        if value.shape != (batch_size,):
            raise ValueError(f"{name} must have shape [{batch_size}] (one per prompt), got {tuple(value.shape)}")
        if value.numel() and int(value.min()) < 1:
            raise ValueError(f"{name} must be >= 1, got a minimum of {int(value.min())}")
        return value.to(device=device, dtype=torch.long)
    raise TypeError(f"{name} must be an int or a LongTensor [B], got {type(value).__name__}")


# ============================================================================================
# logits processors: image lengths and image vocabularies, usable with plain `generate`
# ============================================================================================
class ImageLengthLogitsProcessor(LogitsProcessor):
    """Bounds the number of tokens of the image being generated (the span after the last ``[BOI]``).

    While a row is inside an image with ``n`` tokens so far: ``[EOI]`` is forbidden when ``n < min_tokens``
    and forced (every other logit ``-inf``) when ``n >= max_tokens``. ``exact_tokens`` sets both. Each bound
    is an int or a LongTensor ``[B]`` (one per row). Rows outside an image are left untouched, so the
    processor can ride along with ordinary text generation.
    """

    def __init__(self, boi_token_id: int, eoi_token_id: int, min_tokens=1, max_tokens=None, exact_tokens=None):
        default_min = min_tokens is None or (isinstance(min_tokens, int) and min_tokens == 1)
        if exact_tokens is not None and (max_tokens is not None or not default_min):
            raise ValueError("pass exact_tokens alone, or min_tokens/max_tokens, not both")
        self.boi_token_id = int(boi_token_id)
        self.eoi_token_id = int(eoi_token_id)
        self.min_tokens = exact_tokens if exact_tokens is not None else min_tokens
        self.max_tokens = exact_tokens if exact_tokens is not None else max_tokens

    @staticmethod
    def _bound(value, batch: int, device) -> torch.Tensor | None:
        if value is None:
            return None
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            if value.shape[0] != batch:
                raise ValueError(f"per-row image lengths have {value.shape[0]} entries for a batch of {batch}")
            return value.to(device)
        return torch.full((batch,), int(value), device=device)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        batch = input_ids.shape[0]
        inside, count = image_span_state(input_ids, self.boi_token_id, self.eoi_token_id)
        scores = scores.clone()
        low = self._bound(self.min_tokens, batch, scores.device)
        if low is not None:
            scores[inside & (count < low), self.eoi_token_id] = -float("inf")
        high = self._bound(self.max_tokens, batch, scores.device)
        if high is not None:
            force = inside & (count >= high)
            eoi = scores[force, self.eoi_token_id]
            scores[force] = -float("inf")
            scores[force, self.eoi_token_id] = torch.where(torch.isfinite(eoi), eoi, torch.zeros_like(eoi))
        return scores


class MinImageTokensLogitsProcessor(ImageLengthLogitsProcessor):
    """Forbids ``[EOI]`` before an image has ``min_tokens`` tokens (int or LongTensor ``[B]``)."""

    def __init__(self, boi_token_id: int, eoi_token_id: int, min_tokens):
        super().__init__(boi_token_id, eoi_token_id, min_tokens=min_tokens)


class MaxImageTokensLogitsProcessor(ImageLengthLogitsProcessor):
    """Forces ``[EOI]`` once an image has ``max_tokens`` tokens (int or LongTensor ``[B]``)."""

    def __init__(self, boi_token_id: int, eoi_token_id: int, max_tokens):
        super().__init__(boi_token_id, eoi_token_id, min_tokens=None, max_tokens=max_tokens)


class ExactImageTokensLogitsProcessor(ImageLengthLogitsProcessor):
    """Makes every image exactly ``num_tokens`` long (int or LongTensor ``[B]``)."""

    def __init__(self, boi_token_id: int, eoi_token_id: int, num_tokens):
        super().__init__(boi_token_id, eoi_token_id, min_tokens=None, exact_tokens=num_tokens)


class ImageVocabularyLogitsProcessor(LogitsProcessor):
    """Inside an image, only image ids and ``[EOI]`` may be generated.

    ``image_token_ids`` is a ``range`` (discrete mode: ``range(offset, offset + codebook_size)``) or a list
    of ids (continuous mode: ``[[IMG]]``).
    """

    def __init__(self, boi_token_id: int, eoi_token_id: int, image_token_ids):
        self.boi_token_id = int(boi_token_id)
        self.eoi_token_id = int(eoi_token_id)
        self.image_token_ids = image_token_ids

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        inside, _ = image_span_state(input_ids, self.boi_token_id, self.eoi_token_id)
        if not inside.any():
            return scores
        allowed = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
        if isinstance(self.image_token_ids, range):
            allowed[self.image_token_ids.start:self.image_token_ids.stop] = True
        else:
            allowed[torch.as_tensor(list(self.image_token_ids), device=scores.device)] = True
        allowed[self.eoi_token_id] = True
        return scores.masked_fill(inside[:, None] & ~allowed[None, :], -float("inf"))


class SuppressImageTokensLogitsProcessor(LogitsProcessor):
    """Forbids ``token_ids`` everywhere (text generation of a continuous-token VLM: an image's tokens are
    vectors the flow head writes, never ids ``generate`` can emit; use ``generate_images`` to write one)."""

    def __init__(self, token_ids):
        self.token_ids = [int(t) for t in token_ids]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        scores[:, self.token_ids] = -float("inf")
        return scores


def _check_sampling_args(seed, cfg_scale, num_flow_steps, temperature) -> None:
    """Refuse sampling arguments that would fail deep in a layer or silently become NaN or a default."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise TypeError(f"seed must be an int or None, got {seed!r}")
    if num_flow_steps is not None and (isinstance(num_flow_steps, bool) or not isinstance(num_flow_steps, numbers.Integral)
                                       or num_flow_steps < 1):
        raise ValueError(f"num_flow_steps must be an int >= 1 or None (the config's default), got {num_flow_steps!r}")
    for name, value in (("cfg_scale", cfg_scale), ("temperature", temperature)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0 or None, got {value!r}")


def _left_pad_cat(pairs):
    """Stack (ids, mask) pairs of different lengths along the batch, left-padding to the longest."""
    width = max(ids.shape[1] for ids, _ in pairs)
    out_ids, out_mask = [], []
    for ids, mask in pairs:
        pad = width - ids.shape[1]
        out_ids.append(F.pad(ids, (pad, 0), value=0))
        out_mask.append(F.pad(mask, (pad, 0), value=0))
    return torch.cat(out_ids), torch.cat(out_mask)


def all_ranks_done(this_rank_done: bool, synced_gpus: bool, device) -> bool:
    """Whether generation may stop: this rank's answer alone, or, with ``synced_gpus``, every rank's.

    Under ZeRO-3 each forward gathers weight shards from every rank, so a rank that left the loop early
    would leave the others waiting in a collective forever; the ranks agree with one ``all_reduce`` of a
    "still running" flag per step (as ``transformers``' ``generate(synced_gpus=True)`` does). Without an
    initialised process group (a single process) this is ``this_rank_done``.
    """
    if not synced_gpus or not (dist.is_available() and dist.is_initialized()):
        return this_rank_done
    running = torch.tensor(0.0 if this_rank_done else 1.0, device=device)
    dist.all_reduce(running, op=dist.ReduceOp.SUM)
    return float(running) == 0.0


def _global_max(value: int, synced_gpus: bool, device) -> int:
    """``max(value)`` over the ranks (with ``synced_gpus`` and a process group), else ``value``."""
    if not synced_gpus or not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor(value, dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


# ============================================================================================
# the generation mixin
# ============================================================================================
class AdaTokVLMGenerationMixin(GenerationMixin):
    """``generate_images`` and the pieces that make plain ``generate`` write images.

    Mixed into :class:`~adatok_vlm.modeling_vlm.AdaTokVLMForCausalLM`; relies on its ``config``,
    ``language_model``, ``adatok``, ``projector``, ``image_head``, ``is_discrete``, ``image_code_ids``,
    ``get_input_embeddings`` and ``_check_image_vocab``.
    """

    # ------------------------------------------------------------------ text generation
    def generate(self, *args, logits_processor: LogitsProcessorList | None = None, **kwargs):
        """``transformers``' ``generate``, reading the prompt's images (``image_tokens``/``image_lengths`` from
        :class:`~adatok_vlm.processing_vlm.AdaTokVLMProcessor`, or ``pixel_values``) once in the prefill.

        In continuous mode it writes text only: ``[BOI]``, ``[IMG]`` and ``[EOI]`` are suppressed (an image's
        tokens are vectors from the flow head; :meth:`generate_images` writes images). In discrete mode
        ``[IMG]`` is suppressed (images are written as FSQ codes, see :meth:`image_logits_processors`).
        Batches are left-padded; ``use_cache`` and ``synced_gpus`` work as in ``transformers``.
        """
        processors = LogitsProcessorList(logits_processor or [])
        c = self.config
        if c.has_image_tokens:
            banned = [c.img_token_id] if self.is_discrete else [c.boi_token_id, c.img_token_id, c.eoi_token_id]
            processors.append(SuppressImageTokensLogitsProcessor(banned))
        return super().generate(*args, logits_processor=processors, **kwargs)

    @torch.no_grad()
    def answer(self, processor, images, question: str = "", num_image_tokens=None, max_new_tokens: int = 32,
               prompt_template: str | None = None, chat: bool | None = None, **generate_kwargs) -> list[str]:
        """Answer ``question`` about each image (greedy by default): one string per image.

        Args:
            processor: the model's :class:`~adatok_vlm.processing_vlm.AdaTokVLMProcessor`.
            images: one image or a list/batch (anything the image processor reads).
            question: the text after the image (``""``: a caption, see :meth:`caption`).
            num_image_tokens: ``"auto"`` (the policy), an int, ``{"max_mse": x}`` or ``{"mean_budget": n}``;
                default: the processor's.
            prompt_template: the prompt with ``{image}`` and ``{question}``, e.g. ``"{image}{question}"`` (the
                layout ``train_vlm``'s i2t default trains). Default: the LM's chat template when its tokenizer
                has one (``chat``), else ``"{image}{question}"``.
            chat: use the tokenizer's chat template (default: when it has one and no template is given).
            generate_kwargs: passed to :meth:`generate` (``do_sample``, ``num_beams``...).
        """
        tok = processor.tokenizer
        if isinstance(images, (list, tuple)):
            count = len(images)
        elif isinstance(images, torch.Tensor) and images.dim() == 4:
            count = images.shape[0]
        else:
            images, count = [images], 1
        text, text_kwargs = self.answer_prompt(processor, question, prompt_template, chat)
        inputs = processor(text=[text] * count, images=images, num_image_tokens=num_image_tokens,
                           padding_side="left", **text_kwargs)
        device = self.language_model.device
        inputs = {k: v.to(device) for k, v in inputs.items()}
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        generate_kwargs = {"do_sample": False, "pad_token_id": pad, "eos_token_id": tok.eos_token_id,
                           **generate_kwargs}
        out = self.generate(**inputs, max_new_tokens=max_new_tokens, **generate_kwargs)
        return [t.strip() for t in tok.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)]

    @staticmethod
    def answer_prompt(processor, question: str = "", prompt_template: str | None = None,
                      chat: bool | None = None) -> tuple[str, dict]:
        """``(text, tokenizer kwargs)``: the prompt :meth:`answer` gives the processor for one image."""
        tok = processor.tokenizer
        if not isinstance(question, str):
            raise TypeError(f"question must be a string, got {type(question).__name__}")
        if chat is None:
            chat = prompt_template is None and getattr(tok, "chat_template", None) is not None
        if chat:
            if getattr(tok, "chat_template", None) is None:
                raise ValueError("chat=True needs a text tokenizer with a chat_template")
            content = processor.image_token + ("\n" + question if question else "")
            text = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                           add_generation_prompt=True)
            return text, {"add_special_tokens": False}   # the template wrote BOS and the like itself
        template = "{image}{question}" if prompt_template is None else prompt_template
        if not isinstance(template, str) or template.count("{image}") != 1:
            raise ValueError(f"prompt_template must hold '{{image}}' once, got {prompt_template!r}")
        return template.format(image=processor.image_token, question=question), {}

    def caption(self, processor, images, num_image_tokens=None, max_new_tokens: int = 32, **kwargs) -> list[str]:
        """A caption per image: :meth:`answer` with no question."""
        return self.answer(processor, images, "", num_image_tokens=num_image_tokens, max_new_tokens=max_new_tokens,
                           **kwargs)

    # ------------------------------------------------------------------ generation helpers
    def prepare_inputs_for_generation(self, input_ids, *args, image_tokens=None, image_lengths=None,
                                      pixel_values=None, is_first_iteration=False, **kwargs):
        """Images in the prompt are read once, in the prefill; later steps only see new text."""
        inputs = super().prepare_inputs_for_generation(input_ids, *args, is_first_iteration=is_first_iteration,
                                                       **kwargs)
        if is_first_iteration or not kwargs.get("use_cache", True):
            inputs.update(image_tokens=image_tokens, image_lengths=image_lengths, pixel_values=pixel_values)
        return inputs

    def image_logits_processors(self, min_image_tokens=None, max_image_tokens=None,
                                num_image_tokens=None) -> LogitsProcessorList:
        """The processors that make plain ``generate`` write images: confined to the image vocabulary
        (codes in discrete mode, ``[IMG]`` in continuous mode) plus ``[EOI]``, with the given length bounds
        (defaults: at least 1 token, at most ``m``)."""
        self._check_image_vocab()
        c = self.config
        vocab = self.image_code_ids if self.is_discrete else [c.img_token_id]
        processors = LogitsProcessorList([ImageVocabularyLogitsProcessor(c.boi_token_id, c.eoi_token_id, vocab)])
        if num_image_tokens is not None:
            if min_image_tokens is not None or max_image_tokens is not None:
                raise ValueError("pass num_image_tokens alone, or min_image_tokens/max_image_tokens, not both")
            processors.append(ExactImageTokensLogitsProcessor(c.boi_token_id, c.eoi_token_id, num_image_tokens))
        else:
            processors.append(ImageLengthLogitsProcessor(
                c.boi_token_id, c.eoi_token_id, min_tokens=1 if min_image_tokens is None else min_image_tokens,
                max_tokens=c.max_image_tokens if max_image_tokens is None else max_image_tokens))
        return processors

    def image_ids_to_encoding(self, image_ids: torch.LongTensor) -> AdaTokEncoding:
        """Discrete mode: generated ids after ``[BOI]`` (``[B, T]``, codes then ``[EOI]``/padding) -> tokens.

        Each row's image is its leading run of code ids; FSQ turns the codes back into AdaTok tokens.
        """
        codes = image_ids - self.config.image_code_offset
        is_code = (codes >= 0) & (codes < self.config.codebook_size)
        lengths = is_code.long().cumprod(dim=1).sum(dim=1)                               # leading run
        if int(lengths.min()) < 1:
            raise ValueError("a generated row has no image code right after [BOI]")
        longest = int(lengths.max())
        valid = token_mask(lengths, longest)
        codes = codes[:, :longest].masked_fill(~valid, 0)
        tokens = self.adatok.bottleneck.codes_to_tokens(codes).masked_fill(~valid[..., None], 0.0)
        return AdaTokEncoding(tokens=tokens.to(self.adatok.dtype), lengths=lengths,
                              codes=codes.masked_fill(~valid, -1))

    def _resolve_length_bounds(self, batch: int, device, min_image_tokens, max_image_tokens, num_image_tokens):
        m = self.config.max_image_tokens
        exact = _as_row_values(num_image_tokens, batch, device, "num_image_tokens")
        low = _as_row_values(min_image_tokens, batch, device, "min_image_tokens")
        high = _as_row_values(max_image_tokens, batch, device, "max_image_tokens")
        if exact is not None and (low is not None or high is not None):
            raise ValueError("pass num_image_tokens alone, or min_image_tokens/max_image_tokens, not both")
        for name, value in (("num_image_tokens", exact), ("min_image_tokens", low), ("max_image_tokens", high)):
            if value is not None and int(value.max()) > m:
                raise ValueError(f"{name} must be <= {m} (the AdaTok's num_latent_tokens), got {int(value.max())}")
        if low is not None and high is not None and bool((low > high).any()):
            raise ValueError("min_image_tokens must be <= max_image_tokens")
        limit = int(exact.max()) if exact is not None else (int(high.max()) if high is not None else m)
        return exact, low, high, limit

    @staticmethod
    def _check_prompts(input_ids, attention_mask):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            raise TypeError(f"input_ids must be a LongTensor [B, T], got "
                            f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
        if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must hold at least one prompt of at least one token, got shape "
                             f"{tuple(input_ids.shape)} (for an unconditional image, prompt with the BOS token alone)")
        if attention_mask is None:
            return torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        if not bool(attention_mask[:, -1].bool().all()):
            raise ValueError("prompts must be left-padded for generation (tokenizer.padding_side = 'left'): "
                             "attention_mask is 0 at the last position of some row")
        return attention_mask

    def _check_prompt_vocab(self, input_ids: torch.Tensor) -> None:
        vocab = self.vocab_size
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= vocab:
            raise ValueError(f"input_ids must be token ids in [0, {vocab}) (the LM's vocabulary with the image "
                             f"tokens), got values in [{low}, {high}]: was the prompt encoded by another tokenizer?")

    def _lm_step(self, inputs_embeds, attention_mask, position_ids, cache, use_cache):
        """One LM call; returns the last position's hidden state ``[B, H]``, logits ``[B, V]`` and the cache."""
        extra = {"logits_to_keep": 1} if self._lm_accepts_logits_to_keep() else {}
        out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  position_ids=position_ids, cache=cache, use_cache=use_cache,
                                  output_hidden_states=True, **extra)
        return out.hidden_states[-1][:, -1], out.logits[:, -1].float(), getattr(out, "cache", None)

    def _lm_accepts_logits_to_keep(self) -> bool:
        if not hasattr(self, "_accepts_logits_to_keep"):
            params = inspect.signature(self.language_model.forward).parameters
            self._accepts_logits_to_keep = "logits_to_keep" in params
        return self._accepts_logits_to_keep

    # ------------------------------------------------------------------ image generation
    @torch.no_grad()
    def generate_images(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        min_image_tokens=None,
        max_image_tokens=None,
        num_image_tokens=None,
        *,
        num_flow_steps: int | None = None,
        temperature: float | None = None,
        cfg_scale: float | None = None,
        negative_input_ids: torch.LongTensor | None = None,
        negative_attention_mask: torch.Tensor | None = None,
        do_sample: bool = False,
        stop_temperature: float = 1.0,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        logits_processor: LogitsProcessorList | None = None,
        synced_gpus: bool = False,
        **generate_kwargs,
    ) -> AdaTokEncoding:
        """Continue each prompt with ``[BOI]`` and write one image, until the LM emits ``[EOI]``.

        Args:
            input_ids / attention_mask: ``[B, T]`` prompts, left-padded.
            min_image_tokens / max_image_tokens: ``[EOI]`` is forbidden before ``min`` tokens (default 1)
                and forced at ``max`` (default ``m``); an int or a LongTensor ``[B]``.
            num_image_tokens: an exact length per image (int or LongTensor ``[B]``) instead of the LM's choice.
            num_flow_steps / temperature / cfg_scale: flow-head sampling (defaults from the config); in
                discrete mode ``temperature`` is the code-sampling temperature of ``generate``.
            negative_input_ids / negative_attention_mask: the unconditional prompts for guidance
                (``cfg_scale != 1``); by default an empty prompt (``[BOI]`` alone). Guidance needs a model
                trained with dropped prompts.
            do_sample / stop_temperature: sample the stop decision from ``softmax([IMG], [EOI])`` instead of
                taking the likelier one.
            use_cache: KV cache on (default) or a full recompute at every step.
            generator / seed: randomness of the flow head (and of sampled stop decisions).
            logits_processor: extra processors applied to the LM's logits before the stop decision.
            synced_gpus: several processes generate together under ZeRO-3 (each forward gathers weights from
                every rank): a rank whose images have all emitted ``[EOI]`` keeps running dummy steps (results
                discarded) until every rank is done, so no rank waits in a collective forever. The step
                budget is the longest over the ranks. In one process it changes nothing.
            generate_kwargs: discrete mode only: passed to ``generate`` (``top_k``, ``temperature``...).
        Returns:
            :class:`AdaTokEncoding`: ``tokens [B, max L, D]`` (zeros past each length), ``lengths [B]`` and,
            in discrete mode, ``codes``. Samples that stopped keep their lengths while others continue.
        """
        self._check_image_vocab()
        attention_mask = self._check_prompts(input_ids, attention_mask)
        self._check_prompt_vocab(input_ids)
        _check_sampling_args(seed, cfg_scale, num_flow_steps, temperature)
        if not isinstance(do_sample, bool):
            raise TypeError(f"do_sample must be a bool, got {do_sample!r}")
        if do_sample and (isinstance(stop_temperature, bool) or not isinstance(stop_temperature, numbers.Real)
                          or not math.isfinite(stop_temperature) or stop_temperature <= 0):
            raise ValueError(f"stop_temperature must be a finite number > 0 with do_sample=True (it divides the "
                             f"[IMG]/[EOI] logits; 0 or NaN would never stop), got {stop_temperature!r}")
        device = self.language_model.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        batch = input_ids.shape[0]
        exact, low, high, limit = self._resolve_length_bounds(batch, device, min_image_tokens, max_image_tokens,
                                                              num_image_tokens)
        processors = LogitsProcessorList(logits_processor or [])
        processors.extend(self.image_logits_processors(
            min_image_tokens=None if exact is not None else (low if low is not None else 1),
            max_image_tokens=None if exact is not None else (high if high is not None else limit),
            num_image_tokens=exact))
        boi = torch.full((batch, 1), self.config.boi_token_id, dtype=input_ids.dtype, device=device)
        ids = torch.cat([input_ids, boi], dim=1)
        mask = torch.cat([attention_mask, torch.ones_like(boi)], dim=1)
        if self.is_discrete:
            continuous_only = {"num_flow_steps": num_flow_steps, "cfg_scale": cfg_scale, "generator": generator,
                               "negative_input_ids": negative_input_ids}
            given = sorted(name for name, value in continuous_only.items() if value is not None)
            if given:
                raise TypeError(f"generate_images: {given} apply to continuous image tokens; discrete mode samples "
                                "codes with generate() (pass seed, do_sample, temperature, top_k...)")
            if temperature is not None:
                generate_kwargs.setdefault("temperature", temperature)
            if seed is not None:
                torch.manual_seed(seed)  # generate() draws from the global generator
            generate_kwargs.setdefault("pad_token_id", self.config.eoi_token_id)
            out = self.generate(input_ids=ids, attention_mask=mask, logits_processor=processors,
                                eos_token_id=self.config.eoi_token_id, max_new_tokens=limit + 1,
                                do_sample=do_sample, use_cache=use_cache, synced_gpus=synced_gpus,
                                **generate_kwargs)
            return self.image_ids_to_encoding(out[:, ids.shape[1]:])
        if generate_kwargs:
            raise TypeError(f"generate_images got unexpected arguments {sorted(generate_kwargs)}")
        return self._generate_continuous(ids, mask, processors, limit, num_flow_steps, temperature, cfg_scale,
                                         negative_input_ids, negative_attention_mask, do_sample, stop_temperature,
                                         use_cache, generator, seed, synced_gpus)

    def _generate_continuous(self, ids, mask, processors, limit, num_flow_steps, temperature, cfg_scale,
                             negative_input_ids, negative_attention_mask, do_sample, stop_temperature, use_cache,
                             generator, seed, synced_gpus=False) -> AdaTokEncoding:
        """The continuous-token loop. Each step: (1) the stop decision from the LM's logits restricted to
        ``{[IMG], [EOI]}``; (2) the next token from the flow head; (3) that token, projected, as the next input.
        Rows that stopped keep riding along (their outputs masked) until every row, and with ``synced_gpus``
        every rank, is done."""
        c = self.config
        device = ids.device
        batch = ids.shape[0]
        num_flow_steps = num_flow_steps or c.num_flow_steps
        temperature = c.flow_temperature if temperature is None else temperature
        cfg_scale = c.flow_cfg_scale if cfg_scale is None else cfg_scale
        if generator is None and seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)
        guided = cfg_scale != 1.0

        # Guidance runs a second, unconditional stream in the same batch: rows [B:] see the negative prompt.
        stream_ids, stream_mask = ids, mask
        if guided:
            neg_ids, neg_mask = self._negative_prompts(batch, negative_input_ids, negative_attention_mask, device)
            stream_ids, stream_mask = _left_pad_cat([(ids, mask), (neg_ids, neg_mask)])
        embeds = self.get_input_embeddings()(stream_ids)                                  # [B', T, H]
        positions = position_ids_from_mask(stream_mask)
        hidden, logits, cache = self._lm_step(embeds, stream_mask, positions, None, use_cache)

        # Ranks may hold different bounds: all run the longest budget (rows past their own bound are forced
        # to [EOI] by the processors), so every rank takes the same number of steps when nobody stops early.
        limit = _global_max(limit, synced_gpus, device)
        tokens = torch.zeros(batch, limit, c.tokenizer_config.token_dim, device=device)
        lengths = torch.zeros(batch, dtype=torch.long, device=device)
        active = torch.ones(batch, dtype=torch.bool, device=device)
        seq = ids                                                                         # for the processors
        img_id = torch.tensor(c.img_token_id, device=device)
        eoi_id = torch.tensor(c.eoi_token_id, device=device)
        for step in range(limit):
            # 1. The stop decision, from the LM's logits at the last position (never before the 1st token).
            if step > 0:
                scores = processors(seq, logits[:batch])[:, [c.img_token_id, c.eoi_token_id]]
                if do_sample:
                    p_stop = torch.softmax(scores / stop_temperature, dim=-1)[:, 1]
                    stop = torch.rand(batch, device=device, generator=generator) < p_stop
                else:
                    stop = scores[:, 1] > scores[:, 0]
                active = active & ~stop
                seq = torch.cat([seq, torch.where(active, img_id, eoi_id)[:, None]], dim=1)
                # Done here (and everywhere, under synced_gpus): stop. Otherwise a finished rank takes this
                # step as a dummy: every row is inactive, so its token is zeroed and no length grows.
                if all_ranks_done(not bool(active.any()), synced_gpus, device):
                    break
            else:
                seq = torch.cat([seq, img_id.expand(batch, 1)], dim=1)
            # 2. The next image token from the flow head, conditioned on the hidden state.
            x = self.image_head.sample(hidden[:batch], num_flow_steps, temperature, cfg_scale,
                                       uncond=hidden[batch:] if guided else None, generator=generator)
            tokens[:, step] = torch.where(active[:, None], x, torch.zeros_like(x))
            lengths += active.long()
            if step == limit - 1:
                break
            # 3. Feed it back in as the next input embedding.
            step_embeds = self.projector(x.to(embeds.dtype))[:, None]                       # [B, 1, H]
            if guided:
                step_embeds = torch.cat([step_embeds, step_embeds], dim=0)
            stream_mask = torch.cat([stream_mask, torch.ones_like(stream_mask[:, :1])], dim=1)
            positions = position_ids_from_mask(stream_mask)
            if use_cache:
                hidden, logits, cache = self._lm_step(step_embeds, stream_mask, positions[:, -1:], cache, True)
            else:
                embeds = torch.cat([embeds, step_embeds], dim=1)
                hidden, logits, _ = self._lm_step(embeds, stream_mask, positions, None, False)
        longest = int(lengths.max())
        tokens = tokens[:, :longest].masked_fill(~token_mask(lengths, longest)[..., None], 0.0)
        return AdaTokEncoding(tokens=tokens.to(self.adatok.dtype), lengths=lengths, codes=None)

    def _negative_prompts(self, batch, negative_input_ids, negative_attention_mask, device):
        boi = torch.full((batch, 1), self.config.boi_token_id, dtype=torch.long, device=device)
        if negative_input_ids is None:
            return boi, torch.ones_like(boi)
        negative_attention_mask = self._check_prompts(negative_input_ids, negative_attention_mask)
        if negative_input_ids.shape[0] != batch:
            raise ValueError(f"negative_input_ids must have {batch} rows (one per prompt), "
                             f"got {negative_input_ids.shape[0]}")
        ids = torch.cat([negative_input_ids.to(device), boi], dim=1)
        return ids, torch.cat([negative_attention_mask.to(device), torch.ones_like(boi)], dim=1)


__all__ = [
    "AdaTokVLMGenerationMixin",
    "ExactImageTokensLogitsProcessor",
    "ImageLengthLogitsProcessor",
    "ImageVocabularyLogitsProcessor",
    "MaxImageTokensLogitsProcessor",
    "MinImageTokensLogitsProcessor",
    "SuppressImageTokensLogitsProcessor",
    "all_ranks_done",
    "image_span_state",
    "position_ids_from_mask",
]
