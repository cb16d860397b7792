"""A class-conditional DiT over variable-length AdaTok token sequences.

The generator of AdaTok (paper Sec. 5 and Appendix B, "we selected the classic DiT as the
generator"): DiT (Peebles & Xie, 2023) with adaLN-Zero blocks, adapted from 2D latent patches to a
1D sequence of ``L <= m`` continuous tokens and trained with flow matching (``flow_matching.py``).

* Conditioning ``c = emb(t) + emb(class) + emb(L)``: besides the timestep and the class, the block
  modulations see the token count ``L`` (a length embedding), because a sequence of 32 tokens and
  one of 256 describe the same image at very different granularity (tokens are a coarse-to-fine
  prefix code, paper Sec. 4.1).
* A 1D position embedding over token index (learned, initialised with sin-cos, or fixed sin-cos).
* Self-attention runs through ``F.scaled_dot_product_attention`` with a boolean key-padding mask built
  from ``lengths`` (True = attend): padded tokens are never keys, their inputs are zeroed first and
  their outputs are zero, so values stored there have no effect at all.
* The work follows the real lengths: the sequence is cut at ``lengths.max()`` before the blocks.
* Class id ``num_classes`` is the null class of classifier-free guidance.

The file reads bottom-up: helpers, embedders, block, final layer, model.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init

from ..tokenizer import AdaTokEncoding, token_mask
from ..tokenizer.loading import load_checked
from ..tokenizer.validation import _describe, resolve_num_tokens
from .configuration_dit import AdaTokDiTConfig
from .flow_matching import SAMPLERS, check_guidance, sample_flow
from .length_sampler import LengthSampler, check_class_labels


# ============================================================================================
# helpers
# ============================================================================================
def sinusoidal_embedding(values: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """``values [N]`` (any real numbers) -> ``[N, dim]`` float32 ``[cos(v * f_k), sin(v * f_k)]``,
    frequencies ``f_k = max_period^(-k / (dim/2))`` (the DiT / transformer table)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=values.device) / half)
    args = values.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: ``x [B, ..., H] * (1 + scale [B, H]) + shift [B, H]``, broadcast over the middle axes (the
    DiT's ``[B, L, H]`` sequences, the VLM flow head's ``[N, H]`` single tokens)."""
    view = (shift.shape[0],) + (1,) * (x.dim() - 2) + (shift.shape[-1],)
    return x * (1 + scale.view(view)) + shift.view(view)


def _tag(linear: nn.Linear, how: str) -> nn.Linear:
    """Mark a Linear for ``_init_weights``: ``"zeros"`` (adaLN-Zero) or ``"normal"`` (std 0.02)."""
    linear._dit_init = how
    return linear


class RunningTokenStats:
    """Per-channel mean and std of the VALID tokens, accumulated over padded batches.

    Example (token extraction)::

        stats = RunningTokenStats(token_dim)
        for batch in loader:
            stats.update(batch["tokens"], batch["lengths"])
        model.set_token_statistics(stats.mean, stats.std)
    """

    def __init__(self, token_dim: int):
        self.count = 0
        self.sum = torch.zeros(token_dim, dtype=torch.float64)
        self.sum_sq = torch.zeros(token_dim, dtype=torch.float64)

    def update(self, tokens: torch.Tensor, lengths: torch.Tensor) -> None:
        valid = token_mask(lengths.to(tokens.device), tokens.shape[1])
        x = tokens[valid].double().cpu()                                  # [N_valid, D]
        self.count += x.shape[0]
        self.sum += x.sum(0)
        self.sum_sq += x.pow(2).sum(0)

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)

    @property
    def std(self) -> torch.Tensor:
        var = self.sum_sq / max(self.count, 1) - self.mean.pow(2)
        return var.clamp_min(0).sqrt().clamp_min(1e-6)


# ============================================================================================
# embedders
# ============================================================================================
class ScalarEmbedder(nn.Module):
    """A scalar per sample (timestep, token count) -> ``[B, hidden]``: sin-cos features, then an MLP.

    ``scale`` maps the value onto the table's useful range: flow time ``t in [0, 1]`` is scaled by
    1000 (DiT's timestep range), a token count ``L in 1..m`` is used as is.
    """

    def __init__(self, hidden_size: int, frequency_size: int = 256, scale: float = 1.0):
        super().__init__()
        self.frequency_size, self.scale = frequency_size, scale
        self.mlp = nn.Sequential(_tag(nn.Linear(frequency_size, hidden_size), "normal"), nn.SiLU(),
                                 _tag(nn.Linear(hidden_size, hidden_size), "normal"))

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        freq = sinusoidal_embedding(values.float() * self.scale, self.frequency_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


# ============================================================================================
# block
# ============================================================================================
class Attention(nn.Module):
    """Multi-head self-attention through SDPA with an optional boolean key mask ``[B, L]`` (True = attend)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor | None = None) -> torch.Tensor:
        b, n, dim = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                           # [B, heads, L, head_dim]
        mask = None if key_valid is None else key_valid[:, None, None, :]  # [B, 1, 1, L]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """DiT block with adaLN-Zero: the conditioning regresses shift/scale/gate of both sub-layers;
    the regression is zero-initialised, so every block starts as the identity."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), _tag(nn.Linear(dim, 6 * dim), "zeros"))

    def forward(self, x: torch.Tensor, c: torch.Tensor, key_valid: torch.Tensor | None = None) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_a[:, None] * self.attn(modulate(self.norm1(x), shift_a, scale_a), key_valid)
        x = x + gate_m[:, None] * self.mlp(modulate(self.norm2(x), shift_m, scale_m))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a zero-initialised projection to ``token_dim`` channels."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = _tag(nn.Linear(dim, out_dim), "zeros")
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), _tag(nn.Linear(dim, 2 * dim), "zeros"))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


