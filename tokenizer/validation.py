"""Argument checks shared by the tokenizer and everything that hands it data.

Every check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong shape,
range or content) naming the argument, what was expected and what arrived, so a user never meets an
``IndexError`` deep inside a layer or a silently wrong result.
"""

from __future__ import annotations

import math
import numbers

import torch


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {value!r}"[:200]


def check_pixel_values(pixel_values, image_size: int, num_channels: int = 3, name: str = "pixel_values") -> None:
    """``pixel_values`` must be a finite float tensor ``[B, C, H, W]`` in [0, 1] with B >= 1."""
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [B, {num_channels}, {image_size}, {image_size}], "
                        f"got {_describe(pixel_values)}")
    if not pixel_values.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor with values in [0, 1], got {pixel_values.dtype} "
                        "(convert uint8 images with AdaTokImageProcessor or x.float() / 255)")
    if pixel_values.dim() != 4:
        raise ValueError(f"{name} must have 4 dimensions [B, C, H, W], got shape {tuple(pixel_values.shape)}")
    b, c, h, w = pixel_values.shape
    if b == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(pixel_values.shape)})")
    if c != num_channels:
        raise ValueError(f"{name} must have {num_channels} channels, got shape {tuple(pixel_values.shape)}")
    if (h, w) != (image_size, image_size):
        raise ValueError(f"{name} must be {image_size}x{image_size} (this model's image_size), got {h}x{w}; "
                         "resize with AdaTokImageProcessor")
    if not torch.isfinite(pixel_values).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    lo, hi = float(pixel_values.min()), float(pixel_values.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"{name} must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}] "
                         "(images in [-1, 1] or [0, 255] must be rescaled)")


def check_lengths(lengths, batch_size: int, max_length: int, name: str = "lengths") -> torch.Tensor:
    """``lengths`` must be an integer tensor ``[B]`` with values in ``1..max_length``."""
    if not isinstance(lengths, torch.Tensor):
        raise TypeError(f"{name} must be a LongTensor of shape [{batch_size}], got {_describe(lengths)}")
    if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {lengths.dtype}")
    if lengths.shape != (batch_size,):
        raise ValueError(f"{name} must have shape [{batch_size}] (one length per sample), got {tuple(lengths.shape)}")
    if lengths.numel() and (int(lengths.min()) < 1 or int(lengths.max()) > max_length):
        raise ValueError(f"{name} must lie in 1..{max_length}, got values in [{int(lengths.min())}, {int(lengths.max())}]")
    return lengths.long()


def check_tokens(tokens, token_dim: int, max_tokens: int, name: str = "tokens") -> None:
    """``tokens`` must be a float tensor ``[B, L, D]`` with 1 <= L <= max_tokens and B >= 1."""
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"{name} must be a float tensor of shape [B, L, {token_dim}], got {_describe(tokens)}")
    if not tokens.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {tokens.dtype}")
    if tokens.dim() != 3:
        raise ValueError(f"{name} must have 3 dimensions [B, L, D], got shape {tuple(tokens.shape)}")
    b, length, d = tokens.shape
    if b == 0 or length == 0:
        raise ValueError(f"{name} is empty (shape {tuple(tokens.shape)})")
    if d != token_dim:
        raise ValueError(f"{name} must have {token_dim} channels (token_dim), got shape {tuple(tokens.shape)}")
    if length > max_tokens:
        raise ValueError(f"{name} holds {length} tokens, more than this model's {max_tokens} (num_latent_tokens)")


def resolve_num_tokens(num_tokens, batch_size: int, max_length: int, device: torch.device,
                       name: str = "num_tokens") -> torch.Tensor:
    """Turn ``None`` (all), an int or a per-sample integer tensor into ``lengths [B]``."""
    if num_tokens is None:
        return torch.full((batch_size,), max_length, dtype=torch.long, device=device)
    if isinstance(num_tokens, bool):
        raise TypeError(f"{name} must be an int, a LongTensor [B] or a mode string, got bool {num_tokens!r}")
    if isinstance(num_tokens, numbers.Integral):  # int and NumPy integers
        if not 1 <= int(num_tokens) <= max_length:
            raise ValueError(f"{name} must lie in 1..{max_length}, got {int(num_tokens)}")
        return torch.full((batch_size,), int(num_tokens), dtype=torch.long, device=device)
    if isinstance(num_tokens, torch.Tensor):
        if num_tokens.dim() == 0:
            # torch.tensor(True) would otherwise pass as the int 1: a bool is never a count
            if num_tokens.dtype == torch.bool or num_tokens.is_floating_point() or num_tokens.is_complex():
                raise TypeError(f"{name} must be an int, a LongTensor [B] or a mode string, got {_describe(num_tokens)}")
            return resolve_num_tokens(int(num_tokens), batch_size, max_length, device, name)
        return check_lengths(num_tokens, batch_size, max_length, name).to(device)
    raise TypeError(f"{name} must be None, an int, a LongTensor [B] or a mode string, got {_describe(num_tokens)}")


