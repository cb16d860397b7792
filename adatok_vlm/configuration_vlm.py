"""Configuration of the AdaTok VLM: any Hugging Face causal LM plus AdaTok's variable-length image tokens.

The composite config holds two sub-configs, like transformers' own vision-language models:

* ``text_config``: the causal LM's config, of ANY registered model type (resolved through ``AutoConfig``
  from its ``model_type``), and
* ``tokenizer_config``: the (frozen) :class:`~adatok_vlm.tokenizer.AdaTokConfig`,

plus the settings of the image modality: the special tokens (``[BOI]`` opens an image, ``[IMG]`` marks
each image-token position, ``[EOI]`` closes it; their strings are configurable, their ids set by
``from_text_model``), the projector, the image-generation head and the loss weights. AdaTok's images are
variable-length (paper Sec. 4), so an autoregressive LM must learn *when to stop*: the LM itself emits
``[EOI]`` (paper, Limitations a). ``[EOI]`` plays the role the paper calls ``[EOS]``; it is kept distinct
from the LM's own end-of-text token because an image's end is not the sequence's end: after ``[EOI]`` the
LM goes on writing text (a caption, an answer, another image), while its end-of-text token stops ``generate``.
"""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .generator.flow_matching import TIME_DISTRIBUTIONS
from .tokenizer import AdaTokConfig

IMAGE_MODES = ("continuous", "discrete")
# Which way the flow head's time runs. "data_to_noise" is the generator's (t = 0 data, t = 1 noise) and the
# only one the head computes with; "noise_to_data" marks a folder saved before issue 18 (its config.json has
# no flow_time_convention), whose head weights AdaTokVLMForCausalLM.from_pretrained converts on load
# (FlowHead.adopt_noise_to_data_time_) before setting the field to "data_to_noise".
DATA_TO_NOISE, NOISE_TO_DATA = "data_to_noise", "noise_to_data"
FLOW_TIME_CONVENTIONS = (DATA_TO_NOISE, NOISE_TO_DATA)
BOI_TOKEN, IMG_TOKEN, EOI_TOKEN = "[BOI]", "[IMG]", "[EOI]"
# Written beside an exported VLM by train_vlm and read by the samplers: the prompt layout of training (templates,
# add_bos, class names and captions) plus the run's direction, steps and tokenizer, as one flat JSON object. Not
# the model card's record of every family (``tokenizer.model_card.TRAINING_INFO``, ``{"training", "metrics"}``,
# written by the training loop beside every exported model): sampling needs this file, a card only reads it.
VLM_TRAINING_INFO = "vlm_training.json"


def check_image_token_strings(strings: dict[str, str], where: str = "") -> None:
    """``{"boi_token": ..., "img_token": ..., "eoi_token": ...}`` must be three different non-empty strings."""
    for name, value in strings.items():
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{where}{name} must be a non-empty string, got {value!r}")
    if len(set(strings.values())) != len(strings):
        raise ValueError(f"{where}boi_token, img_token and eoi_token must be three different strings, got {strings}")


