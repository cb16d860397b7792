"""AdaTok: a 1D image tokenizer whose every token prefix reconstructs the image.

Paper: "AdaTok: Adaptive visual representation with quality-preserving dynamic tokens".

* Encoder (eq. 3): a ViT reads the latent patches ``p_1..p_n`` followed by ``m`` learnable suffix
  tokens ``q_1..q_m``; the outputs at the suffix positions, through a bottleneck, are the tokens
  ``z = Encoder(p, q)[n:]``.
* Nested Tail Masking (eq. 4): in training every sample keeps its own random prefix length
  ``L ~ U[a, b]``; the tail is replaced by a mask token and hidden from every self-attention layer
  of the decoder by a key padding mask, so the decoder is blind to it.
* Decoder: a ViT over ``n`` learned patch queries followed by the kept tokens predicts the latent
  patches; it reconstructs from any length 1..m.

The file reads bottom-up: helpers, blocks, encoder/decoder, outputs, the model.
Batches of variable-length tokens are ``tokens [B, L, D]`` (padded) plus ``lengths [B]``;
``token_mask[b, i] = i < lengths[b]`` (True = valid) is derived, never stored.
"""

from __future__ import annotations

import math

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .allocation import binary_search_lengths, oracle_lengths
from .configuration_adatok import AdaTokConfig
from .latent_space import VAELatentSpace, build_latent_space
from .loading import load_checked
from .policy import (IMAGE_STATISTICS, QualityCurveHead, TokenLengthPolicy, allocate_budget, image_statistics,
                     length_grid)
from .quantizer import FSQBottleneck, build_bottleneck
from .rewards import RewardSpec
from .validation import check_lengths, check_pixel_values, check_positive_number, check_tokens, resolve_num_tokens

LENGTH_MODES = ("auto", "sample", "search", "oracle")


# ============================================================================================
# helpers
# ============================================================================================
def token_mask(lengths: torch.Tensor, max_length: int) -> torch.Tensor:
    """``[B, max_length]`` bool, True where position ``i < lengths[b]`` (valid)."""
    return torch.arange(max_length, device=lengths.device)[None, :] < lengths[:, None]


def pack_image_tokens(tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Padded ``tokens [B, L, D]`` + ``lengths [B]`` -> packed ``[sum(lengths), D]`` (image order kept)."""
    return tokens[token_mask(lengths.to(tokens.device), tokens.shape[1])]


def unpack_image_tokens(packed: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Packed ``[sum(lengths), D]`` -> padded ``[B, max(lengths), D]`` (zeros past each length)."""
    lengths = lengths.to(packed.device)
    out = packed.new_zeros(lengths.shape[0], int(lengths.max()), packed.shape[-1])
    out[token_mask(lengths, out.shape[1])] = packed
    return out


def pixel_mse(reconstruction: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared error ``[B]`` in float32 of two image batches ``[B, C, H, W]``: the paper's
    rMSE and the reconstruction loss ``rl`` of the rewards (eq. 6/7)."""
    return (reconstruction.float() - pixel_values.float()).pow(2).flatten(1).mean(1)


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[B, C, H, W] -> [B, (H/p)*(W/p), p*p*C]``, patches in row-major order."""
    b, c, h, w = x.shape
    p = patch_size
    x = x.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def check_latents(latents, channels: int, grid: int, name: str = "latents") -> None:
    """``latents`` must be a finite float tensor ``[B, channels, grid, grid]`` with B >= 1 (the normalised
    latents the latent space's ``encode`` returns)."""
    expected = f"[B, {channels}, {grid}, {grid}]"
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {expected} (normalised latents), got "
                        f"{type(latents).__name__}")
    if not latents.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor of normalised latents, got {latents.dtype}")
    if latents.dim() != 4 or latents.shape[0] == 0 or tuple(latents.shape[1:]) != (channels, grid, grid):
        raise ValueError(f"{name} must have shape {expected} with B >= 1 (this model's latent grid), "
                         f"got {tuple(latents.shape)}")
    if not torch.isfinite(latents).all():
        raise ValueError(f"{name} contains NaN or infinite values")


def unpatchify(x: torch.Tensor, patch_size: int, channels: int, grid: int) -> torch.Tensor:
    """Inverse of :func:`patchify` for a square ``grid x grid`` of patches."""
    b = x.shape[0]
    p = patch_size
    x = x.reshape(b, grid, grid, p, p, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, grid * p, grid * p)


# ============================================================================================
# blocks
# ============================================================================================
class TransformerStack(nn.Module):
    """Pre-norm ViT blocks (timm's ``Block``) with a final LayerNorm and an optional key padding mask.

    Attention always runs through ``F.scaled_dot_product_attention`` with a boolean mask
    (timm's ``fused_attn`` is forced on, independent of the TIMM_FUSED_ATTN environment variable),
    so GPUs use fused kernels and masked keys have no effect at all.
    """

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, qk_norm=qk_norm) for _ in range(depth)
        )
        for block in self.blocks:
            block.attn.fused_attn = True
        self.norm = nn.LayerNorm(dim)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor | None = None) -> torch.Tensor:
        # key_valid [B, N] (True = attend) -> [B, 1, 1, N], broadcast over heads and queries.
        attn_mask = None if key_valid is None else key_valid[:, None, None, :]
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, attn_mask, use_reentrant=False)
            else:
                x = block(x, attn_mask=attn_mask)
        return self.norm(x)


