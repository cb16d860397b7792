"""Configuration of the AdaTok tokenizer, and its named presets.

AdaTok (adaptive visual representation with quality-preserving dynamic tokens) encodes an image into
``m`` one-dimensional tokens whose every prefix reconstructs it (Nested Tail Masking, paper Sec. 4.1).
This file holds the one typed config users load (``AdaTokConfig``) and the presets that both the
YAML files in ``configs/tokenizer/`` and the command line refer to by name.
"""

from __future__ import annotations

import math

import copy
from dataclasses import field
from typing import Any

from transformers import PretrainedConfig

from .latent_space import VAE_AUTOCAST_DTYPES
from .loading import check_config_source
from .validation import check_size_bounds, estimate_adatok_parameters

LATENT_SPACES = ("pixel", "vae")
BOTTLENECKS = ("continuous", "fsq")
TOKEN_REGULARIZERS = ("none", "layernorm", "kl")
NTM_DISTRIBUTIONS = ("uniform", "log_uniform")


class AdaTokConfig(PretrainedConfig):
    r"""
    Configuration of [`AdaTokModel`].

    Args:
        image_size (`int`): side of the square input images, in pixels.
        num_channels (`int`): image channels (3: RGB).
        latent_space (`str`): ``"pixel"`` (identity on pixels scaled to [-1, 1], for small images and
            CPU work) or ``"vae"`` (a frozen ``diffusers.AutoencoderKL``).
        vae_path (`str`, *optional*): local folder or Hugging Face repo id (read from the local cache
            only) of the VAE weights, read on first use unless a checkpoint already carried them.
        vae_random_init (`bool`): use the randomly initialised VAE built from ``vae_config`` on
            purpose (tests only); otherwise a VAE space without weights is an error.
        vae_config (`dict`, *optional*): the ``AutoencoderKL`` architecture; lets the model be built
            (and its size counted) without the VAE's weights.
        vae_scaling_factor / vae_shift_factor (`float`, *optional*): latent normalisation
            ``(z - shift) * scale``; default to the values in ``vae_config``.
        vae_latent_mean / vae_latent_std (`list[float]`, *optional*): per-channel latent normalisation
            ``(z - mean_c) / std_c`` (VA-VAE, LightningDiT), one value per latent channel; it replaces the
            scalar pair. ``None`` takes them from ``vae_config``'s ``latents_mean`` / ``latents_std``, else
            from the ``config.json`` at ``vae_path`` (where ``adatok latent-stats`` writes them) when the
            VAE weights are read, unless a scalar factor is set; they are then saved in the model's buffers.
        vae_autocast (`str`, *optional*): run the frozen VAE alone under ``torch.autocast`` with this dtype
            (``"bfloat16"`` or ``"float16"``) even when the caller does not; ``None`` (the default) runs it in
            its own dtype. bf16 on a CPU with AMX made the VA-VAE encoder 2.5-3x faster
            (``benchmarks/results/throughput.md``); the latents then differ from fp32 ones by bf16 rounding.
        patch_size (`int`): patch side in the latent grid.
        hidden_size / num_encoder_layers / num_attention_heads: the ViT encoder.
        decoder_hidden_size / num_decoder_layers / decoder_num_attention_heads: the ViT decoder
            (``None`` copies the encoder's value).
        mlp_ratio (`float`), qk_norm (`bool`): transformer block options.
        num_latent_tokens (`int`): ``m``, the number of learnable suffix tokens (maximum length).
        token_dim (`int`): ``D``, channels of each token. For FSQ it equals ``len(fsq_levels)``.
        bottleneck (`str`): ``"continuous"`` (default, no quantisation) or ``"fsq"``.
        token_regularizer (`str`): continuous tokens only: ``"none"``, ``"layernorm"`` (parameter-free
            normalisation of each token) or ``"kl"`` (a diagonal Gaussian posterior; the mean is the
            token at inference and ``kl_weight`` weighs the KL term in training).
        token_noise_std (`float`): continuous tokens only: std of Gaussian noise added to the tokens
            in training (a per-token capacity limit that makes later tokens carry detail).
        fsq_levels (`list[int]`): levels per channel of the FSQ quantiser.
        ntm_min_tokens / ntm_max_tokens (`int`): the range ``[a, b]`` from which every training sample
            draws the length of the prefix it keeps (paper eq. 4); ``ntm_max_tokens=None`` means ``m``.
        ntm_distribution (`str`): ``"uniform"`` over ``[a, b]`` (the paper) or ``"log_uniform"``
            (uniform in log-length: more short prefixes, a stronger coarse-to-fine pressure).
        ntm_full_prob (`float`): probability that a training sample keeps all ``ntm_max_tokens``
            tokens instead of a drawn prefix. Uniform prefixes alone pack what a small model learns
            into the first few tokens (a flat rMSE curve past them); sending some samples through at
            full length spreads detail over the later tokens.
        initializer_range (`float`): std of the truncated-normal init.
        policy_enabled (`bool`): the model carries the Adaptive Token Allocation policy (set by
            stage-2 training; enables ``num_tokens="auto"`` and the quality/budget dial).
        policy_min_tokens / policy_max_tokens / policy_step (`int`): the policy's length grid
            ``[L_min, L_min + step, ..., L_max]`` (``policy_max_tokens=None`` means ``m``).
        policy_hidden_size / policy_num_layers (`int`): the policy MLP.
        policy_dropout (`float`): dropout inside the policy and quality-head MLPs while stage 2
            trains (they see a few thousand images' features; dropout keeps them from memorising).
        policy_image_statistics (`bool`): append ``policy.image_statistics(pixels)`` (9 log measures of
            detail: std, gradients, Laplacian) to the policy's pooled encoder features. The pooled
            features also say *which* photo an image is, which a policy trained on a few photos
            memorises; these say how much detail it has, the same way for every photo.
        policy_token_features (`bool`): append the ``m`` bottleneck tokens themselves (flattened, ``m *
            token_dim`` values: what the decoder reads, in prefix order) to the policy's features, so the
            policy sees how much each next token adds instead of a mean over all of them. Still one
            encoder pass: the tokens are the encoder's output (the bottleneck in eval mode is
            deterministic).
        reward_kind (`str`): ``"continuous"`` (eq. 6) or ``"structured"`` (eq. 7), used by stage 2
            and by ``num_tokens="oracle"``; reward_alpha / reward_beta / reward_gamma /
            reward_rl_base are the paper's alpha, beta, gamma and rl_base.
        search_threshold (`float`): MSE a ``num_tokens="search"`` binary search must reach.
        quality_margin (`float`): log-space margin the quality dial (``num_tokens={"max_mse": x}``) adds
            to its predicted curves: stage 2 sets it on held-out images so that the promise ``MSE <= x``
            is kept for a chosen fraction of images (``train.dial_confidence``); 0 trusts the raw prediction.
    """

    model_type = "adatok"

    image_size: int = 32
    num_channels: int = 3
    latent_space: str = "pixel"
    vae_path: str | None = None
    vae_config: dict | None = None
    vae_random_init: bool = False
    vae_scaling_factor: float | None = None
    vae_shift_factor: float | None = None
    vae_latent_mean: list[float] | None = None
    vae_latent_std: list[float] | None = None
    vae_autocast: str | None = None
    patch_size: int = 4
    hidden_size: int = 128
    num_encoder_layers: int = 4
    num_attention_heads: int = 4
    decoder_hidden_size: int | None = None
    num_decoder_layers: int = 4
    decoder_num_attention_heads: int | None = None
    mlp_ratio: float = 4.0
    qk_norm: bool = False
    num_latent_tokens: int = 32
    token_dim: int = 16
    bottleneck: str = "continuous"
    token_regularizer: str = "none"
    kl_weight: float = 0.0
    token_noise_std: float = 0.0
    fsq_levels: list[int] = field(default_factory=lambda: [8, 8, 8, 5, 5, 5])
    ntm_min_tokens: int = 1
    ntm_max_tokens: int | None = None
    ntm_distribution: str = "uniform"
    ntm_full_prob: float = 0.0
    initializer_range: float = 0.02
    policy_enabled: bool = False
    policy_min_tokens: int = 1
    policy_max_tokens: int | None = None
    policy_step: int = 1
    policy_hidden_size: int = 256
    policy_num_layers: int = 2
    policy_dropout: float = 0.0
    policy_image_statistics: bool = False
    policy_token_features: bool = False
    reward_kind: str = "continuous"
    reward_alpha: float = 20.0
    reward_beta: float = 0.2
    reward_gamma: float = 10.0
    reward_rl_base: float = 0.02
    search_threshold: float = 0.02
    quality_margin: float = 0.0

    def __post_init__(self, **kwargs):
        if self.decoder_hidden_size is None:
            self.decoder_hidden_size = self.hidden_size
        if self.decoder_num_attention_heads is None:
            self.decoder_num_attention_heads = self.num_attention_heads
        if self.ntm_max_tokens is None:
            self.ntm_max_tokens = self.num_latent_tokens
        if self.policy_max_tokens is None:
            self.policy_max_tokens = self.num_latent_tokens
        self.fsq_levels = [int(v) for v in self.fsq_levels]
        if self.latent_space == "vae" and self.vae_config is None:
            self.vae_config = copy.deepcopy(VAE_ARCHITECTURES["va-vae-f16d32"])
        super().__post_init__(**kwargs)
        self._validate()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Like ``PretrainedConfig.from_pretrained``, but a ``config.json`` of another ``model_type`` is a
        ``ValueError`` (transformers only warns and builds a default config). A missing path or
        ``config.json``, or one that is not a JSON object, is named first, without any network call
        (``loading.check_config_source``; nothing downloads unless ``local_files_only=False``)."""
        check_config_source(cls, pretrained_model_name_or_path, kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoConfig"):
        """No-op: the class lives in the installed package (see ``AdaTokPreTrainedModel.register_for_auto_class``)."""

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"AdaTokConfig.{name} must be a positive int, got {value!r}")

        for name in ("image_size", "num_channels", "patch_size", "hidden_size", "num_encoder_layers",
                     "num_attention_heads", "decoder_hidden_size", "num_decoder_layers",
                     "decoder_num_attention_heads", "num_latent_tokens", "token_dim"):
            positive(name)
        if self.latent_space not in LATENT_SPACES:
            raise ValueError(f"AdaTokConfig.latent_space must be one of {LATENT_SPACES}, got {self.latent_space!r}")
        if self.vae_autocast is not None and self.vae_autocast not in VAE_AUTOCAST_DTYPES:
            raise ValueError(f"AdaTokConfig.vae_autocast must be None or one of {VAE_AUTOCAST_DTYPES}, got "
                             f"{self.vae_autocast!r}")
        if self.bottleneck not in BOTTLENECKS:
            raise ValueError(f"AdaTokConfig.bottleneck must be one of {BOTTLENECKS}, got {self.bottleneck!r}")
        if self.token_regularizer not in TOKEN_REGULARIZERS:
            raise ValueError(
                f"AdaTokConfig.token_regularizer must be one of {TOKEN_REGULARIZERS}, got {self.token_regularizer!r}"
            )
        if not 0.0 <= self.ntm_full_prob <= 1.0:
            raise ValueError(f"AdaTokConfig.ntm_full_prob must lie in [0, 1], got {self.ntm_full_prob!r}")
        if not self.token_noise_std >= 0:
            raise ValueError(f"AdaTokConfig.token_noise_std must be >= 0, got {self.token_noise_std!r}")
        if self.ntm_distribution not in NTM_DISTRIBUTIONS:
            raise ValueError(
                f"AdaTokConfig.ntm_distribution must be one of {NTM_DISTRIBUTIONS}, got {self.ntm_distribution!r}"
            )
        for dim_name, heads_name in (("hidden_size", "num_attention_heads"),
                                     ("decoder_hidden_size", "decoder_num_attention_heads")):
            dim, heads = getattr(self, dim_name), getattr(self, heads_name)
            if dim % heads:
                raise ValueError(f"AdaTokConfig.{dim_name}={dim} is not divisible by {heads_name}={heads}")
        if self.bottleneck == "fsq":
            if not self.fsq_levels or any(level < 2 for level in self.fsq_levels):
                raise ValueError(f"AdaTokConfig.fsq_levels must be a list of ints >= 2, got {self.fsq_levels!r}")
            if self.token_dim != len(self.fsq_levels):
                raise ValueError(
                    f"AdaTokConfig.token_dim must equal len(fsq_levels)={len(self.fsq_levels)} for FSQ, "
                    f"got {self.token_dim}"
                )
            if self.token_regularizer != "none":
                raise ValueError("AdaTokConfig.token_regularizer applies to continuous tokens only; use 'none' with FSQ")
        if not 1 <= self.ntm_min_tokens <= self.ntm_max_tokens <= self.num_latent_tokens:
            raise ValueError(
                "AdaTokConfig needs 1 <= ntm_min_tokens <= ntm_max_tokens <= num_latent_tokens, got "
                f"{self.ntm_min_tokens}, {self.ntm_max_tokens}, {self.num_latent_tokens}"
            )
        if not 1 <= self.policy_min_tokens <= self.policy_max_tokens <= self.num_latent_tokens or self.policy_step < 1:
            raise ValueError(
                "AdaTokConfig needs 1 <= policy_min_tokens <= policy_max_tokens <= num_latent_tokens and "
                f"policy_step >= 1, got {self.policy_min_tokens}, {self.policy_max_tokens}, {self.policy_step}"
            )
        if not math.isfinite(float(self.quality_margin)):
            raise ValueError(f"AdaTokConfig.quality_margin must be finite, got {self.quality_margin}")
        for name in ("policy_image_statistics", "policy_token_features"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"AdaTokConfig.{name} must be a bool, got {type(getattr(self, name)).__name__}")
        if not 0.0 <= float(self.policy_dropout) < 1.0:
            raise ValueError(f"AdaTokConfig.policy_dropout must be in [0, 1), got {self.policy_dropout}")
        if self.reward_kind not in ("continuous", "structured"):
            raise ValueError(f"AdaTokConfig.reward_kind must be 'continuous' or 'structured', got {self.reward_kind!r}")
        if self.latent_grid_size % self.patch_size:
            raise ValueError(
                f"AdaTokConfig: the latent grid side {self.latent_grid_size} (image_size {self.image_size} / "
                f"downsampling {self.latent_downsample}) is not divisible by patch_size {self.patch_size}"
            )
        if self.image_size % self.latent_downsample:
            raise ValueError(
                f"AdaTokConfig.image_size {self.image_size} is not divisible by the VAE's downsampling "
                f"factor {self.latent_downsample}"
            )
        check_size_bounds(
            "AdaTokConfig", self,
            {"num_latent_tokens": self.num_latent_tokens, "num_patches (from image_size / patch_size)": self.num_patches},
            ("hidden_size", "num_encoder_layers", "decoder_hidden_size", "num_decoder_layers", "mlp_ratio",
             "num_latent_tokens", "image_size", "patch_size"), estimate_adatok_parameters(self))

    # ------------------------------------------------------------------ derived sizes
    @property
    def latent_downsample(self) -> int:
        """Spatial downsampling of the latent space (1 for pixels, 2^(blocks-1) for a VAE)."""
        if self.latent_space == "pixel":
            return 1
        return 2 ** (len(self.vae_config["block_out_channels"]) - 1)

    @property
    def latent_channels(self) -> int:
        return self.num_channels if self.latent_space == "pixel" else int(self.vae_config["latent_channels"])

    @property
    def latent_grid_size(self) -> int:
        return self.image_size // self.latent_downsample

    @property
    def num_patches(self) -> int:
        """``n``: patches the encoder reads (and patch queries the decoder fills)."""
        return (self.latent_grid_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.latent_channels

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "AdaTokConfig":
        """Build the config of a named size (``adatok-tiny``, ``adatok-s``, ``adatok-b``, ``adatok-l``).

        Keyword overrides replace single fields, e.g. ``from_preset("adatok-tiny", num_latent_tokens=16)``.
        """
        if name not in ADATOK_PRESETS:
            raise ValueError(f"unknown AdaTok preset {name!r}; choose one of {sorted(ADATOK_PRESETS)}")
        values = copy.deepcopy(ADATOK_PRESETS[name])
        values.update(overrides)
        return cls(**values)


# ---------------------------------------------------------------------------------------------
# VAE architectures (diffusers ``AutoencoderKL`` configs), so a model can be built and its size
# counted before any VAE weights are on disk. ``va-vae-f16d32`` is the f16, 32-channel layout of
# VA-VAE (Yao et al., 2025) expressed as a diffusers AutoencoderKL; a converted checkpoint must
# match it (or pass its own ``vae_config``).
# ---------------------------------------------------------------------------------------------
VAE_ARCHITECTURES: dict[str, dict] = {
    "va-vae-f16d32": {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4 + ["AttnDownEncoderBlock2D"],
        "up_block_types": ["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [128, 128, 256, 256, 512],
        "layers_per_block": 2,
        "latent_channels": 32,
        "norm_num_groups": 32,
        "sample_size": 256,
        "scaling_factor": 1.0,
        "shift_factor": 0.0,
    },
    "sd-vae-f8c4": {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [128, 256, 512, 512],
        "layers_per_block": 2,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 256,
        "scaling_factor": 0.18215,
        "shift_factor": 0.0,
    },
}

# Named sizes. One dict per size; YAML configs name a preset and override fields, never copy it.
ADATOK_PRESETS: dict[str, dict] = {
    # 32x32 pixels, for CPU tests and the embedded demo (Fashion-MNIST). Patch 8 (16 patches) halves
    # the sequence of patch 4; measured on 2 CPU cores it runs 4.35 vs 2.0 steps/s (batch 64) and
    # reaches full-length rMSE 0.0165 vs 0.0257 on Fashion-MNIST in the same 4 minutes. With plain
    # uniform prefixes a model this small packs all it learns into ~4 tokens (rMSE 0.0141 at 4 vs
    # 0.0137 at 32 after 1500 steps); sending 75% of samples through at full length gives 0.0142 at
    # 4 vs 0.0125 at 32 (a better full length, more use of the later tokens).
    "adatok-tiny": dict(
        image_size=32, latent_space="pixel", patch_size=8,
        hidden_size=128, num_encoder_layers=4, num_attention_heads=4,
        decoder_hidden_size=128, num_decoder_layers=4, decoder_num_attention_heads=4,
        num_latent_tokens=32, token_dim=16, ntm_min_tokens=1, ntm_full_prob=0.75,
    ),
    # 32x32 RGB natural photos (`make demo`, training/natural_images.py): adatok-tiny's shape, which no
    # short measured variant beat (log-uniform prefixes, full-length share 0.25/0.5, token dim 4/8 all
    # stayed as flat and were no lower at 400-800 steps); its own name so the natural recipe can change
    # without touching the Fashion-MNIST one. Numbers: benchmarks/results/natural_recipe_search.md.
    "adatok-natural": dict(
        image_size=32, latent_space="pixel", patch_size=8,
        hidden_size=128, num_encoder_layers=4, num_attention_heads=4,
        decoder_hidden_size=128, num_decoder_layers=4, decoder_num_attention_heads=4,
        num_latent_tokens=32, token_dim=16, ntm_min_tokens=1, ntm_full_prob=0.75,
    ),
    # The paper's tokenizer: 256 tokens over the VA-VAE f16 latent grid at 256x256, ~83M trainable.
    "adatok-s": dict(
        image_size=256, latent_space="vae", vae_config=VAE_ARCHITECTURES["va-vae-f16d32"], patch_size=1,
        hidden_size=512, num_encoder_layers=13, num_attention_heads=8,
        decoder_hidden_size=512, num_decoder_layers=13, decoder_num_attention_heads=8,
        num_latent_tokens=256, token_dim=16, ntm_min_tokens=1,
    ),
    "adatok-b": dict(
        image_size=256, latent_space="vae", vae_config=VAE_ARCHITECTURES["va-vae-f16d32"], patch_size=1,
        hidden_size=768, num_encoder_layers=12, num_attention_heads=12,
        decoder_hidden_size=768, num_decoder_layers=12, decoder_num_attention_heads=12,
        num_latent_tokens=256, token_dim=16, ntm_min_tokens=1,
    ),
    "adatok-l": dict(
        image_size=256, latent_space="vae", vae_config=VAE_ARCHITECTURES["va-vae-f16d32"], patch_size=1,
        hidden_size=1024, num_encoder_layers=24, num_attention_heads=16,
        decoder_hidden_size=1024, num_decoder_layers=24, decoder_num_attention_heads=16,
        num_latent_tokens=256, token_dim=16, ntm_min_tokens=1,
    ),
}
