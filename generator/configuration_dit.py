"""Configuration of the class-conditional DiT over variable-length AdaTok tokens, and its presets.

The generator of the paper's Appendix B ("we selected the classic DiT as the generator"): a DiT
(Peebles & Xie, 2023) that denoises a sequence of ``L <= m`` continuous 1D tokens, conditioned on the
class and on the token count ``L``, trained with flow matching (see ``flow_matching.py``). Besides the
architecture, the config carries what generation needs from the training data: the per-class length
histograms (``L`` is drawn from them when the caller does not choose it) and the per-channel token
statistics (the model works on normalised tokens and ``generate`` de-normalises).
"""

from __future__ import annotations

import copy
import math
from typing import Any

from transformers import PretrainedConfig

from ..tokenizer.loading import check_config_source
from ..tokenizer.validation import check_size_bounds, estimate_dit_parameters

POS_EMBEDS = ("learned", "sinusoidal")


class AdaTokDiTConfig(PretrainedConfig):
    r"""
    Configuration of [`AdaTokDiT`].

    Args:
        token_dim (`int`): ``D``, channels of each AdaTok token (the tokenizer's ``token_dim``).
        max_tokens (`int`): ``m``, the longest sequence the model generates (the tokenizer's
            ``num_latent_tokens``, or less).
        num_classes (`int`): number of classes. Class id ``num_classes`` is the null (unconditional)
            class used by classifier-free guidance.
        hidden_size / depth / num_heads / mlp_ratio: the transformer (see ``DIT_PRESETS``).
        class_dropout_prob (`float`): probability with which training replaces a label by the null
            class (classifier-free guidance); read by the trainer and passed to
            ``flow_matching_loss``.
        learn_sigma (`bool`): DiT's learned DDPM variance. It has no meaning for flow matching (the
            model predicts a velocity), so it must stay ``False``; the field exists so DiT-style
            configs read without surprises.
        pos_embed (`str`): ``"learned"`` (a parameter ``[m, hidden]`` initialised with the sin-cos
            table) or ``"sinusoidal"`` (fixed 1D sin-cos, computed on the fly).
        length_histograms (`list[list[int]]`, *optional*): ``[num_classes][max_tokens]`` counts of
            the training token lengths per class (entry ``L - 1`` counts length ``L``); build it with
            ``LengthSampler.from_lengths(...).to_list()``. ``generate(num_tokens=None)`` samples from it.
        token_mean / token_std (`list[float]`, *optional*): per-channel statistics (``D`` floats each)
            of the valid training tokens. The model is trained on ``(tokens - mean) / std`` and
            ``generate`` returns de-normalised tokens. ``None`` means no normalisation.
        initializer_range (`float`): std of the class-embedding and timestep-MLP init (DiT: 0.02).
    """

    model_type = "adatok_dit"

    token_dim: int = 16
    max_tokens: int = 32
    num_classes: int = 10
    hidden_size: int = 64
    depth: int = 2
    num_heads: int = 4
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    learn_sigma: bool = False
    pos_embed: str = "learned"
    length_histograms: list | None = None
    token_mean: list | None = None
    token_std: list | None = None
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        if self.length_histograms is not None:
            self.length_histograms = [[_plain_number(v) for v in row] for row in self.length_histograms]
        if self.token_mean is not None:
            self.token_mean = [float(v) for v in self.token_mean]
        if self.token_std is not None:
            self.token_std = [float(v) for v in self.token_std]
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
        """No-op: the class lives in the installed package (see ``AdaTokDiTPreTrainedModel.register_for_auto_class``)."""

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        for name in ("token_dim", "max_tokens", "num_classes", "hidden_size", "depth", "num_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"AdaTokDiTConfig.{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"AdaTokDiTConfig.hidden_size={self.hidden_size} is not divisible by "
                             f"num_heads={self.num_heads}")
        if self.hidden_size % 2:
            raise ValueError(f"AdaTokDiTConfig.hidden_size must be even (sin-cos embeddings), got {self.hidden_size}")
        if not isinstance(self.mlp_ratio, (int, float)) or isinstance(self.mlp_ratio, bool) or not self.mlp_ratio > 0:
            raise ValueError(f"AdaTokDiTConfig.mlp_ratio must be a positive number, got {self.mlp_ratio!r}")
        if not isinstance(self.class_dropout_prob, (int, float)) or not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(f"AdaTokDiTConfig.class_dropout_prob must lie in [0, 1), got {self.class_dropout_prob!r}")
        if self.learn_sigma:
            raise ValueError("AdaTokDiTConfig.learn_sigma=True is DiT's learned DDPM variance; this flow-matching "
                             "DiT predicts a velocity and has no variance to learn. Set learn_sigma=False")
        if self.pos_embed not in POS_EMBEDS:
            raise ValueError(f"AdaTokDiTConfig.pos_embed must be one of {POS_EMBEDS}, got {self.pos_embed!r}")
        if not isinstance(self.initializer_range, (int, float)) or not self.initializer_range > 0:
            raise ValueError(f"AdaTokDiTConfig.initializer_range must be > 0, got {self.initializer_range!r}")
        if self.length_histograms is not None:
            validate_histograms(self.length_histograms, self.num_classes, self.max_tokens,
                                name="AdaTokDiTConfig.length_histograms")
        for name in ("token_mean", "token_std"):
            stats = getattr(self, name)
            if stats is None:
                continue
            if len(stats) != self.token_dim or not all(math.isfinite(v) for v in stats):
                raise ValueError(f"AdaTokDiTConfig.{name} must be a list of {self.token_dim} finite floats "
                                 f"(one per token channel), got {len(stats)} values")
        if (self.token_mean is None) != (self.token_std is None):
            raise ValueError("AdaTokDiTConfig.token_mean and token_std must be set together (or both None)")
        if self.token_std is not None and any(v <= 0 for v in self.token_std):
            raise ValueError(f"AdaTokDiTConfig.token_std must be positive, got min {min(self.token_std)}")
        check_size_bounds("AdaTokDiTConfig", self, {"max_tokens": self.max_tokens},
                          ("hidden_size", "depth", "mlp_ratio", "num_classes", "max_tokens"), estimate_dit_parameters(self))

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "AdaTokDiTConfig":
        """Build the config of a named size (``dit-tiny``, ``dit-s``, ``dit-b``, ``dit-l``, ``dit-xl``).

        The data-dependent fields come as overrides, e.g.
        ``from_preset("dit-b", token_dim=16, max_tokens=256, num_classes=1000)``.
        """
        if name not in DIT_PRESETS:
            raise ValueError(f"unknown DiT preset {name!r}; choose one of {sorted(DIT_PRESETS)}")
        values = copy.deepcopy(DIT_PRESETS[name])
        values.update(overrides)
        return cls(**values)


def class_names_from_config(config) -> list[str] | None:
    """Names from ``config.id2label`` when it names every class (not transformers' ``LABEL_i`` default)."""
    id2label = getattr(config, "id2label", None) or {}
    names = [id2label.get(i, id2label.get(str(i))) for i in range(config.num_classes)]
    if any(n is None for n in names) or all(n == f"LABEL_{i}" for i, n in enumerate(names)):
        return None
    return [str(n) for n in names]


def _plain_number(value):
    """Histogram counts as plain ints when integral (JSON-friendly), else floats."""
    value = float(value)
    return int(value) if value.is_integer() else value


def validate_histograms(histograms, num_classes: int, max_tokens: int, name: str = "histograms") -> None:
    """``histograms`` must be ``num_classes`` rows of ``max_tokens`` finite, non-negative counts."""
    if len(histograms) != num_classes or any(len(row) != max_tokens for row in histograms):
        shape = (len(histograms), sorted({len(row) for row in histograms}))
        raise ValueError(f"{name} must be num_classes={num_classes} rows of max_tokens={max_tokens} counts, "
                         f"got {shape[0]} rows of lengths {shape[1]}")
    total = 0.0
    for row in histograms:
        for v in row:
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must hold finite, non-negative counts, got {v!r}")
            total += v
    if total <= 0:
        raise ValueError(f"{name} is all zeros: no length to sample")


# Named sizes (DiT paper Table 1). One dict per size; YAML configs name a preset and override fields.
DIT_PRESETS: dict[str, dict] = {
    "dit-tiny": dict(hidden_size=64, depth=2, num_heads=4),      # CPU tests and demos
    "dit-s": dict(hidden_size=384, depth=12, num_heads=6),
    "dit-b": dict(hidden_size=768, depth=12, num_heads=12),
    "dit-l": dict(hidden_size=1024, depth=24, num_heads=16),
    "dit-xl": dict(hidden_size=1152, depth=28, num_heads=16),
}