# ============================================================================================
# encoder and decoder
# ============================================================================================
class AdaTokEncoder(nn.Module):
    """ViT over ``n`` latent patches followed by ``m`` learnable suffix tokens (paper eq. 3).

    Returns the hidden states at the suffix positions ``[B, m, dim]`` and all hidden states
    ``[B, n + m, dim]`` (the policy head reads those).
    """

    def __init__(self, patch_dim: int, num_patches: int, num_tokens: int, dim: int, depth: int,
                 num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False):
        super().__init__()
        self.num_patches = num_patches
        self.patch_embed = nn.Linear(patch_dim, dim)
        self.patch_pos = nn.Parameter(torch.zeros(1, num_patches, dim))
        # q_1..q_m: learnable, so they carry their own position.
        self.suffix_tokens = nn.Parameter(torch.zeros(1, num_tokens, dim))
        self.transformer = TransformerStack(dim, depth, num_heads, mlp_ratio, qk_norm)

    def forward(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = patches.shape[0]
        x = self.patch_embed(patches) + self.patch_pos                   # [B, n, dim]
        q = self.suffix_tokens.expand(b, -1, -1)                          # [B, m, dim]
        hidden = self.transformer(torch.cat([x, q], dim=1))               # [B, n + m, dim]
        return hidden[:, self.num_patches:], hidden


class AdaTokDecoder(nn.Module):
    """ViT over ``n`` learned patch queries followed by the kept tokens.

    Tokens past each sample's length are replaced by a learned mask token (paper eq. 4) and excluded
    as keys from every self-attention layer, so their values cannot influence any output. The
    sequence is cut at the batch's longest length before the transformer: positions past it are
    masked for every sample, so dropping them changes no output and the cost follows the kept
    lengths, not ``m``. When every sample keeps the whole cut prefix no key is masked and no mask is
    passed, so attention can take the kernels that have no mask support (flash attention on GPU).
    """

    def __init__(self, token_dim: int, num_tokens: int, num_patches: int, patch_dim: int, dim: int,
                 depth: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False):
        super().__init__()
        self.num_patches = num_patches
        self.token_embed = nn.Linear(token_dim, dim)
        self.token_pos = nn.Parameter(torch.zeros(1, num_tokens, dim))
        # The placeholder M_i of eq. 4. A buffer, not a parameter: keys at masked positions are
        # hidden from every attention layer and their outputs are discarded, so a "learned" mask
        # token could never receive a gradient. It only fills the tail with a fixed, finite value.
        self.register_buffer("mask_token", torch.zeros(1, 1, dim))
        self.patch_queries = nn.Parameter(torch.zeros(1, num_patches, dim))
        self.transformer = TransformerStack(dim, depth, num_heads, mlp_ratio, qk_norm)
        self.to_patches = nn.Linear(dim, patch_dim)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        shortest, longest = torch.stack(torch.aminmax(lengths)).tolist()  # one host sync for both
        tokens = tokens[:, :longest]                                      # [B, max(lengths), D]: a view
        b, length, _ = tokens.shape
        masked = shortest < length                                        # some sample has a tail left
        if masked:
            valid = token_mask(lengths, length)                           # [B, L]
            # Zero the tail first so that inf/NaN padding cannot leak through 0 * inf in the embedding.
            tokens = tokens.masked_fill(~valid[..., None], 0.0)
        t = self.token_embed(tokens) + self.token_pos[:, :length]         # [B, L, dim]
        if masked:
            t = torch.where(valid[..., None], t, self.mask_token.to(t.dtype))  # tail -> M_i
        x = torch.cat([self.patch_queries.expand(b, -1, -1), t], dim=1)   # [B, n + L, dim]
        key_valid = torch.cat([valid.new_ones(b, self.num_patches), valid], dim=1) if masked else None
        hidden = self.transformer(x, key_valid)                           # [B, n + L, dim]
        return self.to_patches(hidden[:, : self.num_patches])             # [B, n, patch_dim]


# ============================================================================================
# outputs
# ============================================================================================
@dataclass
class AdaTokEncoding(ModelOutput):
    """Variable-length image tokens.

    Args:
        tokens: ``[B, L, D]``, padded to the batch's longest length with zeros.
        lengths: ``[B]`` valid tokens per image.
        codes: ``[B, L]`` FSQ integer ids (``-1`` at padding), or None for continuous tokens.
    """

    tokens: torch.FloatTensor | None = None
    lengths: torch.LongTensor | None = None
    codes: torch.LongTensor | None = None

    @property
    def token_mask(self) -> torch.Tensor:
        return token_mask(self.lengths, self.tokens.shape[1])


@dataclass
class AdaTokOutput(ModelOutput):
    """Output of the Nested Tail Masking training forward.

    Args:
        loss: ``recon_loss + kl_weight * kl_loss`` (the part of eq. 5 the model computes itself;
            perceptual and adversarial terms live in ``adatok_vlm.tokenizer.losses``).
        recon_loss: mean squared error between predicted and target latents.
        kl_loss: the KL term of a ``"kl"`` token regulariser (0 otherwise).
        reconstruction: ``[B, 3, H, W]`` decoded images in [0, 1] scale (not clamped), or None.
        latents / target_latents: ``[B, C, h, w]`` predicted and encoded latents.
        lengths: ``[B]`` the prefix length each sample kept.
        tokens: ``[B, m, D]`` all tokens before masking.
    """

    loss: torch.FloatTensor | None = None
    recon_loss: torch.FloatTensor | None = None
    kl_loss: torch.FloatTensor | None = None
    reconstruction: torch.FloatTensor | None = None
    latents: torch.FloatTensor | None = None
    target_latents: torch.FloatTensor | None = None
    lengths: torch.LongTensor | None = None
    tokens: torch.FloatTensor | None = None


# ============================================================================================
# model
# ============================================================================================
class AdaTokPreTrainedModel(PreTrainedModel):
    config_class = AdaTokConfig
    base_model_prefix = "adatok"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["Block"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, strict: bool = True, **kwargs):
        """``PreTrainedModel.from_pretrained``, strict: weights from safetensors only, and any missing,
        unexpected or shape-mismatched weight (or a ``config.json`` of another ``model_type``) raises a
        ``ValueError`` naming it. ``strict=False`` restores transformers' warn-and-reinitialise.

        Before anything is built (``loading.load_checked``): a missing local path, subfolder or
        ``config.json`` is a ``FileNotFoundError`` without any network call, a ``config.json`` that is
        not an object or of another model a ``ValueError`` naming the class to use, a damaged or
        pickle-only weights file an ``OSError`` naming it. Nothing downloads unless
        ``local_files_only=False``."""
        return load_checked(super().from_pretrained, cls, pretrained_model_name_or_path, model_args, kwargs, strict)

    # ------------------------------------------------------------------ saving
    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModel"):
        """No-op. transformers calls it after a ``trust_remote_code`` load so that saving copies the class's
        source file; ours lives in the installed package and :meth:`save_pretrained` writes the ``auto_map``."""

    def save_pretrained(self, save_directory, *args, model_card: dict | None = None, **kwargs):
        """``PreTrainedModel.save_pretrained`` (safetensors), plus a ``README.md`` model card (config summary,
        preset, training data/steps/metrics from ``model_card={"training": {...}, "metrics": {...}}`` or a
        ``training_info.json`` already in the folder) and the ``auto_map`` that loads the folder without
        ``import adatok_vlm`` (with ``trust_remote_code=True``). ``push_to_hub=True`` pushes all of it."""
        from .model_card import card_sections, save_for_hub

        def card(folder):
            training, metrics = card_sections(folder, model_card)
            self.write_model_card(folder, training, metrics)

        return save_for_hub(self, super().save_pretrained, save_directory, args, kwargs,
                            {"AutoConfig": "AdaTokConfig", "AutoModel": "AdaTokModel"}, write_card=card)

    def write_model_card(self, save_directory, training: dict | None = None, metrics: dict | None = None):
        """Write ``save_directory/README.md`` for this tokenizer (see :mod:`adatok_vlm.tokenizer.model_card`)."""
        from .configuration_adatok import ADATOK_PRESETS
        from .model_card import closest_preset, write_model_card

        c = self.config
        preset, overrides = closest_preset(c.to_dict(), ADATOK_PRESETS)
        summary = {
            "parameters (trainable / all)": f"{self.num_parameters(only_trainable=True):,} / {self.num_parameters():,}",
            "image_size": c.image_size,
            "latent_space": c.latent_space + (f" ({c.vae_path})" if c.vae_path else ""),
            "patch_size (patches)": f"{c.patch_size} ({c.num_patches})",
            "encoder (hidden, layers, heads)": f"{c.hidden_size}, {c.num_encoder_layers}, {c.num_attention_heads}",
            "decoder (hidden, layers, heads)": f"{c.decoder_hidden_size}, {c.num_decoder_layers}, "
                                               f"{c.decoder_num_attention_heads}",
            "max tokens (m)": c.num_latent_tokens,
            "token_dim": c.token_dim,
            "bottleneck": c.bottleneck + (f" {c.fsq_levels}" if c.bottleneck == "fsq" else f", {c.token_regularizer}"),
            "NTM keep range": f"[{c.ntm_min_tokens}, {c.ntm_max_tokens}] {c.ntm_distribution}, full {c.ntm_full_prob}",
            "length policy (num_tokens='auto')": (f"lengths {c.policy_min_tokens}..{c.policy_max_tokens} step "
                                                  f"{c.policy_step}, {c.reward_kind} reward")
                                                 if c.policy_enabled else "none (stage 1 only)",
        }
        usage = ("import adatok_vlm, transformers\n"
                 "model = transformers.AutoModel.from_pretrained(FOLDER)\n"
                 "processor = transformers.AutoImageProcessor.from_pretrained(FOLDER)\n"
                 "pixel_values = processor(images, return_tensors='pt')['pixel_values']\n"
                 "enc = model.encode(pixel_values, num_tokens=" + ("'auto'" if c.policy_enabled else "8") + ")\n"
                 "images = model.decode(enc.tokens, enc.lengths)")
        description = ("An AdaTok image tokenizer: a 1D ViT tokenizer whose every token prefix reconstructs the "
                       f"image (Nested Tail Masking), 1 to {c.num_latent_tokens} tokens of {c.token_dim} channels "
                       "per image" + (", with the length policy that chooses the count per image." if c.policy_enabled
                                      else "."))
        return write_model_card(save_directory, c.model_type, "AdaTok image tokenizer", description, summary,
                                preset=preset, overrides=overrides, training=training or None,
                                metrics=metrics or None, usage=usage, tags=["image-tokenizer"],
                                pipeline_tag="image-feature-extraction")

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            if module.weight is not None:
                init.ones_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, AdaTokEncoder):
            init.trunc_normal_(module.patch_pos, std=std)
            init.trunc_normal_(module.suffix_tokens, std=std)
        elif isinstance(module, AdaTokDecoder):
            init.trunc_normal_(module.token_pos, std=std)
            init.trunc_normal_(module.mask_token, std=std)
            init.trunc_normal_(module.patch_queries, std=std)


