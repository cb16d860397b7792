"""Linear probing of frozen AdaTok tokens (paper Appendix B.5, Fig. 8; protocol of MAE and TiTok).

A linear classifier is trained on frozen token features and its top-1 accuracy is reported per
token count. Features of ``L`` tokens are either the mean of the first ``L`` tokens
(``pooling="mean"``, ``[N, D]``) or the first ``L`` tokens flattened into a fixed ``m * D`` vector
with zeros past ``L`` (``pooling="flatten"``). As in MAE, features are standardised with the training
set's statistics (a BatchNorm without affine parameters, frozen) before the linear layer.

Two protocols:

* ``tail_drop=False``: one probe per length, trained and tested on ``L``-token features;
* ``tail_drop=True`` (the paper's "random tail drop"): one probe trained on features whose length
  is drawn per sample from ``U[min_length, m]``, then tested at every length.

Everything runs on cached features: the encoder runs once per image (the tokens of every length are
prefixes of the full set), then the linear layer trains on the CPU in seconds (full-batch L-BFGS by
default, or Adam epochs).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

POOLINGS = ("mean", "flatten")
OPTIMIZERS = ("auto", "lbfgs", "adam")


# ============================================================================================
# features
# ============================================================================================
@torch.no_grad()
def encode_tokens(model, pixels: torch.Tensor, batch_size: int = 256, progress: bool = True) -> torch.Tensor:
    """All ``m`` tokens of every image, ``[N, m, D]`` float32 on the CPU (``pixels`` uint8 or in [0, 1])."""
    model.eval()
    out = []
    for start in tqdm(range(0, pixels.shape[0], batch_size), desc="encoding for the probe", leave=False,
                      disable=not progress):
        x = pixels[start : start + batch_size]
        x = (x.float() / 255.0 if x.dtype == torch.uint8 else x.float()).to(model.device)
        out.append(model.encode(x).tokens.float().cpu())
    return torch.cat(out)


def pool_tokens(tokens: torch.Tensor, lengths, pooling: str = "mean") -> torch.Tensor:
    """Features of the first ``lengths`` tokens of ``tokens [N, m, D]``.

    ``lengths``: an int or a LongTensor ``[N]`` (1..m). ``"mean"`` -> ``[N, D]`` (mean over the valid
    tokens); ``"flatten"`` -> ``[N, m * D]`` (tokens past each length zeroed, so every length shares
    one feature space and one probe can read them all).
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
        raise ValueError(f"tokens must be [N, m, D], got {getattr(tokens, 'shape', type(tokens).__name__)}")
    n, m, _ = tokens.shape
    if isinstance(lengths, int) and not isinstance(lengths, bool):
        lengths = torch.full((n,), lengths, dtype=torch.long)
    if not isinstance(lengths, torch.Tensor) or lengths.shape != (n,):
        raise ValueError(f"lengths must be an int or a LongTensor [{n}], got {lengths!r}")
    if int(lengths.min()) < 1 or int(lengths.max()) > m:
        raise ValueError(f"lengths must lie in 1..{m}, got [{int(lengths.min())}, {int(lengths.max())}]")
    lengths = lengths.to(tokens.device)
    valid = (torch.arange(m, device=tokens.device)[None, :] < lengths[:, None]).to(tokens.dtype)  # [N, m]
    masked = tokens * valid[..., None]
    if pooling == "mean":
        return masked.sum(1) / lengths[:, None].to(tokens.dtype)
    return masked.flatten(1)


# ============================================================================================
# the probe
# ============================================================================================
@dataclass
class ProbeConfig:
    """How the probe is trained.

    ``optimizer``: ``"lbfgs"`` (full batch; with tail drop, each training image appears
    ``tail_drop_copies`` times, each copy with its own random length, drawn once) or ``"adam"``
    (mini-batches; with tail drop, lengths are redrawn at every step). ``"auto"`` is L-BFGS.
    ``steps`` is the L-BFGS iteration budget or the number of Adam epochs. ``weight_decay`` is an L2
    penalty on the weights (not the bias), in the loss.
    """

    pooling: str = "mean"
    tail_drop: bool = False
    min_length: int = 1
    tail_drop_copies: int = 8
    optimizer: str = "auto"
    steps: int = 200
    lr: float = 1e-2                  # Adam only (L-BFGS uses a strong-Wolfe line search)
    batch_size: int = 512             # Adam only
    weight_decay: float = 1e-4
    seed: int = 0

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"ProbeConfig.pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"ProbeConfig.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        for name in ("min_length", "tail_drop_copies", "steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ProbeConfig.{name} must be a positive int, got {value!r}")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ValueError(f"ProbeConfig needs lr > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")

    @property
    def resolved_optimizer(self) -> str:
        return "lbfgs" if self.optimizer == "auto" else self.optimizer