# ============================================================================================
# model
# ============================================================================================
class AdaTokDiTPreTrainedModel(PreTrainedModel):
    config_class = AdaTokDiTConfig
    base_model_prefix = "dit"
    main_input_name = "tokens"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["DiTBlock"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, strict: bool = True, **kwargs):
        """``PreTrainedModel.from_pretrained``, strict: weights from safetensors only, and any missing,
        unexpected or shape-mismatched weight (or a ``config.json`` of another ``model_type``) raises a
        ``ValueError`` naming it. ``strict=False`` restores transformers' warn-and-reinitialise. The
        folder is checked before anything is built, offline (``loading.load_checked``)."""
        return load_checked(super().from_pretrained, cls, pretrained_model_name_or_path, model_args, kwargs, strict)

    # ------------------------------------------------------------------ saving
    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModel"):
        """No-op. transformers calls it after a ``trust_remote_code`` load so that saving copies the class's
        source file; ours lives in the installed package and :meth:`save_pretrained` writes the ``auto_map``."""

    def save_pretrained(self, save_directory, *args, model_card: dict | None = None, **kwargs):
        """``PreTrainedModel.save_pretrained`` (safetensors), plus a ``README.md`` model card (config summary,
        preset, the token cache it was trained on from a ``token_cache.json`` in the folder, training
        steps/metrics from ``model_card={"training": {...}, "metrics": {...}}`` or a ``training_info.json``) and
        the ``auto_map`` that loads the folder without ``import adatok_vlm`` (with ``trust_remote_code=True``).
        ``push_to_hub=True`` pushes all of it."""
        from ..tokenizer.model_card import card_sections, read_training_info, save_for_hub

        def card(folder):
            training, metrics = card_sections(folder, model_card)
            cache = read_training_info(folder, "token_cache.json")     # written by train_dit beside the model
            data = {f"token cache {k}": cache[k] for k in ("path", "tokenizer", "num_items", "mean_length")
                    if cache.get(k) is not None}
            self.write_model_card(folder, {**data, **training}, metrics)

        return save_for_hub(self, super().save_pretrained, save_directory, args, kwargs,
                            {"AutoConfig": "AdaTokDiTConfig", "AutoModel": "AdaTokDiT"}, write_card=card)

    def write_model_card(self, save_directory, training: dict | None = None, metrics: dict | None = None):
        """Write ``save_directory/README.md`` for this DiT (see :mod:`adatok_vlm.tokenizer.model_card`)."""
        from ..tokenizer.model_card import closest_preset, write_model_card
        from .configuration_dit import DIT_PRESETS

        c = self.config
        preset, overrides = closest_preset(c.to_dict(), DIT_PRESETS)
        summary = {
            "parameters": f"{self.num_parameters():,}",
            "transformer (hidden, depth, heads, mlp_ratio)": f"{c.hidden_size}, {c.depth}, {c.num_heads}, {c.mlp_ratio}",
            "token_dim": c.token_dim,
            "max tokens (m)": c.max_tokens,
            "num_classes (+1 null class)": c.num_classes,
            "class_dropout_prob (CFG)": c.class_dropout_prob,
            "pos_embed": c.pos_embed,
            "length histograms (num_tokens=None)": "per class, from the training data"
                                                   if c.length_histograms is not None else "none",
            "token normalisation": "per-channel mean/std" if c.token_mean is not None else "none",
        }
        usage = ("import adatok_vlm, torch, transformers\n"
                 "dit = transformers.AutoModel.from_pretrained(FOLDER)\n"
                 "enc = dit.generate(torch.tensor([0, 1]), cfg_scale=4.0, num_steps=50)   # lengths from the data\n"
                 "images = adatok.decode(enc.tokens, enc.lengths)                        # the AdaTok it was trained on")
        description = ("A class- and length-conditional DiT (flow matching, classifier-free guidance) that generates "
                       f"variable-length AdaTok token sequences: up to {c.max_tokens} tokens of {c.token_dim} "
                       f"channels for {c.num_classes} classes; decode them with the AdaTok tokenizer they came from.")
        return write_model_card(save_directory, c.model_type, "AdaTok DiT generator", description, summary,
                                preset=preset, overrides=overrides, training=training or None,
                                metrics=metrics or None, usage=usage, tags=["dit", "flow-matching"],
                                pipeline_tag="unconditional-image-generation")

    def _init_weights(self, module: nn.Module) -> None:
        """DiT's init: xavier-uniform Linears, N(0, 0.02) embeddings and timestep MLPs, adaLN-Zero."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            how = getattr(module, "_dit_init", "xavier")
            if how == "zeros":
                init.zeros_(module.weight)
            elif how == "normal":
                init.normal_(module.weight, std=std)
            else:
                init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, std=std)
        elif isinstance(module, AdaTokDiT) and module.pos_embed is not None:
            n, dim = module.pos_embed.shape[1:]
            table = sinusoidal_embedding(torch.arange(n, dtype=torch.float32), dim)
            init.copy_(module.pos_embed, table[None].to(module.pos_embed.device, module.pos_embed.dtype))


class AdaTokDiT(AdaTokDiTPreTrainedModel):
    """Class- and length-conditional DiT predicting the flow-matching velocity of a token sequence.

    Example::

        config = AdaTokDiTConfig.from_preset("dit-b", token_dim=16, max_tokens=256, num_classes=1000)
        model = AdaTokDiT(config)
        v = model(x_t, t, class_labels, lengths)                # [B, L, D]
        enc = model.generate(torch.tensor([207, 360]), cfg_scale=4.0, num_steps=50)
        images = adatok.decode(enc.tokens, enc.lengths)
    """

    def __init__(self, config: AdaTokDiTConfig):
        super().__init__(config)
        h, m = config.hidden_size, config.max_tokens
        self.x_embedder = nn.Linear(config.token_dim, h)
        # Sin-cos positions are computed on the fly (no buffer to restore from a meta-device load).
        self.pos_embed = nn.Parameter(torch.zeros(1, m, h)) if config.pos_embed == "learned" else None
        self.t_embedder = ScalarEmbedder(h, scale=1000.0)
        self.length_embedder = ScalarEmbedder(h, scale=1.0)
        self.y_embedder = nn.Embedding(config.num_classes + 1, h)        # + the null class
        self.blocks = nn.ModuleList(DiTBlock(h, config.num_heads, config.mlp_ratio) for _ in range(config.depth))
        self.final_layer = FinalLayer(h, config.token_dim)
        self.gradient_checkpointing = False
        self.post_init()

    # ------------------------------------------------------------------ properties
    @property
    def null_class(self) -> int:
        """The class id of classifier-free guidance's unconditional branch (``num_classes``)."""
        return self.config.num_classes

    @property
    def max_tokens(self) -> int:
        return self.config.max_tokens

    @property
    def length_sampler(self) -> LengthSampler:
        """The per-class length distribution stored in the config (an error if there is none).

        Built once per histogram object (ImageNet's is 1000 x 256 counts), rebuilt when
        ``config.length_histograms`` is replaced.
        """
        histograms = self.config.length_histograms
        cached = getattr(self, "_length_sampler_cache", None)   # (the list it was built from, sampler)
        if cached is None or cached[0] is not histograms:
            cached = (histograms, LengthSampler.from_config(self.config))
            self._length_sampler_cache = cached
        return cached[1]

    # ------------------------------------------------------------------ data statistics
    def set_length_histograms(self, histograms) -> None:
        """Store per-class length counts ``[num_classes, max_tokens]`` (a ``LengthSampler``, tensor or lists)."""
        sampler = histograms if isinstance(histograms, LengthSampler) else LengthSampler(histograms)
        if (sampler.num_classes, sampler.max_tokens) != (self.config.num_classes, self.max_tokens):
            raise ValueError(f"histograms must be [num_classes={self.config.num_classes}, "
                             f"max_tokens={self.max_tokens}], "
                             f"got [{sampler.num_classes}, {sampler.max_tokens}]")
        self.config.length_histograms = sampler.to_list()

    def set_token_statistics(self, mean, std) -> None:
        """Store per-channel token ``mean`` and ``std`` (``[D]`` each) used by :meth:`normalize_tokens`."""
        mean = [float(v) for v in torch.as_tensor(mean).flatten().tolist()]
        std = [float(v) for v in torch.as_tensor(std).flatten().tolist()]
        d = self.config.token_dim
        if len(mean) != d or len(std) != d:
            raise ValueError(f"mean and std must hold token_dim={d} values each, got {len(mean)} and {len(std)}")
        if not all(math.isfinite(v) for v in mean + std) or min(std) <= 0:
            raise ValueError("mean must be finite and std finite and positive")
        self.config.token_mean, self.config.token_std = mean, std

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.config.token_mean is None:
            return None
        mean = torch.tensor(self.config.token_mean, device=like.device, dtype=like.dtype)
        std = torch.tensor(self.config.token_std, device=like.device, dtype=like.dtype)
        return mean, std

    def normalize_tokens(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """``(tokens - mean) / std`` per channel (identity without stored stats); padding stays zero."""
        stats = self._stats(tokens)
        out = tokens if stats is None else (tokens - stats[0]) / stats[1]
        if lengths is not None:
            out = out.masked_fill(~token_mask(lengths.to(tokens.device), tokens.shape[1])[..., None], 0.0)
        return out

    def denormalize_tokens(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Inverse of :meth:`normalize_tokens`; padding stays zero."""
        stats = self._stats(tokens)
        out = tokens if stats is None else tokens * stats[1] + stats[0]
        if lengths is not None:
            out = out.masked_fill(~token_mask(lengths.to(tokens.device), tokens.shape[1])[..., None], 0.0)
        return out

    # ------------------------------------------------------------------ stages
    def _check_inputs(self, tokens, timesteps, class_labels, lengths) -> tuple[torch.Tensor, int, int]:
        """Validate the forward inputs; returns ``(timesteps [B], shortest, longest)`` length."""
        c = self.config
        if not isinstance(tokens, torch.Tensor) or not tokens.is_floating_point() or tokens.dim() != 3:
            raise TypeError(f"tokens must be a float tensor [B, L, {c.token_dim}], got {_describe(tokens)}")
        b, length, d = tokens.shape
        if b == 0 or length == 0 or d != c.token_dim:
            raise ValueError(f"tokens must have shape [B, L, {c.token_dim}] with B, L >= 1, got {tuple(tokens.shape)}")
        for name, value in (("lengths", lengths), ("class_labels", class_labels)):
            if not isinstance(value, torch.Tensor) or value.is_floating_point() or value.dtype == torch.bool:
                raise TypeError(f"{name} must be a LongTensor [{b}], got {_describe(value)}")
            if value.shape != (b,):
                raise ValueError(f"{name} must have shape [{b}] (one per sample), got {tuple(value.shape)}")
        if not isinstance(timesteps, torch.Tensor):
            if isinstance(timesteps, bool) or not isinstance(timesteps, (int, float)):
                raise TypeError(f"timesteps must be a float tensor [{b}] or a number, got {_describe(timesteps)}")
            timesteps = torch.tensor(float(timesteps), device=tokens.device)
        if timesteps.is_complex() or timesteps.dtype == torch.bool:
            raise TypeError(f"timesteps must be a real tensor [{b}] of flow times in [0, 1], got {timesteps.dtype}")
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(b)
        if timesteps.shape != (b,):
            raise ValueError(f"timesteps must have shape [{b}], got {tuple(timesteps.shape)}")
        # One host sync for all range checks (the max length is needed anyway to cut the sequence).
        # Non-finite tokens count only at valid positions: padding may hold anything.
        valid = torch.arange(length, device=tokens.device)[None, :] < lengths[:, None]
        bad_tokens = (~torch.isfinite(tokens).all(-1) & valid).sum()
        t = timesteps.double()
        checks = torch.stack([v.double() for v in (lengths.min(), lengths.max(), class_labels.min(),
                                                   class_labels.max(), bad_tokens, t.min(), t.max(),
                                                   torch.isfinite(t).all())]).tolist()
        lo_len, hi_len, lo_y, hi_y, num_bad = (int(v) for v in checks[:5])
        lo_t, hi_t, finite_t = checks[5:]
        if not finite_t or lo_t < 0.0 or hi_t > 1.0:
            raise ValueError(f"timesteps must be finite flow times in [0, 1] (1 = noise), got values in "
                             f"[{lo_t:.4g}, {hi_t:.4g}]")
        top = min(length, c.max_tokens)
        if lo_len < 1 or hi_len > top:
            raise ValueError(f"lengths must lie in 1..{top} (min of tokens' L={length} and max_tokens="
                             f"{c.max_tokens}), got values in [{lo_len}, {hi_len}]")
        if lo_y < 0 or hi_y > c.num_classes:
            raise ValueError(f"class_labels must lie in 0..{c.num_classes} ({c.num_classes} = the null class), "
                             f"got values in [{lo_y}, {hi_y}]")
        if num_bad:
            raise ValueError(f"tokens hold NaN or infinite values at {num_bad} valid (unpadded) position(s)")
        return timesteps, lo_len, hi_len

    def embed_condition(self, timesteps: torch.Tensor, class_labels: torch.Tensor,
                        lengths: torch.Tensor) -> torch.Tensor:
        """``c = emb(t) + emb(class) + emb(L)``, ``[B, hidden]``."""
        return self.t_embedder(timesteps) + self.y_embedder(class_labels) + self.length_embedder(lengths)

    def embed_tokens(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``[B, n, D] -> [B, n, hidden]``; padded inputs are zeroed first so inf/NaN cannot leak."""
        n = tokens.shape[1]
        x = self.x_embedder(tokens.masked_fill(~valid[..., None], 0.0).to(self.x_embedder.weight.dtype))
        if self.pos_embed is not None:
            return x + self.pos_embed[:, :n]
        pos = sinusoidal_embedding(torch.arange(n, device=x.device), x.shape[-1])
        return x + pos.to(x.dtype)[None]

    def forward(self, tokens: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor,
                lengths: torch.Tensor) -> torch.Tensor:
        """Velocity of the flow at ``(tokens, t)``.

        Args:
            tokens: ``[B, L, D]`` noisy tokens ``x_t`` (normalised space); values past each length are
                ignored (NaN allowed).
            timesteps: ``[B]`` (or a number) flow time in [0, 1]; 1 = pure noise.
            class_labels: ``[B]`` in ``0..num_classes`` (``num_classes`` = null class).
            lengths: ``[B]`` valid tokens per sample, ``1..min(L, max_tokens)``.
        Returns:
            ``[B, L, D]`` velocity, exactly zero past each length.
        """
        timesteps, shortest, n = self._check_inputs(tokens, timesteps, class_labels, lengths)
        b, length, _ = tokens.shape
        valid = token_mask(lengths, n)                                     # [B, n]
        x = self.embed_tokens(tokens[:, :n], valid)                        # [B, n, H]
        c = self.embed_condition(timesteps, class_labels, lengths)         # [B, H]
        key_valid = None if shortest == n else valid                       # no mask: fused fast path
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, c, key_valid, use_reentrant=False)
            else:
                x = block(x, c, key_valid)
        v = self.final_layer(x, c)                                         # [B, n, D]
        v = v.masked_fill(~valid[..., None], 0.0)
        return F.pad(v, (0, 0, 0, length - n)) if length > n else v

    # ------------------------------------------------------------------ generation
    def check_generate_arguments(self, class_labels, num_tokens=None, cfg_scale: float = 1.0, num_steps: int = 50,
                                 sampler: str = "euler", guidance_interval=None, generator=None):
        """Validate :meth:`generate`'s arguments (also used by ``ClassToImagePipeline`` before any work).

        Returns ``(labels [B] long, lengths [B] long or None (from the histograms), num_steps int)``; every
        bad value is a ``TypeError``/``ValueError`` naming the argument (a bool is never a count or a scale).
        """
        labels = check_class_labels(class_labels, self.config.num_classes, allow_null=True)
        if guidance_interval is not None and (
                not isinstance(guidance_interval, (tuple, list))
                or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in guidance_interval)):
            raise TypeError(f"guidance_interval must be None or a pair (lo, hi) of times in [0, 1], "
                            f"got {_describe(guidance_interval)}")
        check_guidance(cfg_scale, guidance_interval)
        if not isinstance(sampler, str) or sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {_describe(generator)}")
        if num_tokens is None:
            return labels, None, int(num_steps)
        if isinstance(num_tokens, str):
            raise ValueError(f"num_tokens must be None (histogram), an int or a LongTensor [B], got {num_tokens!r}")
        lengths = resolve_num_tokens(num_tokens, labels.shape[0], self.max_tokens, labels.device)
        return labels, lengths, int(num_steps)

    @torch.no_grad()
    def generate(self, class_labels, num_tokens=None, cfg_scale: float = 1.0, num_steps: int = 50,
                 sampler: str = "euler", guidance_interval: tuple[float, float] | None = None,
                 generator: torch.Generator | None = None, progress: bool = False) -> AdaTokEncoding:
        """Sample token sequences for ``class_labels``.

        Args:
            class_labels: LongTensor ``[B]`` (or a list of ints) in ``0..num_classes - 1``; the null class
                ``num_classes`` draws unconditional samples.
            num_tokens: ``None`` (a length per sample from the stored per-class histogram), an int, or
                a LongTensor ``[B]``, all in ``1..max_tokens``.
            cfg_scale: classifier-free guidance scale (>= 1; 1 = none).
            num_steps / sampler: integration steps and ``"euler"`` or ``"heun"``.
            guidance_interval: ``(lo, hi)``: guide only while ``lo <= t <= hi`` (t = 1 is noise).
            generator: the source of the lengths and the initial noise.
        Returns:
            :class:`AdaTokEncoding` with ``tokens [B, max(lengths), D]`` float32 (de-normalised, zero
            past each length) and ``lengths [B]``.
        """
        labels, lengths, num_steps = self.check_generate_arguments(class_labels, num_tokens, cfg_scale, num_steps,
                                                                   sampler, guidance_interval, generator)
        labels = labels.to(self.device)
        if lengths is None:
            lengths = self.length_sampler.sample(labels, generator=generator)
        lengths = lengths.to(self.device)
        b = labels.shape[0]
        longest = int(lengths.max())
        where = generator.device if generator is not None else self.device
        noise = torch.randn(b, longest, self.config.token_dim, generator=generator, device=where).to(self.device)
        x = sample_flow(self, noise, labels, lengths, null_class=self.null_class, num_steps=num_steps,
                        sampler=sampler, cfg_scale=cfg_scale, guidance_interval=guidance_interval, progress=progress)
        tokens = self.denormalize_tokens(x, lengths)
        return AdaTokEncoding(tokens=tokens, lengths=lengths)