def check_positive_number(value, name: str) -> float:
    """``value`` must be a finite real number > 0 (Python or NumPy); returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive number, got {_describe(value)}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value


# ============================================================================================
# loading: a checkpoint must match its config exactly
# ============================================================================================
def check_model_type(config_dict: dict, expected: str, source) -> None:
    """Raise when ``config.json`` (``config_dict``) describes another model than ``expected``.

    A composite config (e.g. the VLM's) that nests a sub-config of the expected type is accepted:
    transformers picks that sub-config.
    """
    found = config_dict.get("model_type")
    if found is None or found == expected:
        return
    if any(isinstance(v, dict) and v.get("model_type") == expected for v in config_dict.values()):
        return
    raise ValueError(f"model_type: {source} holds a {found!r} config, expected {expected!r}; load it with its own "
                     f"class or with transformers.AutoModel / AutoConfig")


def load_pretrained_strictly(load, cls_name: str, source, model_args: tuple, kwargs: dict, strict: bool):
    """Run ``PreTrainedModel.from_pretrained`` (``load``) so that any checkpoint/config mismatch raises.

    Weights come from safetensors only (``use_safetensors=True``: a folder with just a pickled
    ``pytorch_model.bin`` is an error, never unpickled). With ``strict``, missing, unexpected and
    shape-mismatched weights raise a ``ValueError`` naming them, where transformers would only warn
    and re-initialise them randomly. ``ignore_mismatched_sizes=True`` still allows shape mismatches
    (those weights are re-initialised); ``strict=False`` restores transformers' behaviour entirely.
    """
    kwargs.setdefault("use_safetensors", True)
    if not strict:
        return load(source, *model_args, **kwargs)
    want_info = kwargs.pop("output_loading_info", False)
    allow_mismatch = kwargs.pop("ignore_mismatched_sizes", False)
    # transformers raises a RuntimeError without names on a shape mismatch: let it load, then report.
    model, info = load(source, *model_args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    problems = []
    if info.get("missing_keys"):
        problems.append(f"missing from the checkpoint: {sorted(info['missing_keys'])}")
    if info.get("unexpected_keys"):
        problems.append(f"unexpected in the checkpoint: {sorted(info['unexpected_keys'])}")
    if info.get("mismatched_keys") and not allow_mismatch:
        shapes = [f"{name} (checkpoint {tuple(ckpt)}, model {tuple(model_shape)})"
                  for name, ckpt, model_shape in sorted(info["mismatched_keys"], key=lambda k: k[0])]
        problems.append(f"shape mismatch: {shapes}")
    if info.get("error_msgs"):
        problems.append(f"errors: {info['error_msgs']}")
    if problems:
        raise ValueError(f"{cls_name}.from_pretrained({str(source)!r}): the checkpoint does not match its config; "
                         + "; ".join(problems) + ". Pass strict=False to load anyway (transformers then warns and "
                         "initialises the missing or mismatched weights randomly)")
    return (model, info) if want_info else model


# ============================================================================================
# config sizes: bounded before anything is allocated
# ============================================================================================
# A config.json with ``num_latent_tokens: 10**12`` or ``hidden_size: 10**6`` would otherwise only fail
# once the model tries to allocate terabytes. Both bounds lie far above every preset (the largest,
# dit-xl, has ~0.68B parameters and 256 tokens; adatok-l ~0.3B and 256 tokens + 256 patches).
MAX_PARAMETERS = 10**10          # 40 GB of float32 weights
MAX_SEQUENCE_LENGTH = 65_536     # tokens or patches in one attention sequence


def estimate_adatok_parameters(config) -> int:
    """Approximate parameter count of an ``AdaTokModel`` from its config (within a few % of the real one,
    without the frozen VAE): both ViTs, their position tables and queries, the heads."""
    m, n, d = config.num_latent_tokens, config.num_patches, config.token_dim
    per_layer = 4 + 2 * float(config.mlp_ratio)                    # attention 4 h^2 + MLP 2 r h^2
    h, hd = config.hidden_size, config.decoder_hidden_size
    encoder = config.num_encoder_layers * per_layer * h * h + (config.patch_dim + n + m) * h
    decoder = config.num_decoder_layers * per_layer * hd * hd + (d + n + m) * hd + hd * config.patch_dim
    policy = config.policy_num_layers * config.policy_hidden_size ** 2 + config.policy_hidden_size * (h + m)
    return int(encoder + decoder + 2 * h * d + (policy if config.policy_enabled else 0))


def estimate_dit_parameters(config) -> int:
    """Approximate parameter count of an ``AdaTokDiT`` from its config: adaLN-Zero blocks (attention,
    MLP and the 6 h^2 modulation), embedders, position table, final layer."""
    h = config.hidden_size
    blocks = config.depth * (4 + 2 * float(config.mlp_ratio) + 6) * h * h
    embedders = 2 * (256 * h + h * h) + (config.num_classes + 1) * h + (config.token_dim + config.max_tokens) * h
    return int(blocks + embedders + 2 * h * h + h * config.token_dim)


def check_size_bounds(owner: str, config, sequences: dict[str, int], size_fields: tuple[str, ...],
                      parameters: int) -> None:
    """Raise a ``ValueError`` naming the field(s) when a config would need an unreasonable allocation.

    Args:
        owner: the config class's name, for the message.
        sequences: ``{"field (what)": length}`` of every attention sequence length the config implies.
        size_fields: the fields the parameter count grows with (named, with their values, on failure).
        parameters: the estimated parameter count.
    """
    for name, length in sequences.items():
        if length > MAX_SEQUENCE_LENGTH:
            raise ValueError(f"{owner}.{name} = {length} is more than the bound of {MAX_SEQUENCE_LENGTH} "
                             "positions in one sequence (far above any preset); it would need an enormous allocation")
    if parameters > MAX_PARAMETERS:
        values = ", ".join(f"{name}={getattr(config, name)!r}" for name in size_fields)
        raise ValueError(f"{owner}: {values} give about {parameters:.3g} parameters, more than the bound of "
                         f"{MAX_PARAMETERS:.0e} ({4 * MAX_PARAMETERS / 1e9:.0f} GB in float32; the largest preset has "
                         "under 1e9); reduce the largest of these fields")