class AdaTokModel(AdaTokPreTrainedModel):
    """The AdaTok tokenizer.

    Example::

        model = AdaTokModel(AdaTokConfig.from_preset("adatok-tiny"))
        enc = model.encode(pixel_values, num_tokens=8)        # tokens [B, 8, D], lengths [B]
        images = model.decode(enc.tokens, enc.lengths)          # [B, 3, H, W] in [0, 1]
    """

    def __init__(self, config: AdaTokConfig):
        super().__init__(config)
        self.latent_space = build_latent_space(
            config.latent_space, config.num_channels, config.vae_config, config.vae_path,
            config.vae_scaling_factor, config.vae_shift_factor, config.vae_random_init,
            latent_mean=config.vae_latent_mean, latent_std=config.vae_latent_std, vae_autocast=config.vae_autocast,
        )
        m, n = config.num_latent_tokens, config.num_patches
        self.encoder = AdaTokEncoder(config.patch_dim, n, m, config.hidden_size, config.num_encoder_layers,
                                     config.num_attention_heads, config.mlp_ratio, config.qk_norm)
        self.bottleneck = build_bottleneck(config.bottleneck, config.hidden_size, config.token_dim,
                                           config.token_regularizer, config.fsq_levels, config.token_noise_std)
        self.decoder = AdaTokDecoder(config.token_dim, m, n, config.patch_dim, config.decoder_hidden_size,
                                     config.num_decoder_layers, config.decoder_num_attention_heads,
                                     config.mlp_ratio, config.qk_norm)
        self.policy = self.quality_head = None
        if config.policy_enabled:
            self._build_policy()
        if isinstance(self.latent_space, VAELatentSpace):
            # The frozen VAE keeps diffusers' own init; mark it so post_init leaves it alone.
            for module in self.latent_space.modules():
                module._is_hf_initialized = True
        self.post_init()

    # ------------------------------------------------------------------ properties
    @property
    def num_latent_tokens(self) -> int:
        return self.config.num_latent_tokens

    @property
    def is_fsq(self) -> bool:
        return isinstance(self.bottleneck, FSQBottleneck)

    @property
    def length_grid(self) -> torch.Tensor:
        """The token counts the policy chooses among, ``[K]``."""
        c = self.config
        return length_grid(c.policy_min_tokens, c.policy_max_tokens, c.policy_step)

    @property
    def has_policy(self) -> bool:
        return self.policy is not None

    def _build_policy(self) -> None:
        c = self.config
        feature_dim = (2 * c.hidden_size + (len(IMAGE_STATISTICS) if c.policy_image_statistics else 0)
                       + (c.num_latent_tokens * c.token_dim if c.policy_token_features else 0))
        # Built on the CPU even inside from_pretrained's meta-device context: the heads validate
        # their length grid with real values. They are small; their weights load right after.
        with torch.device("cpu"):
            grid = length_grid(c.policy_min_tokens, c.policy_max_tokens, c.policy_step)
            self.policy = TokenLengthPolicy(feature_dim, grid, c.policy_hidden_size, c.policy_num_layers,
                                            c.policy_dropout)
            self.quality_head = QualityCurveHead(feature_dim, grid, c.policy_hidden_size, c.policy_num_layers,
                                                 c.policy_dropout)
        # Both heads initialise themselves (a near-uniform policy, a plausible starting curve).
        for module in (*self.policy.modules(), *self.quality_head.modules()):
            module._is_hf_initialized = True

    def enable_policy(self) -> TokenLengthPolicy:
        """Attach a fresh (near-uniform) length policy and quality head for stage-2 training."""
        self.config.policy_enabled = True
        self._build_policy()
        self.policy.to(self.device)
        self.quality_head.to(self.device)
        return self.policy

    def reward_spec(self) -> RewardSpec:
        c = self.config
        return RewardSpec(kind=c.reward_kind, alpha=c.reward_alpha, beta=c.reward_beta, gamma=c.reward_gamma,
                          rl_base=c.reward_rl_base)

    def policy_features(self, hidden: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Detached policy input ``[B, 2*dim (+9) (+m*D)]``: mean patch features and mean token features, then
        ``image_statistics(pixel_values)`` when ``config.policy_image_statistics`` (the pixels the
        encoder read), then the ``m`` bottleneck tokens flattened in prefix order when
        ``config.policy_token_features`` (recomputed from ``hidden``'s suffix: eval-mode bottleneck, no noise)."""
        n = self.config.num_patches
        features = torch.cat([hidden[:, :n].mean(1), hidden[:, n:].mean(1)], dim=-1)
        if self.config.policy_image_statistics:
            if pixel_values is None:
                raise ValueError("policy_features: this policy reads image statistics; pass pixel_values "
                                 "[B, C, H, W], the images the encoder read")
            features = torch.cat([features, image_statistics(pixel_values).to(features)], dim=-1)
        if self.config.policy_token_features:
            tokens, _ = self.bottleneck(hidden[:, n:], sample=False)         # [B, m, D]
            features = torch.cat([features, tokens.flatten(1).to(features)], dim=-1)
        return features.detach()

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        if only_trainable:
            return sum(p.numel() for p in self.parameters() if p.requires_grad)
        return super().num_parameters(only_trainable=False, exclude_embeddings=exclude_embeddings)

    # ------------------------------------------------------------------ stages
    def sample_ntm_lengths(self, batch_size: int, device: torch.device | None = None,
                           generator: torch.Generator | None = None) -> torch.LongTensor:
        """Per-sample prefix lengths for Nested Tail Masking, ``L in [a, b]`` (paper eq. 4).

        ``uniform`` draws L uniformly; ``log_uniform`` draws log L uniformly (more short prefixes);
        with probability ``ntm_full_prob`` a sample keeps all ``b`` tokens instead.
        """
        a, b = self.config.ntm_min_tokens, self.config.ntm_max_tokens
        device = device or self.device
        if self.config.ntm_distribution == "uniform":
            lengths = torch.randint(a, b + 1, (batch_size,), generator=generator,
                                    device="cpu" if generator is not None else device)
        else:
            u = torch.rand(batch_size, generator=generator, device="cpu" if generator is not None else device)
            log_l = torch.log(torch.tensor(a - 0.5)) + u * (torch.log(torch.tensor(b + 0.5)) - torch.log(torch.tensor(a - 0.5)))
            lengths = torch.exp(log_l).round().long().clamp(a, b)
        if self.config.ntm_full_prob > 0:
            full = torch.rand(batch_size, generator=generator, device=lengths.device) < self.config.ntm_full_prob
            lengths = torch.where(full, torch.full_like(lengths, b), lengths)
        return lengths.to(device)

    def forward_encoder(self, pixel_values: torch.Tensor | None = None, sample: bool = False,
                        latents: torch.Tensor | None = None):
        """Pixels ``[B, 3, H, W]`` -> (tokens ``[B, m, D]``, hidden ``[B, n+m, dim]``, target latents, aux loss).

        ``latents`` (normalised, ``[B, latent_channels, grid, grid]``: what ``latent_space.encode`` returns, e.g.
        ``latent_space.normalize`` of a latent cache's entries) replaces the pixels: the latent space's encoder
        (the frozen VAE) is not run; they are the target latents returned."""
        if latents is None:
            latents = self.latent_space.encode(pixel_values)              # [B, C, h, w]
        patches = patchify(latents, self.config.patch_size)               # [B, n, p*p*C]
        suffix, hidden = self.encoder(patches)                            # [B, m, dim], [B, n+m, dim]
        tokens, aux = self.bottleneck(suffix, sample=sample)              # [B, m, D]
        return tokens, hidden, latents, aux

    def forward_decoder(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Tokens ``[B, L, D]`` + lengths ``[B]`` -> predicted latents ``[B, C, h, w]`` (the decoder runs on the
        batch's longest kept prefix only)."""
        patches = self.decoder(tokens, lengths)                           # [B, n, p*p*C]
        grid = self.config.latent_grid_size // self.config.patch_size
        return unpatchify(patches, self.config.patch_size, self.config.latent_channels, grid)

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor, num_tokens=None) -> AdaTokEncoding:
        """Encode images into variable-length tokens.

        Args:
            pixel_values: float ``[B, 3, H, W]`` in [0, 1].
            num_tokens: ``None`` (all ``m``), an int, a LongTensor ``[B]``, or a mode:
                ``"auto"`` (the policy's most probable length: one encoder pass, no decoder call),
                ``"sample"`` (a draw from the policy), ``"search"`` (the binary-search baseline:
                smallest grid length with MSE <= ``config.search_threshold``), ``"oracle"`` (decode
                every grid length, keep the best reward; evaluation only), ``{"max_mse": x}`` (the
                fewest tokens predicted to reach MSE x) or ``{"mean_budget": n}`` (n tokens per
                image on average, spent where the predicted gain is largest). Whatever the length,
                the tokens are the same prefix.
        Returns:
            :class:`AdaTokEncoding` with ``tokens [B, max(lengths), D]`` (zero past each length),
            ``lengths [B]`` and, for FSQ, ``codes``.
        """
        check_pixel_values(pixel_values, self.config.image_size, self.config.num_channels)
        x = pixel_values.to(self.device, self.dtype)
        if isinstance(num_tokens, (str, dict)):
            self._check_mode(num_tokens)
            tokens, hidden, _, _ = self.forward_encoder(x)
            lengths = self._choose_lengths(num_tokens, x, tokens, hidden)
        else:
            lengths = resolve_num_tokens(num_tokens, x.shape[0], self.num_latent_tokens, self.device)
            tokens, _, _, _ = self.forward_encoder(x)
        return self._package(tokens, lengths)

    def _check_mode(self, mode) -> None:
        if isinstance(mode, dict):
            if len(mode) != 1 or next(iter(mode)) not in ("max_mse", "mean_budget"):
                raise ValueError(f"num_tokens as a dict must be {{'max_mse': x}} or {{'mean_budget': n}}, got {mode!r}")
            key, value = next(iter(mode.items()))
            check_positive_number(value, f"num_tokens[{key!r}]")
        elif mode not in LENGTH_MODES:
            raise ValueError(f"num_tokens must be an int, a LongTensor [B], one of {LENGTH_MODES} or a dial dict, "
                             f"got {mode!r}")
        needs_policy = isinstance(mode, dict) or mode in ("auto", "sample")
        if needs_policy and not self.has_policy:
            raise ValueError(f"num_tokens={mode!r} needs the length policy, which this AdaTok does not have yet "
                             "(train one with adatok_vlm.training.train_policy); pass an int or a LongTensor [B]")

    def _choose_lengths(self, mode, x: torch.Tensor, tokens: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Lengths ``[B]`` for a mode: the policy (one pass, no decoder), search, oracle or the dial."""
        b = x.shape[0]
        if mode in ("search", "oracle"):
            def error_fn(lengths: torch.Tensor) -> torch.Tensor:
                return self._errors_at_lengths(x, lengths, tokens)[:, 0]

            grid = self.length_grid.to(x.device)
            if mode == "search":
                return binary_search_lengths(error_fn, grid, self.config.search_threshold, b)
            spec = self.reward_spec()
            return oracle_lengths(error_fn, grid, lambda rl, length: spec(rl, length, self.num_latent_tokens), b)[0]
        features = self.policy_features(hidden, x)
        if mode == "auto":
            return self.policy.mode(features)
        if mode == "sample":
            return self.policy.sample(features)[0]
        if "max_mse" in mode:
            # the calibrated margin (stage 2 on a reward table): predicted curves are scaled up by exp(margin)
            scale = math.exp(float(self.config.quality_margin))
            return self.quality_head.min_length_for_quality(features, float(mode["max_mse"]) / scale)
        budget = float(mode["mean_budget"])  # finite and > 0: checked by _check_mode
        grid = self.quality_head.grid
        if not float(grid[0]) <= budget <= float(grid[-1]):
            raise ValueError(f"num_tokens={{'mean_budget': {budget}}} must lie in [{int(grid[0])}, {int(grid[-1])}]")
        return allocate_budget(self.quality_head.predict_curve(features), grid, budget).to(x.device)

    def _package(self, tokens: torch.Tensor, lengths: torch.Tensor) -> AdaTokEncoding:
        longest = int(lengths.max())
        valid = token_mask(lengths, longest)
        tokens = tokens[:, :longest].masked_fill(~valid[..., None], 0.0)
        codes = None
        if self.is_fsq:
            codes = self.bottleneck.codes(tokens).masked_fill(~valid, -1)
        return AdaTokEncoding(tokens=tokens, lengths=lengths, codes=codes)

    def decode(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruct images ``[B, 3, H, W]`` in [0, 1] from tokens ``[B, L, D]`` and ``lengths [B]``.

        ``lengths=None`` means every sample uses all ``L`` tokens. Values past a sample's length are
        ignored entirely.
        """
        check_tokens(tokens, self.config.token_dim, self.num_latent_tokens)
        b, length, _ = tokens.shape
        if lengths is None:
            lengths = torch.full((b,), length, dtype=torch.long, device=tokens.device)
        lengths = check_lengths(lengths, b, length).to(tokens.device)
        if not torch.isfinite(tokens.masked_fill(~token_mask(lengths, length)[..., None], 0.0)).all():
            raise ValueError("tokens contains NaN or infinite values at valid (unpadded) positions")
        latents = self.forward_decoder(tokens.to(self.dtype), lengths)
        images = self.latent_space.decode(latents)
        # clamp() keeps NaN: finite but huge tokens (e.g. 1e38) overflow inside the decoder.
        if not torch.isfinite(images).all():
            raise ValueError(f"tokens: decoding gave non-finite pixels; the valid tokens hold values up to "
                             f"{float(tokens.masked_fill(~token_mask(lengths, length)[..., None], 0).abs().max()):.3g} "
                             "in magnitude, far outside what this tokenizer produces")
        return images.clamp(0.0, 1.0)

    def decode_codes(self, codes: torch.LongTensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """FSQ only: reconstruct images from integer codes ``[B, L]`` (``-1`` padding allowed)."""
        if not self.is_fsq:
            raise ValueError("decode_codes needs an FSQ AdaTok (config.bottleneck='fsq')")
        if not isinstance(codes, torch.Tensor) or codes.dim() != 2:
            raise ValueError(f"codes must be an integer tensor [B, L], got {getattr(codes, 'shape', type(codes))}")
        if lengths is None:
            lengths = torch.full((codes.shape[0],), codes.shape[1], dtype=torch.long, device=codes.device)
        lengths = check_lengths(lengths, codes.shape[0], codes.shape[1])
        valid = token_mask(lengths, codes.shape[1])
        tokens = self.bottleneck.codes_to_tokens(codes.masked_fill(~valid, 0))
        return self.decode(tokens, lengths)

    @torch.no_grad()
    def errors_at_lengths(self, pixel_values: torch.Tensor, lengths,
                          tokens: torch.Tensor | None = None) -> torch.Tensor:
        """The one "error at every length": per-image pixel MSE ``[B, K]`` of ``pixel_values`` reconstructed
        from each column of ``lengths`` (the reconstruction loss ``rl`` of the rewards, eq. 6/7; rMSE, Sec. 5.3).

        Everything that measures an AdaTok at several lengths goes through here: ``encode``'s ``"search"``
        and ``"oracle"`` modes, :meth:`reconstruction_error`, and every rMSE curve, reward table or ablation
        measured from outside, so they cannot drift apart.

        Args:
            pixel_values: float ``[B, 3, H, W]`` in [0, 1]; the error is measured against them as given (in
                their own dtype, cast to float32), on this model's device.
            lengths: K ints (column k: every image at ``lengths[k]``), a LongTensor ``[B]`` (one length per
                image; K = 1) or ``[B, K]``.
            tokens: the images' tokens ``[B, L, D]`` (L at least the longest length) when the caller has them
                already (``forward_encoder``, ``encode``); else the images are encoded here. Either way the
                encoder runs at most once and the decoder once per column (the prefixes nest).
        Returns:
            float32 ``[B, K]`` on this model's device.
        """
        check_pixel_values(pixel_values, self.config.image_size, self.config.num_channels)
        return self._errors_at_lengths(pixel_values.to(self.device), lengths, tokens)

    def _errors_at_lengths(self, x: torch.Tensor, lengths, tokens: torch.Tensor | None) -> torch.Tensor:
        """:meth:`errors_at_lengths` for images ``x`` already checked and on this device (search's probes)."""
        b = x.shape[0]
        if isinstance(lengths, torch.Tensor):
            if lengths.is_floating_point() or lengths.dtype == torch.bool or lengths.dim() not in (1, 2) \
                    or lengths.shape[0] != b:
                raise ValueError(f"lengths: expected an integer tensor [{b}] or [{b}, K], got {lengths.dtype} "
                                 f"{tuple(lengths.shape)}")
            columns = (lengths[:, None] if lengths.dim() == 1 else lengths).to(self.device, torch.long).unbind(1)
        else:
            columns = [torch.full((b,), int(length), dtype=torch.long, device=self.device) for length in lengths]
        if not columns:
            raise ValueError("lengths: expected at least one length")
        if tokens is None:
            tokens = self.encode(x).tokens                                 # all m tokens, once
        return torch.stack([pixel_mse(self.decode(tokens[:, : int(lens.max())], lens), x) for lens in columns], 1)

    @torch.no_grad()
    def reconstruction_error(self, pixel_values: torch.Tensor, num_tokens=None) -> torch.Tensor:
        """Per-image pixel MSE ``[B]`` (images in [0, 1]) of the reconstruction from ``num_tokens``
        (any length or mode of :meth:`encode`; measured as :meth:`errors_at_lengths` measures)."""
        enc = self.encode(pixel_values, num_tokens)
        # encode() checked the pixels
        return self._errors_at_lengths(pixel_values.to(self.device), enc.lengths, enc.tokens)[:, 0]

    def forward(self, pixel_values: torch.Tensor | None = None, num_tokens=None, return_reconstruction: bool = True,
                generator: torch.Generator | None = None, return_dict: bool = True,
                latents: torch.Tensor | None = None) -> AdaTokOutput:
        """Nested Tail Masking forward (paper Sec. 4.1).

        In training mode each sample keeps its own random prefix (``config.ntm_*``) unless
        ``num_tokens`` is given; in eval mode all ``m`` tokens are kept by default. The loss is the
        mean squared error in the latent space (plus the KL term of a ``"kl"`` regulariser).

        Give exactly one input: ``pixel_values`` (float ``[B, 3, H, W]`` in [0, 1]), or ``latents`` (the
        normalised latents ``latent_space.encode`` would give, ``[B, latent_channels, grid, grid]``: a latent
        cache's, so the frozen VAE encoder never runs). The loss computed here lives in the latent space
        only, so it never needs the pixels; the pixel-space terms of eq. 5 (LPIPS, GAN, pixel L2) are the
        caller's, computed from ``reconstruction`` against the caller's own pixels. Both at once is a
        ``ValueError`` (one of them would be ignored).
        """
        if (pixel_values is None) == (latents is None):
            raise ValueError("forward() takes exactly one of pixel_values (images [B, 3, H, W] in [0, 1]) and latents "
                             "(normalised latents [B, C, h, w], e.g. from a latent cache), got "
                             + ("both" if latents is not None else "neither"))
        if latents is not None:
            check_latents(latents, self.config.latent_channels, self.config.latent_grid_size)
            source = latents
        else:
            check_pixel_values(pixel_values, self.config.image_size, self.config.num_channels)
            source = pixel_values
        if isinstance(num_tokens, str):
            raise ValueError(f"forward() takes num_tokens as None, an int or a LongTensor [B], got {num_tokens!r}")
        b = source.shape[0]
        if num_tokens is None and self.training:
            lengths = self.sample_ntm_lengths(b, source.device, generator)
        else:
            lengths = resolve_num_tokens(num_tokens, b, self.num_latent_tokens, source.device)
        given = source.to(self.dtype)
        tokens, _, target, aux = (self.forward_encoder(latents=given, sample=self.training) if latents is not None
                                  else self.forward_encoder(given, sample=self.training))
        predicted = self.forward_decoder(tokens, lengths)                 # [B, C, h, w]
        recon_loss = F.mse_loss(predicted.float(), target.float())
        loss = recon_loss + self.config.kl_weight * aux
        reconstruction = self.latent_space.decode(predicted) if return_reconstruction else None
        out = AdaTokOutput(loss=loss, recon_loss=recon_loss, kl_loss=aux, reconstruction=reconstruction,
                           latents=predicted, target_latents=target, lengths=lengths, tokens=tokens)
        return out if return_dict else out.to_tuple()

    def last_layer_weight(self) -> torch.Tensor:
        """The decoder's output projection, for the adaptive GAN weight (gradient-norm ratio)."""
        return self.decoder.to_patches.weight