class LinearProbe(nn.Module):
    """``logits = W ((f - mean) / std) + b``: a frozen standardisation, then one linear layer."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, num_classes: int):
        super().__init__()
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())
        self.linear = nn.Linear(mean.numel(), num_classes)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear((features - self.mean) / self.std)


def _random_lengths(n: int, low: int, high: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(low, high + 1, (n,), generator=generator)


def train_probe(tokens: torch.Tensor, labels: torch.Tensor, num_classes: int, config: ProbeConfig,
                length: int | None = None, progress: bool = False) -> LinearProbe:
    """Fit a :class:`LinearProbe` on cached ``tokens [N, m, D]`` and integer ``labels [N]``.

    Without tail drop, features are those of ``length`` tokens (default: all ``m``). With tail drop,
    each sample's length is drawn from ``U[config.min_length, m]`` (see :class:`ProbeConfig`).
    """
    n, m, _ = tokens.shape
    if labels.shape != (n,):
        raise ValueError(f"labels must be [{n}], got {tuple(labels.shape)}")
    if not 1 <= config.min_length <= m:
        raise ValueError(f"ProbeConfig.min_length must lie in 1..{m}, got {config.min_length}")
    labels = labels.long()
    g = torch.Generator().manual_seed(config.seed)
    length = m if length is None else length
    lbfgs = config.resolved_optimizer == "lbfgs"

    def features(toks: torch.Tensor) -> torch.Tensor:
        if config.tail_drop:
            return pool_tokens(toks, _random_lengths(toks.shape[0], config.min_length, m, g), config.pooling)
        return pool_tokens(toks, length, config.pooling)

    with torch.no_grad():
        if lbfgs and config.tail_drop:       # a fixed augmented set: every image at several lengths
            reference = features(tokens.repeat(config.tail_drop_copies, 1, 1))
            targets = labels.repeat(config.tail_drop_copies)
        else:
            reference, targets = features(tokens), labels
        mean, std = reference.mean(0), reference.std(0).clamp_min(1e-6)
    probe = LinearProbe(mean, std, num_classes)
    params = list(probe.linear.parameters())

    def loss_fn(f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(probe(f), y) + 0.5 * config.weight_decay * probe.linear.weight.pow(2).sum()

    if lbfgs:
        optimizer = torch.optim.LBFGS(params, lr=1.0, max_iter=config.steps, history_size=20,
                                      tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = loss_fn(reference, targets)
            loss.backward()
            return loss

        optimizer.step(closure)
    else:
        optimizer = torch.optim.Adam(params, lr=config.lr)
        for _ in tqdm(range(config.steps), desc="probe epochs", leave=False, disable=not progress):
            order = torch.randperm(n, generator=g)
            for start in range(0, n, config.batch_size):
                index = order[start : start + config.batch_size]
                optimizer.zero_grad()
                loss_fn(features(tokens[index]), labels[index]).backward()
                optimizer.step()
    probe.requires_grad_(False)
    return probe.eval()


@torch.no_grad()
def probe_accuracy(probe: LinearProbe, tokens: torch.Tensor, labels: torch.Tensor, length, pooling: str) -> float:
    """Top-1 accuracy of ``probe`` on the features of ``length`` tokens (an int or a LongTensor ``[N]``)."""
    predictions = probe(pool_tokens(tokens, length, pooling)).argmax(1)
    return float((predictions == labels.long()).float().mean())


def linear_probe(model, train_pixels: torch.Tensor, train_labels: torch.Tensor, test_pixels: torch.Tensor,
                 test_labels: torch.Tensor, lengths: list[int] | None = None, config: ProbeConfig | None = None,
                 batch_size: int = 256, progress: bool = True) -> dict:
    """Top-1 accuracy of linear probes on frozen AdaTok tokens, per token count.

    Returns ``{"per_length": {"L": test accuracy}, "train_accuracy": {"L": ...}, "chance": 1 / classes,
    "num_classes", "num_train", "num_test", "config": {...}}``. ``lengths`` defaults to 1, 2, 4, ..., m.
    """
    from .evaluation import default_lengths

    config = config or ProbeConfig()
    m = model.num_latent_tokens
    lengths = list(lengths or default_lengths(m))
    bad = [n for n in lengths if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= m]
    if bad:
        raise ValueError(f"lengths must be ints in 1..{m}, got {bad}")
    for name, labels, pixels in (("train", train_labels, train_pixels), ("test", test_labels, test_pixels)):
        if not isinstance(labels, torch.Tensor) or labels.shape != (pixels.shape[0],):
            raise ValueError(f"{name}_labels must be a tensor [{pixels.shape[0]}], "
                             f"got {getattr(labels, 'shape', labels)}")
        if int(labels.min()) < 0:
            raise ValueError(f"{name}_labels must be class ids >= 0 (got {int(labels.min())}): the images need labels")
    num_classes = int(max(int(train_labels.max()), int(test_labels.max()))) + 1
    train_tokens = encode_tokens(model, train_pixels, batch_size, progress)
    test_tokens = encode_tokens(model, test_pixels, batch_size, progress)
    per_length, train_accuracy = {}, {}
    shared = train_probe(train_tokens, train_labels, num_classes, config) if config.tail_drop else None
    for length in tqdm(lengths, desc="linear probes", leave=False, disable=not progress):
        probe = shared if shared is not None else train_probe(train_tokens, train_labels, num_classes, config, length)
        per_length[str(length)] = probe_accuracy(probe, test_tokens, test_labels, length, config.pooling)
        train_accuracy[str(length)] = probe_accuracy(probe, train_tokens, train_labels, length, config.pooling)
    return {"per_length": per_length, "train_accuracy": train_accuracy, "chance": 1.0 / num_classes,
            "num_classes": num_classes, "num_train": int(train_pixels.shape[0]), "num_test": int(test_pixels.shape[0]),
            "config": asdict(config)}