class AdaTokVLMConfig(PretrainedConfig):
    r"""
    Configuration of [`AdaTokVLMForCausalLM`].

    Args:
        text_config (`dict` or `PretrainedConfig`): the causal LM's config (any model type; a dict needs its
            ``model_type``). Defaults to a default ``LlamaConfig``.
        tokenizer_config (`dict` or `AdaTokConfig`): the AdaTok image tokenizer's config.
        image_mode (`str`): ``"continuous"`` (default): image tokens stay continuous; the LM's hidden state
            predicts the next one through a flow-matching head. ``"discrete"``: an FSQ AdaTok's integer
            codes are appended to the LM vocabulary at ``image_code_offset`` and trained with plain CE.
        projector_hidden_size (`int`, *optional*): width of the MLP that maps image tokens (``D``) into
            the LM's embedding space; ``None`` means the LM's hidden size.
        projector_hidden_act (`str`): activation of the projector (a ``transformers.activations`` name).
        flow_head_width (`int`, *optional*): width of the flow head's residual MLP (``None``: LM hidden size).
        flow_head_depth (`int`): number of adaLN residual blocks in the flow head.
        flow_head_mlp_ratio (`float`): hidden expansion inside each flow-head block.
        num_flow_steps (`int`): Euler steps when sampling an image token.
        flow_batch_mul (`int`): noise/time draws per image position in training (MAR's ``diffusion_batch_mul``).
        flow_time_sampling (`str`): ``"uniform"`` or ``"logit_normal"`` training times ``t``.
        flow_time_convention (`str`): ``"data_to_noise"`` (the generator's; always, for a new model) or
            ``"noise_to_data"``, set only when loading a config saved before the head adopted it (see
            ``FLOW_TIME_CONVENTIONS``).
        flow_temperature (`float`): default sampling temperature (scale of the initial noise).
        flow_cfg_scale (`float`): default classifier-free guidance scale (1.0: off).
        text_loss_weight / image_loss_weight / stop_loss_weight (`float`): weights of the text CE, the
            image loss (flow matching, or CE on codes in discrete mode) and the ``[IMG]``/``[EOI]`` stop CE.
        boi_token / img_token / eoi_token (`str`): the special tokens' strings in the text tokenizer
            (defaults ``"[BOI]"``, ``"[IMG]"``, ``"[EOI]"``; e.g. ``eoi_token="[EOS]"`` for the paper's name, or
            an LM's existing ``"<|image_start|>"``-style pair). They are the three roles whatever the strings.
        boi_token_id / img_token_id / eoi_token_id (`int`, *optional*): the special tokens' ids; set by
            :meth:`AdaTokVLMForCausalLM.from_text_model`.
        image_code_offset (`int`, *optional*): discrete mode: vocabulary id of FSQ code 0.
        codebook_size (`int`, *optional*): discrete mode: number of FSQ codes.
        tie_word_embeddings (`bool`, *optional*): mirrors ``text_config.tie_word_embeddings`` (the LM ties its
            own weights; the mirror lets PEFT and other tools see it at the top level).
    """

    model_type = "adatok_vlm"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
        "tokenizer_config": SubConfigSpec(config_class=AdaTokConfig),
    }

    text_config: dict | PretrainedConfig | None = None
    tokenizer_config: dict | PretrainedConfig | None = None
    image_mode: str = "continuous"
    projector_hidden_size: int | None = None
    projector_hidden_act: str = "gelu"
    flow_head_width: int | None = None
    flow_head_depth: int = 3
    flow_head_mlp_ratio: float = 2.0
    num_flow_steps: int = 25
    flow_batch_mul: int = 4
    flow_time_sampling: str = "uniform"
    flow_time_convention: str = DATA_TO_NOISE
    flow_temperature: float = 1.0
    flow_cfg_scale: float = 1.0
    text_loss_weight: float = 1.0
    image_loss_weight: float = 1.0
    stop_loss_weight: float = 1.0
    boi_token: str = BOI_TOKEN
    img_token: str = IMG_TOKEN
    eoi_token: str = EOI_TOKEN
    boi_token_id: int | None = None
    img_token_id: int | None = None
    eoi_token_id: int | None = None
    image_code_offset: int | None = None
    codebook_size: int | None = None
    tie_word_embeddings: bool | None = None

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoConfig"):
        """No-op: the class lives in the installed package (see ``AdaTokVLMForCausalLM.register_for_auto_class``)."""

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """``PretrainedConfig.from_dict`` (what ``from_pretrained`` reads a ``config.json`` with); a saved config
        without ``flow_time_convention`` predates it and gets ``"noise_to_data"``, the time its head was trained in."""
        if "flow_time_convention" not in config_dict:
            config_dict = {**config_dict, "flow_time_convention": NOISE_TO_DATA}
        return super().from_dict(config_dict, **kwargs)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.tie_word_embeddings is None:
            self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))
        self._validate()

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        if not isinstance(self.tokenizer_config, AdaTokConfig):
            raise TypeError(f"AdaTokVLMConfig.tokenizer_config must be an AdaTokConfig (or its dict), "
                            f"got {type(self.tokenizer_config).__name__}")
        if self.image_mode not in IMAGE_MODES:
            raise ValueError(f"AdaTokVLMConfig.image_mode must be one of {IMAGE_MODES}, got {self.image_mode!r}")
        for name in ("flow_head_depth", "num_flow_steps", "flow_batch_mul"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"AdaTokVLMConfig.{name} must be a positive int, got {value!r}")
        for name in ("projector_hidden_size", "flow_head_width"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"AdaTokVLMConfig.{name} must be None or a positive int, got {value!r}")
        if self.flow_time_sampling not in TIME_DISTRIBUTIONS:
            raise ValueError(f"AdaTokVLMConfig.flow_time_sampling must be one of {TIME_DISTRIBUTIONS}, "
                             f"got {self.flow_time_sampling!r}")
        if self.flow_time_convention not in FLOW_TIME_CONVENTIONS:
            raise ValueError(f"AdaTokVLMConfig.flow_time_convention must be one of {FLOW_TIME_CONVENTIONS}, "
                             f"got {self.flow_time_convention!r}")
        for name in ("text_loss_weight", "image_loss_weight", "stop_loss_weight"):
            if not float(getattr(self, name)) >= 0.0:
                raise ValueError(f"AdaTokVLMConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if not float(self.flow_temperature) > 0 or not float(self.flow_cfg_scale) >= 0:
            raise ValueError("AdaTokVLMConfig needs flow_temperature > 0 and flow_cfg_scale >= 0, got "
                             f"{self.flow_temperature!r}, {self.flow_cfg_scale!r}")
        check_image_token_strings(self.image_token_strings, "AdaTokVLMConfig.")
        ids = {name: getattr(self, name) for name in ("boi_token_id", "img_token_id", "eoi_token_id")}
        set_ids = [v for v in ids.values() if v is not None]
        if set_ids and len(set_ids) != 3:
            raise ValueError(f"AdaTokVLMConfig: set all of boi_token_id, img_token_id, eoi_token_id or none, got {ids}")
        if len(set(set_ids)) != len(set_ids):
            raise ValueError(f"AdaTokVLMConfig: boi/img/eoi token ids must be distinct, got {ids}")
        if self.image_mode == "discrete":
            if self.tokenizer_config.bottleneck != "fsq":
                raise ValueError("AdaTokVLMConfig.image_mode='discrete' needs an FSQ AdaTok "
                                 f"(tokenizer_config.bottleneck='fsq'), got {self.tokenizer_config.bottleneck!r}")
            if (self.image_code_offset is None) != (self.codebook_size is None):
                raise ValueError("AdaTokVLMConfig: discrete mode sets image_code_offset and codebook_size together")

    @property
    def image_token_ids(self) -> dict[str, int | None]:
        """``{"[BOI]": id, "[IMG]": id, "[EOI]": id}``, keyed by the roles' default names whatever the strings."""
        return {BOI_TOKEN: self.boi_token_id, IMG_TOKEN: self.img_token_id, EOI_TOKEN: self.eoi_token_id}

    @property
    def image_token_strings(self) -> dict[str, str]:
        """``{"boi_token": ..., "img_token": ..., "eoi_token": ...}``: the strings in the text tokenizer (the
        keyword arguments :class:`~adatok_vlm.processing_vlm.AdaTokVLMProcessor` takes)."""
        return {"boi_token": self.boi_token, "img_token": self.img_token, "eoi_token": self.eoi_token}

    @property
    def has_image_tokens(self) -> bool:
        return self.boi_token_id is not None

    @property
    def max_image_tokens(self) -> int:
        """``m``: the most tokens an image can have (AdaTok's ``num_latent_tokens``)."""
        return self.tokenizer_config.num_latent_tokens


# ============================================================================================
# presets
# ============================================================================================
# The VLM family's named LMs: random causal LMs for tests and smoke runs (hidden 64, 2 layers), built from a
# config by train_vlm's ``lm.preset`` (``lm.config`` overrides any field; the vocabulary is the text tokenizer's).
# A real LM is a local folder (``lm.path``), not a preset. The README's "Presets" table is checked against this.
LM_PRESETS: dict[str, dict] = {
    "tiny-llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
    "tiny-gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=256),
}


__all__ = ["AdaTokVLMConfig", "LM_PRESETS", "IMAGE_MODES", "FLOW_TIME_CONVENTIONS", "DATA_TO_NOISE", "NOISE_TO_DATA", "BOI_TOKEN", "IMG_TOKEN", "EOI_TOKEN", "VLM_TRAINING_INFO",
           "check_image_token_strings"]
