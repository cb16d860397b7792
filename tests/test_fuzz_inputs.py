"""Property-based fuzzing of every entry point that takes user data (issue 9, "bad input everywhere").

Hypothesis throws random shapes, dtypes, NaN/inf, empty batches, lengths outside their range,
greyscale/RGBA/16-bit/palette PIL images and huge and tiny images at ``AdaTokModel.encode`` /
``decode`` / ``forward`` (every ``num_tokens`` mode), ``AdaTokImageProcessor``, the DiT's ``forward`` /
``generate``, ``AdaTokVLMProcessor`` and the VLM's ``generate_images``. Each case must either

* work correctly: the output has the promised shape, dtype and range (and, for ``encode``, is a prefix
  of the full encoding; for ``decode`` and the DiT, values at padded positions have no effect), or
* raise ``ValueError`` / ``TypeError`` whose message names the offending argument.

Any other exception (``IndexError``, ``RuntimeError`` deep in a layer) fails the test. Where an oracle
knows the input is valid the call must succeed; where it knows it is invalid the call must raise:
a silently accepted bad input is a failure too.

Every case is counted per entry point and outcome; ``test_zz_case_counts`` prints the table (visible
with plain ``pytest``) and writes it to ``<pytest basetemp>/fuzz_case_counts.json`` (and to
``$ADATOK_FUZZ_REPORT`` when set).

Volume: ``make test`` runs a derandomized share (the per-test counts below). ``ADATOK_FUZZ=full``
(``make fuzz``) raises every entry point to at least ``FULL_EXAMPLES`` = 1,000 cases, still
derandomized (the same cases every run, so the figures in RELIABILITY.md are reproducible), and
``test_zz_case_counts`` then checks that each entry point reached them.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import tiny_model

M = 12          # num_latent_tokens of the tiny models
D = 16          # their token_dim
SIZE = 32       # their image_size

COUNTS: Counter = Counter()   # (entry point, "accepted" | "rejected") -> cases

FUZZ_MODES = ("default", "full")
FUZZ_MODE = os.environ.get("ADATOK_FUZZ", "") or "default"
if FUZZ_MODE not in FUZZ_MODES:
    raise ValueError(f"ADATOK_FUZZ must be one of {FUZZ_MODES} (or unset), got {FUZZ_MODE!r}")
FULL_EXAMPLES = 1000          # cases per entry point in the full mode (issue 20, item 7)

_BASE = settings(deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def fuzz(examples: int) -> settings:
    """Reproducible (derandomized, no example database), no deadline, ``examples`` cases in the default
    mode and at least ``FULL_EXAMPLES`` with ``ADATOK_FUZZ=full``."""
    return settings(_BASE, max_examples=max(examples, FULL_EXAMPLES) if FUZZ_MODE == "full" else examples)


def expect(target: str, call, names: tuple[str, ...], valid: bool | None, check=None):
    """Run one case. ``valid``: True (must work), False (must raise), None (either).

    A raised ValueError/TypeError must name one of ``names``; anything else propagates and fails.
    """
    try:
        result = call()
    except (ValueError, TypeError) as err:
        message = str(err)
        assert valid is not True, f"{target}: a valid input was rejected: {type(err).__name__}: {message}"
        assert any(name in message for name in names), \
            f"{target}: {type(err).__name__} does not name any of {names}: {message}"
        COUNTS[target, "rejected"] += 1
        return None
    assert valid is not False, f"{target}: an invalid input was silently accepted (expected an error naming {names})"
    if check is not None:
        check(result)
    COUNTS[target, "accepted"] += 1
    return result


# ============================================================================================
# models, built once
# ============================================================================================
@lru_cache(maxsize=None)
def adatok(policy: bool = False):
    return tiny_model(policy_enabled=policy)


@lru_cache(maxsize=None)
def dit():
    from adatok_vlm import AdaTokDiT, AdaTokDiTConfig

    torch.manual_seed(0)
    return AdaTokDiT(AdaTokDiTConfig.from_preset("dit-tiny", token_dim=D, max_tokens=M, num_classes=3)).eval()


@lru_cache(maxsize=None)
def vlm_parts():
    from test_vlm import processor_for, tiny_vlm

    vlm, tok = tiny_vlm()
    return vlm, tok, processor_for(vlm, tok)


# ============================================================================================
# strategies
# ============================================================================================
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
OTHER_DTYPES = (torch.uint8, torch.int64, torch.bool, torch.complex64)
FILLS = ("plain", "plain", "plain", "nan", "inf", "-inf", "x255", "neg")


def make_tensor(shape, dtype, fill: str, seed: int, scale: float = 1.0, where: str = "one") -> torch.Tensor:
    """Random values (``rand`` in [0, 1) or ``randn * scale``) with a fault written in, then cast."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g) if scale == 1.0 else torch.randn(shape, generator=g) * scale
    if x.numel() and fill != "plain":
        value = {"nan": float("nan"), "inf": float("inf"), "-inf": -float("inf"), "x255": 200.0, "neg": -0.5,
                 "huge": 1e38}[fill]
        flat = x.view(-1)
        if where == "one":
            flat[int(torch.randint(flat.numel(), (1,), generator=g))] = value
        else:
            flat.fill_(value)
    if dtype in FLOAT_DTYPES:
        return x.to(dtype)
    if dtype == torch.complex64:
        return x.to(torch.complex64)
    if dtype == torch.bool:
        return x > 0.5
    return (x.nan_to_num(0.0, 0.0, 0.0).clamp(0, 1) * 255).to(dtype)


@st.composite
def pixel_values(draw):
    """``(value, valid)`` for ``pixel_values``: mostly near-valid tensors with one fault."""
    rank = draw(st.sampled_from([4, 4, 4, 4, 3, 5]))
    b = draw(st.sampled_from([1, 2, 3, 0]))
    c = draw(st.sampled_from([3, 3, 3, 1, 4]))
    h = draw(st.sampled_from([SIZE, SIZE, SIZE, 16, 31, 64]))
    w = draw(st.sampled_from([h, h, SIZE, 8]))
    dtype = draw(st.sampled_from(FLOAT_DTYPES * 2 + OTHER_DTYPES))
    fill = draw(st.sampled_from(FILLS))
    container = draw(st.sampled_from(["tensor"] * 10 + ["numpy", "list", "none"]))
    if draw(st.booleans()):   # half the cases: a valid batch, so the other argument is what is tested
        rank, b, c, h, w = 4, max(b, 1), 3, SIZE, SIZE
        dtype, fill, container = draw(st.sampled_from(FLOAT_DTYPES)), "plain", "tensor"
    shape = (b, c, h, w) if rank == 4 else ((c, h, w) if rank == 3 else (1, b, c, h, w))
    x = make_tensor(shape, dtype, fill, draw(st.integers(0, 2**16)))
    valid = (container == "tensor" and rank == 4 and b >= 1 and c == 3 and (h, w) == (SIZE, SIZE)
             and dtype in FLOAT_DTYPES and fill == "plain")
    if container == "numpy":
        x = x.real.float().numpy() if x.is_complex() else x.float().numpy()
    elif container == "list":
        x = x.real.float().tolist() if x.is_complex() else x.float().tolist()
    elif container == "none":
        x = None
    return x, valid, (x.shape[0] if valid else b)


def num_tokens_values(batch: int):
    """Strategy of ``(num_tokens, kind)``; ``kind`` says what the oracle needs to judge it."""
    tensor_lengths = st.builds(
        lambda n, lo, hi, dtype, seed: torch.randint(lo, hi + 1, (n,), generator=torch.Generator().manual_seed(seed)
                                                     ).to(dtype),
        st.sampled_from([batch, batch, batch, batch + 1, max(batch - 1, 0)]),
        st.sampled_from([1, 1, 0, -2]), st.sampled_from([1, M, M, M + 1, 40]),
        st.sampled_from([torch.int64, torch.int64, torch.int32, torch.uint8, torch.float32, torch.bool]),
        st.integers(0, 2**16))
    valid_lengths = st.builds(lambda n, seed: torch.randint(1, M + 1, (n,), generator=torch.Generator().manual_seed(seed)),
                              st.just(batch), st.integers(0, 2**16))
    return st.one_of(
        st.none().map(lambda v: (v, "none")),
        st.integers(1, M).map(lambda v: (v, "int")),
        st.sampled_from(["auto", "sample", "search", "oracle"]).map(lambda v: (v, "mode")),
        st.sampled_from([{"max_mse": 0.02}, {"mean_budget": 4.5}, {"max_mse": np.float32(1e-3)}]).map(
            lambda v: (v, "dial")),
        valid_lengths.map(lambda v: (v, "tensor")),
        st.integers(-2, M + 3).map(lambda v: (v, "int")),
        st.integers(-2, M + 3).map(lambda v: (np.int64(v), "int")),
        st.integers(-2, M + 3).map(lambda v: (torch.tensor(v), "int")),
        st.sampled_from([True, False, 2.5, 4.0, [2, 3], (3,), np.bool_(True)]).map(lambda v: (v, "bad")),
        # a 0-d bool/float tensor is not a count either (torch.tensor(True) once passed as length 1)
        st.sampled_from(["True", "False", "2.0"]).map(lambda v: ({"True": torch.tensor(True), "False": torch.tensor(False),
                                                                 "2.0": torch.tensor(2.0)}[v], "bad")),
        st.sampled_from(["auto", "sample", "search", "oracle", "fastest", "", "AUTO"]).map(lambda v: (v, "mode")),
        st.builds(lambda k, v: ({k: v}, "dial"), st.sampled_from(["max_mse", "mean_budget", "budget"]),
                  st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                            st.integers(-3, 20), st.sampled_from(["5", None, True, np.float32(4.0)]))),
        st.sampled_from([{}, {"max_mse": 0.1, "mean_budget": 4}]).map(lambda v: (v, "dial")),
        tensor_lengths.map(lambda v: (v, "tensor")),
    )


def num_tokens_valid(value, kind: str, batch: int, has_policy: bool, for_forward: bool) -> bool:
    if kind == "none":
        return True
    if kind == "int":
        return 1 <= int(value) <= M
    if kind == "bad":
        return False
    if kind == "mode":
        if for_forward:
            return False
        return value in ("search", "oracle") or (value in ("auto", "sample") and has_policy)
    if kind == "dial":
        if for_forward or not has_policy or len(value) != 1:
            return False
        key, target = next(iter(value.items()))
        if key not in ("max_mse", "mean_budget") or isinstance(target, (bool, str)) or target is None:
            return False
        target = float(target)
        if not np.isfinite(target) or target <= 0:
            return False
        return key == "max_mse" or 1 <= target <= M
    # a per-sample tensor
    if value.is_floating_point() or value.dtype == torch.bool:
        return False
    return value.shape == (batch,) and batch >= 1 and int(value.min()) >= 1 and int(value.max()) <= M


# ============================================================================================
# AdaTokModel.encode / forward
# ============================================================================================
def check_encoding(model, pixels, num_tokens, kind, enc) -> None:
    b = pixels.shape[0]
    assert enc.lengths.shape == (b,) and enc.lengths.dtype == torch.long
    assert int(enc.lengths.min()) >= 1 and int(enc.lengths.max()) <= M
    assert enc.tokens.shape == (b, int(enc.lengths.max()), D) and torch.isfinite(enc.tokens).all()
    valid = torch.arange(enc.tokens.shape[1])[None] < enc.lengths[:, None]
    assert (enc.tokens[~valid] == 0).all(), "tokens past each length are zero"
    if kind == "int":
        assert (enc.lengths == int(num_tokens)).all()
    elif kind == "tensor":
        assert torch.equal(enc.lengths, num_tokens.long())
    elif kind == "none":
        assert (enc.lengths == M).all()
    elif kind == "dial" and "mean_budget" in num_tokens:
        assert enc.lengths.float().mean() <= float(num_tokens["mean_budget"]) + 1e-6
    # Whatever the length, the tokens are a prefix of the full encoding.
    full = model.encode(pixels).tokens
    assert torch.allclose(enc.tokens[valid], full[:, : enc.tokens.shape[1]][valid], atol=1e-5)


@fuzz(300)
@given(data=st.data(), policy=st.booleans())
def test_fuzz_encode(data, policy):
    model = adatok(policy)
    pixels, pixels_ok, b = data.draw(pixel_values(), label="pixel_values")
    num_tokens, kind = data.draw(num_tokens_values(b), label="num_tokens")
    tokens_ok = num_tokens_valid(num_tokens, kind, b, policy, for_forward=False)
    names = ("pixel_values",) if not pixels_ok and tokens_ok else \
        ("num_tokens",) if pixels_ok else ("pixel_values", "num_tokens")
    expect("AdaTokModel.encode", lambda: model.encode(pixels, num_tokens=num_tokens), names,
           pixels_ok and tokens_ok, lambda enc: check_encoding(model, pixels, num_tokens, kind, enc))


@fuzz(120)
@given(data=st.data())
def test_fuzz_forward(data):
    model = adatok()
    pixels, pixels_ok, b = data.draw(pixel_values(), label="pixel_values")
    num_tokens, kind = data.draw(num_tokens_values(b), label="num_tokens")
    tokens_ok = num_tokens_valid(num_tokens, kind, b, False, for_forward=True)
    names = ("pixel_values",) if not pixels_ok and tokens_ok else \
        ("num_tokens",) if pixels_ok else ("pixel_values", "num_tokens")

    def check(out):
        assert torch.isfinite(out.loss) and out.loss.ndim == 0
        assert out.reconstruction.shape == (b, 3, SIZE, SIZE) and out.lengths.shape == (b,)
        assert out.lengths.min() >= 1 and out.lengths.max() <= M

    with torch.no_grad():
        expect("AdaTokModel.forward", lambda: model(pixels, num_tokens=num_tokens), names, pixels_ok and tokens_ok,
               check)


# ============================================================================================
# AdaTokModel.decode
# ============================================================================================
@fuzz(250)
@given(data=st.data())
def test_fuzz_decode(data):
    model = adatok()
    rank = data.draw(st.sampled_from([3, 3, 3, 3, 2, 4]))
    b = data.draw(st.sampled_from([1, 2, 3, 0]))
    length = data.draw(st.sampled_from([1, 5, M, M, 0, M + 1]))
    d = data.draw(st.sampled_from([D, D, D, 8]))
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES * 2 + (torch.int64, torch.complex64)))
    fault = data.draw(st.sampled_from(["none", "none", "nan_valid", "inf_valid", "nan_pad", "huge"]))
    if data.draw(st.booleans()):   # half the cases: well-formed tokens
        rank, b, length, d = 3, max(b, 1), data.draw(st.integers(1, M)), D
        dtype = data.draw(st.sampled_from(FLOAT_DTYPES))
    shape = (b, length, d) if rank == 3 else ((length, d) if rank == 2 else (1, b, length, d))
    tokens = make_tensor(shape, torch.float32, "plain", data.draw(st.integers(0, 2**16)), scale=0.5)
    lengths_kind = data.draw(st.sampled_from(["none", "tensor", "tensor", "tensor", "tensor", "none", "bad_shape",
                                              "float", "list", "out_of_range"]))
    lengths = None
    top = max(length, 1)
    if lengths_kind == "tensor":
        lengths = torch.randint(1, top + 1, (b,))
    elif lengths_kind == "bad_shape":
        lengths = torch.randint(1, top + 1, (b + 1,))
    elif lengths_kind == "float":
        lengths = torch.randint(1, top + 1, (b,)).float()
    elif lengths_kind == "list":
        lengths = [1] * b
    elif lengths_kind == "out_of_range":
        lengths = torch.full((b,), data.draw(st.sampled_from([0, -1, top + 1])))
    shape_ok = rank == 3 and b >= 1 and 1 <= length <= M and d == D and dtype in FLOAT_DTYPES
    lengths_ok = lengths_kind in ("none", "tensor")
    eff = torch.full((b,), length) if lengths_kind in ("none",) or not isinstance(lengths, torch.Tensor) \
        or lengths.shape != (b,) else lengths.long()
    valid_mask = torch.arange(max(length, 0))[None] < eff[:, None] if rank == 3 else None
    ok: bool | None = shape_ok and lengths_ok
    if rank == 3 and b and length and tokens.numel():
        if fault in ("nan_valid", "inf_valid"):
            tokens[0, 0] = float("nan") if fault == "nan_valid" else float("inf")   # position 0 is always valid
            ok = False if ok else ok
        elif fault == "nan_pad" and lengths_kind == "tensor" and bool((eff < length).any()):
            tokens[~valid_mask] = float("nan")                                      # padding may hold anything
        elif fault == "huge":
            tokens[valid_mask] = 1e38 if ok else tokens[valid_mask]
            ok = None if ok else ok                                                 # works or says "tokens"
    tokens = tokens.to(dtype) if dtype in FLOAT_DTYPES else (tokens.nan_to_num().to(dtype))
    if shape_ok and not lengths_ok:
        names = ("lengths",) if fault == "none" else ("tokens", "lengths")
    else:
        names = ("tokens",) if lengths_ok else ("tokens", "lengths")

    def check(images):
        assert images.shape == (b, 3, SIZE, SIZE) and torch.isfinite(images).all()
        assert images.min() >= 0 and images.max() <= 1
        # Values at padded positions have no effect at all.
        clean = tokens.float().masked_fill(~valid_mask[..., None], 0.0)
        assert torch.allclose(images, model.decode(clean, lengths), atol=1e-5)

    expect("AdaTokModel.decode", lambda: model.decode(tokens, lengths), names, ok, check)


# ============================================================================================
# AdaTokImageProcessor
# ============================================================================================
PIL_MODES = ("RGB", "RGBA", "L", "LA", "P", "P+transparency", "I;16", "I", "F", "1", "CMYK", "YCbCr")
SIDES = (1, 2, 3, 17, 32, 33, 300)


def pil_image(mode: str, width: int, height: int, seed: int, bad_float: bool) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(0, 65536, (height, width)).astype(np.int32))
    if mode == "F":
        array = rng.random((height, width), dtype=np.float32) * (3.0 if bad_float else 1.0)
        return Image.fromarray(array)
    rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    if mode == "P+transparency":
        image = rgb.convert("P")
        image.info["transparency"] = 0
        return image
    if mode in ("RGBA", "LA"):
        image = rgb.convert(mode)
        alpha = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8))
        image.putalpha(alpha)
        return image
    return rgb.convert(mode)


@st.composite
def one_image(draw):
    """``(image, valid)``: PIL (every common mode), numpy or torch, tiny to huge, with faults."""
    seed = draw(st.integers(0, 2**16))
    kind = draw(st.sampled_from(["pil"] * 5 + ["numpy"] * 3 + ["torch"] * 2 + ["huge", "junk"]))
    if kind == "huge":
        width, height = draw(st.sampled_from([(4096, 40), (40, 4096), (1500, 1200)]))
        return Image.new("RGB", (width, height), (10, 200, 30)), True, min(width, height)
    if kind == "junk":
        return draw(st.sampled_from([None, "photo.png", 3, [[0.5]], b"\x89PNG"])), False, 0
    width, height = draw(st.sampled_from(SIDES)), draw(st.sampled_from(SIDES))
    if kind == "pil":
        mode = draw(st.sampled_from(PIL_MODES))
        bad_float = mode == "F" and draw(st.booleans())
        return pil_image(mode, width, height, seed, bad_float), False if bad_float else True, min(width, height)
    rng = np.random.default_rng(seed)
    dtype = draw(st.sampled_from(["uint8", "uint16", "float32", "float64", "float16", "bool", "int64", "int16",
                                  "complex64", "object"]))
    if dtype in ("object", "uint16"):
        kind = "numpy"     # no torch tensor of these dtypes: the image stays a (channels-last) numpy array
    channels = draw(st.sampled_from([None, 1, 3, 3, 4, 2, 5]))
    empty = draw(st.sampled_from([False] * 6 + [True]))
    h, w = (0 if empty else height), width
    shape = (h, w) if channels is None else ((h, w, channels) if kind == "numpy" else (channels, h, w))
    fault = draw(st.sampled_from(["none", "none", "none", "nan", "range"]))
    if dtype in ("float32", "float64", "float16"):
        array = rng.random(shape).astype(dtype)
        if array.size and fault == "nan":
            array.flat[0] = np.nan
        elif array.size and fault == "range":
            array.flat[0] = 7.0
    elif dtype == "bool":
        array = rng.random(shape) > 0.5
    elif dtype == "uint16":
        array = rng.integers(0, 65536, shape).astype(np.uint16)
    elif dtype in ("int64", "int16"):
        array = rng.integers(-3 if fault == "range" else 0, 256, shape).astype(dtype)
    elif dtype == "complex64":
        array = rng.random(shape).astype(np.complex64)
    elif dtype == "object":
        array = np.empty(shape, dtype=object)
    else:
        array = rng.integers(0, 256, shape).astype(np.uint8)
    image = array if kind == "numpy" else torch.from_numpy(np.ascontiguousarray(array))
    good_dtype = dtype in ("uint8", "uint16", "bool") or (dtype in ("float32", "float64", "float16")
                                                           and fault == "none")
    if dtype in ("int64", "int16"):
        good_dtype = array.size == 0 or int(array.min()) >= 0     # "range" draws from -3 but may miss it
    known_bad = empty or dtype in ("complex64", "object") or not good_dtype or channels in (2, 5)
    return image, (False if known_bad else None), min(h, w)


@fuzz(250)
@given(data=st.data())
def test_fuzz_image_processor(data):
    from adatok_vlm import AdaTokImageProcessor

    count = data.draw(st.sampled_from([1, 1, 2, 3]))
    drawn = [data.draw(one_image(), label=f"image {i}") for i in range(count)]
    images = [image for image, _, _ in drawn]
    size = data.draw(st.sampled_from([8, SIZE]))
    mode = data.draw(st.sampled_from(["shortest_edge", "pad"]))
    crop = data.draw(st.sampled_from(["center", "random"]))
    flip = data.draw(st.booleans())
    container = data.draw(st.sampled_from(["list", "list", "single", "empty"]))
    if container == "single":
        images = images[:1]
        drawn = drawn[:1]
    elif container == "empty":
        images, drawn = [], []
    verdicts = [valid for _, valid, _ in drawn]
    tiny = any(side < 2 for _, valid, side in drawn if valid is not False) and mode == "shortest_edge"
    if not drawn or any(v is False for v in verdicts) or tiny:
        ok = False
    elif all(v is True for v in verdicts):
        ok = True
    else:
        ok = None
    processor = AdaTokImageProcessor(size=size, resize_mode=mode, crop=crop, do_flip=flip)
    arg = images if container != "single" else images[0]

    def check(out):
        pixels = out["pixel_values"]
        assert pixels.shape == (len(drawn), 3, size, size) and pixels.dtype == torch.float32
        assert torch.isfinite(pixels).all() and pixels.min() >= 0 and pixels.max() <= 1

    expect("AdaTokImageProcessor", lambda: processor(arg, return_tensors="pt", seed=0), ("images",), ok, check)


# ============================================================================================
# the DiT: forward and generate
# ============================================================================================
@fuzz(250)
@given(data=st.data())
def test_fuzz_dit_forward(data):
    model = dit()
    b = data.draw(st.sampled_from([1, 2, 3, 0]))
    length = data.draw(st.sampled_from([1, 4, M, M + 2, 0]))
    d = data.draw(st.sampled_from([D, D, D, 4]))
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES + (torch.int64,)))
    rank = data.draw(st.sampled_from([3, 3, 3, 2]))
    if data.draw(st.booleans()):   # half the cases: well-formed tokens
        rank, b, length, d = 3, max(b, 1), data.draw(st.integers(1, M + 2)), D
        dtype = data.draw(st.sampled_from(FLOAT_DTYPES))
    tokens = make_tensor((b, length, d) if rank == 3 else (length, d), torch.float32, "plain",
                         data.draw(st.integers(0, 2**16)), scale=1.0 + 1e-3)
    t_kind = data.draw(st.sampled_from(["tensor"] * 4 + ["number", "nan", "out", "bool", "shape", "list"]))
    timesteps = {"tensor": torch.rand(b), "number": 0.5, "nan": torch.full((b,), float("nan")),
                 "out": torch.full((b,), 1.5), "bool": torch.ones(b, dtype=torch.bool), "shape": torch.rand(b, 1),
                 "list": [0.5] * b}[t_kind]
    y_kind = data.draw(st.sampled_from(["ok", "ok", "ok", "ok", "null", "out", "float", "numpy"]))
    labels = {"ok": torch.randint(0, 3, (b,)), "null": torch.full((b,), 3), "out": torch.full((b,), 4),
              "float": torch.zeros(b), "numpy": np.zeros(b, dtype=np.int64)}[y_kind]
    top = max(1, min(length, M))
    l_kind = data.draw(st.sampled_from(["ok"] * 6 + ["zero", "over", "float"]))
    lengths = {"ok": torch.randint(1, top + 1, (b,)), "zero": torch.zeros(b, dtype=torch.long),
               "over": torch.full((b,), top + 1), "float": torch.ones(b)}[l_kind]
    fault = data.draw(st.sampled_from(["none", "none", "nan_valid", "nan_pad"]))
    shape_ok = rank == 3 and b >= 1 and length >= 1 and d == D and dtype in FLOAT_DTYPES
    if shape_ok and l_kind == "ok":
        valid = torch.arange(length)[None] < lengths[:, None]
        if fault == "nan_valid":
            tokens[0, 0] = float("nan")
        elif fault == "nan_pad" and bool((~valid).any()):
            tokens[~valid] = float("nan")
    tokens = tokens.to(dtype) if dtype in FLOAT_DTYPES else tokens.to(dtype)
    parts_ok = t_kind in ("tensor", "number") and y_kind in ("ok", "null") and l_kind == "ok"
    ok = shape_ok and parts_ok and not (fault == "nan_valid")
    names = ("tokens", "timesteps", "class_labels", "lengths")

    def check(v):
        assert v.shape == tokens.shape and torch.isfinite(v).all()
        assert (v[~valid] == 0).all(), "the velocity is zero past each length"

    with torch.no_grad():
        expect("AdaTokDiT.forward", lambda: model(tokens, timesteps, labels, lengths), names, ok, check)


def picker(data, broken: str | None):
    """``pick(name, options)``: draws among ``options`` (tuples whose last item says valid or not) a valid
    one, unless ``name`` is ``broken``, the one argument this case breaks (then an invalid one)."""
    def pick(name, options):
        pool = [o for o in options if o[-1] is (name != broken) or (o[-1] is None)] or options
        return data.draw(st.sampled_from(pool), label=name)
    return pick


@fuzz(120)
@given(data=st.data())
def test_fuzz_dit_generate(data):
    model = dit()
    broken = data.draw(st.sampled_from([None, None, None, "class_labels", "num_tokens", "cfg_scale", "num_steps",
                                        "sampler", "guidance_interval", "generator"]), label="broken")
    pick = picker(data, broken)

    labels, labels_ok = pick("class_labels", [
        ([0, 1], True), ([2], True), ([3], True), (torch.tensor([0, 2, 1]), True), ([], False), ([5], False),
        ([-1], False), ([0.5], False), (np.array([0, 1]), False), (torch.zeros(2), False), ("0", False),
        (torch.zeros(1, 2, dtype=torch.long), False)])
    b = len(labels) if labels_ok else 1
    num_tokens, kind, _ = pick("num_tokens", [
        (None, "none", False), (1, "int", True), (M, "int", True), (np.int64(5), "int", True), (0, "int", False),
        (M + 1, "int", False), (-1, "int", False), (torch.tensor([1] * b), "tensor", True),
        (torch.tensor([M] * b), "tensor", True), (torch.tensor([0] * b), "tensor", False),
        (torch.tensor([2] * (b + 1)), "tensor", False), ("auto", "bad", False), (2.0, "bad", False),
        ({"max_mse": 0.1}, "bad", False), (torch.tensor(True), "bad", False), (np.bool_(True), "bad", False),
        (True, "bad", False)])
    cfg_scale, cfg_ok = pick("cfg_scale", [(1.0, True), (2.5, True), (np.float64(1.5), True), (0.5, False),
                                           (float("nan"), False), (float("inf"), False), (True, False), ("2", False)])
    num_steps, steps_ok = pick("num_steps", [(1, True), (2, True), (np.int64(2), True), (0, False), (-1, False),
                                             (2.0, False)])
    sampler, sampler_ok = pick("sampler", [("euler", True), ("heun", True), ("rk4", False), (["euler"], False)])
    interval, interval_ok = pick("guidance_interval", [(None, True), ((0.2, 0.8), True), ((0.8, 0.2), False),
                                                       ((None, 1), False), ("ab", False), ((float("nan"), 1), False)])
    generator, gen_ok = pick("generator", [(None, True), ("g", True), (3, False)])
    if generator == "g":
        generator = torch.Generator().manual_seed(0)
    tokens_ok = num_tokens_valid(num_tokens, kind, b, False, for_forward=True) and kind != "none"
    ok = labels_ok and tokens_ok and cfg_ok and steps_ok and sampler_ok and interval_ok and gen_ok
    names = ("class_labels", "num_tokens", "cfg_scale", "num_steps", "sampler", "guidance_interval", "generator",
             "length_histograms")

    def check(enc):
        assert enc.lengths.shape == (b,) and enc.lengths.min() >= 1 and enc.lengths.max() <= M
        if kind == "int":
            assert (enc.lengths == num_tokens).all()
        assert enc.tokens.shape == (b, int(enc.lengths.max()), D) and torch.isfinite(enc.tokens).all()
        valid = torch.arange(enc.tokens.shape[1])[None] < enc.lengths[:, None]
        assert (enc.tokens[~valid] == 0).all()

    expect("AdaTokDiT.generate", lambda: model.generate(labels, num_tokens=num_tokens, cfg_scale=cfg_scale,
                                                         num_steps=num_steps, sampler=sampler,
                                                         guidance_interval=interval, generator=generator),
           names, ok, check)


# ============================================================================================
# a bool is never a count (issue 20: num_tokens=torch.tensor(True) once returned length 1)
# ============================================================================================
BOOL_COUNTS = {"True": True, "np.bool_": np.bool_(True), "tensor(True)": torch.tensor(True),
               "tensor(False)": torch.tensor(False), "tensor([True])": torch.tensor([True])}
COUNT_ENTRIES = {
    "AdaTokModel.encode": lambda n: adatok().encode(torch.rand(1, 3, SIZE, SIZE), num_tokens=n),
    "AdaTokModel.forward": lambda n: adatok()(torch.rand(1, 3, SIZE, SIZE), num_tokens=n),
    "AdaTokDiT.generate": lambda n: dit().generate([0], num_tokens=n, num_steps=1),
    "ClassToImagePipeline": lambda n: pipeline()([0], num_tokens=n, num_steps=1),
}


@pytest.mark.parametrize("entry", sorted(COUNT_ENTRIES))
@pytest.mark.parametrize("value", sorted(BOOL_COUNTS))
def test_a_bool_num_tokens_is_a_type_error(entry, value):
    with torch.no_grad(), pytest.raises(TypeError, match="num_tokens"):
        COUNT_ENTRIES[entry](BOOL_COUNTS[value])
    COUNT_ENTRIES[entry](1)         # the same call with a real count works


# ============================================================================================
# ClassToImagePipeline
# ============================================================================================
@lru_cache(maxsize=None)
def pipeline():
    from adatok_vlm import ClassToImagePipeline

    return ClassToImagePipeline(dit(), adatok())


@fuzz(120)
@given(data=st.data())
def test_fuzz_class_to_image_pipeline(data):
    pipe = pipeline()
    broken = data.draw(st.sampled_from([None, None, None, "class_labels", "num_tokens", "cfg_scale", "num_steps",
                                        "sampler", "guidance_interval", "generator", "output_type", "batch_size",
                                        "return_dict"]), label="broken")
    pick = picker(data, broken)
    labels, labels_ok = pick("class_labels", [
        (0, True), (np.int64(2), True), ([0, 1, 2], True), (torch.tensor([3, 1]), True), ([1], True), ([], False),
        (4, False), (-1, False), (True, False), (2.5, False), ("1", False), (torch.tensor([0.0]), False),
        (torch.tensor([True]), False), ([0, True], False), (None, False)])
    b = (len(labels) if isinstance(labels, (list, torch.Tensor)) else 1) if labels_ok else 1
    num_tokens, kind, _ = pick("num_tokens", [
        (None, "none", False), (1, "int", True), (M, "int", True), (np.int64(3), "int", True), (0, "int", False),
        (M + 1, "int", False), (torch.tensor([2] * b), "tensor", True), (torch.tensor([2] * (b + 1)), "tensor", False),
        (torch.tensor(True), "bad", False), (True, "bad", False), ("auto", "bad", False), (2.0, "bad", False)])
    cfg_scale, cfg_ok = pick("cfg_scale", [(1.0, True), (3.0, True), (0.5, False), (float("nan"), False),
                                           (True, False), ("2", False)])
    num_steps, steps_ok = pick("num_steps", [(1, True), (2, True), (0, False), (True, False), (1.5, False)])
    sampler, sampler_ok = pick("sampler", [("euler", True), ("heun", True), ("rk4", False), (None, False)])
    interval, interval_ok = pick("guidance_interval", [(None, True), ((0.2, 0.8), True), ((0.8, 0.2), False),
                                                       ("ab", False)])
    generator, gen_ok = pick("generator", [(None, True), ("g", True), (3, False)])
    output_type, type_ok = pick("output_type", [("pil", True), ("pt", True), ("np", False), (None, False),
                                                (["pt"], False)])
    batch_size, batch_ok = pick("batch_size", [(None, True), (1, True), (2, True), (np.int64(2), True), (0, False),
                                               (True, False), (1.5, False)])
    return_dict, dict_ok = pick("return_dict", [(True, True), (False, True), (1, False), ("yes", False)])
    if generator == "g":
        generator = torch.Generator().manual_seed(0)
    tokens_ok = num_tokens_valid(num_tokens, kind, b, False, for_forward=True) and kind != "none"
    ok = (labels_ok and tokens_ok and cfg_ok and steps_ok and sampler_ok and interval_ok and gen_ok and type_ok
          and batch_ok and dict_ok)
    names = ("class_labels", "num_tokens", "cfg_scale", "num_steps", "sampler", "guidance_interval", "generator",
             "output_type", "batch_size", "return_dict", "length_histograms")

    def check(out):
        images, lengths = (out.images, out.lengths) if return_dict else out
        assert len(images) == b and lengths.shape == (b,) and lengths.min() >= 1 and lengths.max() <= M
        if kind == "int":
            assert (lengths == int(num_tokens)).all()
        elif kind == "tensor":
            assert torch.equal(lengths, num_tokens)
        if output_type == "pt":
            assert images.shape == (b, 3, SIZE, SIZE) and images.min() >= 0 and images.max() <= 1
        else:
            assert all(image.size == (SIZE, SIZE) and image.mode == "RGB" for image in images)
        if return_dict:
            assert out.tokens.shape == (b, int(lengths.max()), D)
            assert (out.tokens[torch.arange(out.tokens.shape[1])[None] >= lengths[:, None]] == 0).all()

    expect("ClassToImagePipeline", lambda: pipe(labels, num_tokens=num_tokens, cfg_scale=cfg_scale,
                                                num_steps=num_steps, sampler=sampler, guidance_interval=interval,
                                                generator=generator, output_type=output_type, batch_size=batch_size,
                                                return_dict=return_dict),
           names, ok, check)


# ============================================================================================
# the VLM: processor and generate_images
# ============================================================================================
@fuzz(120)
@given(data=st.data())
def test_fuzz_vlm_processor(data):
    from adatok_vlm.configuration_vlm import IMG_TOKEN

    vlm, tok, processor = vlm_parts()
    count = data.draw(st.sampled_from([0, 1, 2]))
    good = st.builds(lambda mode, w, h, seed: (pil_image(mode, w, h, seed, False), True, min(w, h)),
                     st.sampled_from(["RGB", "RGBA", "L", "P", "I;16"]), st.integers(2, 80), st.integers(2, 80),
                     st.integers(0, 2**16))
    drawn = [data.draw(st.one_of(good, good, one_image()), label=f"image {i}") for i in range(count)]
    images = [image for image, _, _ in drawn] if count else None
    placeholders = data.draw(st.sampled_from([count] * 6 + [count + 1, max(count - 1, 0)]))
    text_kind = data.draw(st.sampled_from(["list", "list", "list", "str", "str", "none", "int", "empty"]))
    words = "draw a cat " + " ".join(["<image>"] * placeholders)
    text = {"list": [words], "str": words, "none": None, "int": 5, "empty": []}[text_kind]
    num_image_tokens, kind = data.draw(num_tokens_values(count), label="num_image_tokens")
    if kind == "none":
        num_image_tokens = 4          # the processor's default is "auto", which this AdaTok cannot do
        kind = "int"
    verdicts = [valid for _, valid, _ in drawn]
    tiny = any(side < 2 for _, valid, side in drawn if valid is not False)   # shortest_edge needs 2 px
    images_ok = False if (any(v is False for v in verdicts) or tiny) else (True if all(verdicts) else None)
    tokens_ok = num_tokens_valid(num_image_tokens, kind, count, False, for_forward=False) if count else True
    text_ok = text_kind in ("list", "str") and placeholders == count or (text_kind == "none" and count > 0)
    if count == 0 and text_kind == "none":
        text_ok = False
    ok = (images_ok if text_ok and tokens_ok else False) if count else (text_ok and True)
    names = ("images", "num_image_tokens", "num_tokens", "text", "placeholder", "pass text")

    def check(batch):
        if count:
            lengths = batch["image_lengths"]
            assert lengths.shape == (count,) and lengths.min() >= 1 and lengths.max() <= M
            assert batch["image_tokens"].shape == (int(lengths.sum()), D)
            assert torch.isfinite(batch["image_tokens"]).all()
            if text is not None:
                img_id = tok.convert_tokens_to_ids(IMG_TOKEN)
                assert int((batch["input_ids"] == img_id).sum()) == int(lengths.sum())
            if kind == "int":
                assert (lengths == int(num_image_tokens)).all()

    call_kwargs = {"text": text, "images": images}
    if count:
        call_kwargs["num_image_tokens"] = num_image_tokens
    expect("AdaTokVLMProcessor", lambda: processor(**call_kwargs), names, ok, check)


# Arguments generate_images once let through to fail deep in a layer or to return NaN; each must now
# be a ValueError/TypeError naming the argument (the fuzz test below also draws most of them).
GENERATE_IMAGES_BAD_ARGUMENTS = {
    "input_ids outside the vocabulary": (dict(shift=1000), "input_ids"),
    "negative input_ids": (dict(shift=-100), "input_ids"),
    "empty batch": (dict(rows=0), "input_ids"),
    "empty prompt (T = 0)": (dict(columns=0), "input_ids"),
    "seed not an int": (dict(seed="a"), "seed"),
    "cfg_scale NaN": (dict(cfg_scale=float("nan")), "cfg_scale"),
    "num_flow_steps 0 silently uses the default": (dict(num_flow_steps=0), "num_flow_steps"),
}


def _prompts(tok, rows: int = 2):
    tok.padding_side = "left"
    batch = tok(["draw a cat", "the red shoe is"][:rows] if rows <= 2 else ["draw a cat"] * rows,
                return_tensors="pt", padding=True)
    return batch["input_ids"], batch["attention_mask"]


@pytest.mark.parametrize("case", sorted(GENERATE_IMAGES_BAD_ARGUMENTS))
def test_generate_images_names_the_bad_argument(case):
    vlm, tok, _ = vlm_parts()
    spec, name = GENERATE_IMAGES_BAD_ARGUMENTS[case]
    spec = dict(spec)
    ids, mask = _prompts(tok)
    ids = ids + spec.pop("shift", 0)
    if "rows" in spec:
        ids, mask = ids[: spec.pop("rows")], mask[:0]
    if "columns" in spec:
        ids, mask = ids[:, : spec.pop("columns")], mask[:, :0]
    with pytest.raises((ValueError, TypeError), match=name):
        enc = vlm.generate_images(ids, mask, num_image_tokens=2, **spec)
        assert torch.isfinite(enc.tokens).all(), "NaN tokens"
        raise AssertionError("accepted silently")


@fuzz(200)
@given(data=st.data())
def test_fuzz_vlm_generate_images(data):
    vlm, tok, _ = vlm_parts()
    rows = data.draw(st.sampled_from([1, 2]))
    ids, mask = _prompts(tok, rows)
    ids_kind = data.draw(st.sampled_from(["ok", "ok", "ok", "int32", "float", "1d", "list"]))
    ids_arg = {"ok": ids, "int32": ids.int(), "float": ids.float(), "1d": ids[0], "list": ids.tolist()}[ids_kind]
    mask_kind = data.draw(st.sampled_from(["ok", "ok", "none", "shape", "right_padded"]))
    right = mask.clone()
    right[:, -1] = 0
    mask_arg = {"ok": mask, "none": None, "shape": mask[:, :1], "right_padded": right}[mask_kind]
    length_kind = data.draw(st.sampled_from(["exact", "exact", "bounds", "none"]))
    exact = low = high = None
    if length_kind == "exact":
        exact = data.draw(st.sampled_from([1, 3, M, 0, M + 1, torch.tensor([2] * rows), torch.tensor([2] * (rows + 1)),
                                           2.0, np.int64(2)]))
    elif length_kind == "bounds":
        low = data.draw(st.sampled_from([None, 1, 2, 0]))
        high = data.draw(st.sampled_from([None, 2, 3, M + 1]))
    temperature = data.draw(st.sampled_from([None, 1.0, 0.5, 0.0, -1.0]))
    do_sample = data.draw(st.booleans())
    shift = data.draw(st.sampled_from([0] * 8 + [1000, -100]))
    sampling = data.draw(st.sampled_from([{}, {}, {}, {}, {"seed": 3}, {"cfg_scale": 2.0}, {"num_flow_steps": 2},
                                          {"seed": "a"}, {"cfg_scale": float("nan")}, {"num_flow_steps": 0}]))
    if shift and ids_kind in ("ok", "int32"):
        ids_arg = ids_arg + shift

    def length_ok(v):
        if v is None:
            return True
        if isinstance(v, torch.Tensor):
            return v.shape == (rows,) and int(v.min()) >= 1 and int(v.max()) <= M
        return isinstance(v, int) and 1 <= v <= M
    ids_ok = ids_kind in ("ok", "int32")
    mask_ok = mask_kind in ("ok", "none") and (ids_ok or mask_kind == "none")
    bounds_ok = length_ok(exact) and length_ok(low) and length_ok(high) and \
        not (low is not None and high is not None and low > high)
    sampling_ok = sampling in ({}, {"seed": 3}, {"cfg_scale": 2.0}, {"num_flow_steps": 2})
    ok = ids_ok and not shift and mask_ok and bounds_ok and temperature not in (0.0, -1.0) and sampling_ok
    if ids_kind == "1d" or ids_kind == "list":
        ok = False
    names = ("input_ids", "attention_mask", "left-padded", "num_image_tokens", "min_image_tokens",
             "max_image_tokens", "temperature", "seed", "cfg_scale", "num_flow_steps")

    def check(enc):
        assert enc.lengths.shape == (rows,) and enc.lengths.min() >= 1 and enc.lengths.max() <= M
        if isinstance(exact, int):
            assert (enc.lengths == exact).all()
        if high is not None:
            assert enc.lengths.max() <= high
        assert enc.tokens.shape == (rows, int(enc.lengths.max()), D) and torch.isfinite(enc.tokens).all()

    expect("AdaTokVLMForCausalLM.generate_images",
           lambda: vlm.generate_images(ids_arg, mask_arg, min_image_tokens=low, max_image_tokens=high,
                                       num_image_tokens=exact, temperature=temperature, do_sample=do_sample,
                                       generator=None if "seed" in sampling else torch.Generator().manual_seed(0),
                                       **sampling),
           names, ok, check)


# ============================================================================================
# the trainers' config loading (YAML file + command-line overrides -> each trainer's config)
# ============================================================================================
def trainer_configs() -> dict:
    from adatok_vlm.training import train_dit, train_policy, train_tokenizer, train_vlm

    return {"tokenizer": train_tokenizer.TokenizerTrainingConfig, "policy": train_policy.PolicyTrainingConfig,
            "dit": train_dit.DiTTrainingConfig, "vlm": train_vlm.VLMTrainingConfig}


def config_fields(cls, prefix: str = "") -> list[tuple[str, object]]:
    """Every ``section.field`` of a trainer's config with its type hint (nested dataclasses walked)."""
    import dataclasses
    import typing

    hints, out = typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += config_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, hints[f.name]))
    return out


# The tokenizer's free-form model section: AdaTokConfig fields a YAML file sets.
MODEL_FIELDS = ("hidden_size", "num_latent_tokens", "image_size", "patch_size", "num_encoder_layers",
                "fsq_levels", "ntm_min_tokens", "mlp_ratio", "token_dim")
GARBAGE = ("abc", "", "3e-4", "1e999", "-1", "0", "1", "2.5", "true", "null", float("nan"), float("inf"), -float("inf"),
           10**30, -(10**30), 10**400, 0, -1, 1, 7, 0.5, -0.25, 1e300, True, False, None, [], [0.9], [0.9, 0.99],
           [1, "x"], {}, {"x": [None, {"y": "z"}]}, [[1]], "[8, 5, 5]", "{a: 1}", "!!binary aGk=", "2020-01-01")
SCALARS = (int, float, bool, str)


def _scalar_kinds(hint) -> set:
    """The types a field's hint allows, ``None`` left out (``int | None`` -> ``{int}``)."""
    import types
    import typing

    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    return {a for a in (typing.get_args(hint) if union else (hint,)) if a is not type(None)}


def surely_invalid(hint, value) -> bool:
    """A value no field of this type accepts (the oracle's must-raise cases; everything else may go either way)."""
    kinds = _scalar_kinds(hint)
    if not kinds <= set(SCALARS):          # lists, dicts, Any: left to the field's own checks
        return False
    if isinstance(value, (dict, list)):
        return True
    if isinstance(value, float) and not np.isfinite(value) and kinds & {int, float} and str not in kinds:
        return True
    if isinstance(value, int) and abs(value) > 10**300 and float in kinds and kinds <= {int, float} \
            and int not in kinds:
        return True
    if value is None:
        return False                       # may be a default-able null; the dataclass says
    if isinstance(value, bool):
        return bool(kinds) and bool not in kinds and str not in kinds
    if isinstance(value, str) and str not in kinds:
        try:
            float(value)
        except ValueError:
            return True
    return False


def as_yaml(value) -> str:
    """A value as the YAML text a command line or a file would hold (``.nan``, ``{x: [null]}``...)."""
    import yaml

    if isinstance(value, str):
        return value
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6)
    return text[:-5] if text.endswith("\n...\n") else text.strip()


@fuzz(150)
@given(data=st.data())
def test_fuzz_trainer_config(data, tmp_path_factory):
    """Each trainer's config (``parse_config``: a YAML file, then ``--section.field VALUE`` overrides; the
    tokenizer's model section built into an ``AdaTokConfig`` too) from randomized settings: wrong types, out of
    range, unknown and misspelt keys, nested garbage, huge numbers, NaN/inf, empty strings, lists where scalars
    go, a section given a scalar, broken YAML. Each case builds or raises ValueError/TypeError naming the field."""
    import yaml

    from adatok_vlm.training.config import build_model_config, parse_config

    trainer = data.draw(st.sampled_from(sorted(trainer_configs())), label="trainer")
    cls = trainer_configs()[trainer]
    fields = config_fields(cls)
    flags, file_values, names, verdicts = [], {}, [], {}   # verdicts: key -> (on the command line, valid?)
    for _ in range(data.draw(st.integers(0, 3), label="mutations")):
        kind = data.draw(st.sampled_from(("value", "value", "value", "model", "misspelt", "unknown section",
                                          "scalar section", "broken yaml")), label="kind")
        where = data.draw(st.sampled_from(("cli", "file")), label="where")
        if kind in ("value", "model"):
            if kind == "model":
                if trainer != "tokenizer":
                    continue
                key, hint = "model." + data.draw(st.sampled_from(MODEL_FIELDS)), None
            else:
                key, hint = data.draw(st.sampled_from(fields), label="field")
            value = data.draw(st.sampled_from(GARBAGE), label="value")
        elif kind == "misspelt":
            key, _ = data.draw(st.sampled_from(fields), label="field")
            section, _, leaf = key.rpartition(".")
            cut = data.draw(st.integers(0, len(leaf) - 1))
            leaf = leaf[:cut] + leaf[cut + 1:] + data.draw(st.sampled_from(("", "x", "_")))
            key = f"{section}.{leaf}" if section else leaf
            if key in {k for k, _ in fields} or (trainer in ("tokenizer", "dit", "policy") and section == "model") \
                    or section in ("vlm", "lm.config"):
                continue                   # free-form sections, or the cut made another real field
            value, valid = 1, False
        elif kind == "unknown section":
            key, value, valid = data.draw(st.sampled_from(("bogus.lr", "trian.lr", "Train.lr", "x"))), 1, False
        elif kind == "scalar section":
            key = data.draw(st.sampled_from(sorted({k.split(".")[0] for k, _ in fields if "." in k})))
            value, valid = data.draw(st.sampled_from((5, "abc", [1, 2], None, float("nan")))), False
            if value is None:
                valid = None               # a null section: the dataclass default, or an error naming it
        else:
            key, value, valid, where = "train.betas", "[0.9, 0.99", False, "cli"
        cli = True
        names.append(key.split(".")[0] if kind in ("unknown section", "scalar section") else key.split(".")[-1])
        node = None
        if where == "file" and kind != "broken yaml":
            node = file_values
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else None
                if node is None:
                    break
            if node is not None and isinstance(node.get(leaf), dict):
                node = None
        if node is not None:
            node[leaf], cli = value, False               # the file holds the value itself
        else:
            flags += [f"--{key}", as_yaml(value)]       # the command line's text, read as YAML
            value = yaml.safe_load(as_yaml(value)) if value != "" and kind != "broken yaml" else value
        if kind in ("value", "model"):
            valid = False if hint is not None and surely_invalid(hint, value) else None
        if cli or not verdicts.get(key, (False, None))[0]:
            verdicts[key] = (cli, valid)                # the command line wins over the file; the last flag wins
    outcomes = {v for _, v in verdicts.values()}
    valid = False if False in outcomes else None if None in outcomes else True
    if file_values:
        path = tmp_path_factory.mktemp("fuzz_config") / "config.yaml"
        path.write_text(yaml.safe_dump(file_values, allow_unicode=True))
        flags = ["--config", str(path), *flags]

    def build():
        cfg, _ = parse_config(cls, flags)
        if trainer == "tokenizer":
            build_model_config(cfg.model)
        return cfg

    expect("trainer configs (parse_config)", build, tuple(names), valid,
           lambda cfg: isinstance(cfg, cls))


# ============================================================================================
# the counts
# ============================================================================================
def test_zz_case_counts(tmp_path_factory, capsys):
    """Print and save how many cases each entry point saw (runs last in this file)."""
    table = {}
    for (target, outcome), n in sorted(COUNTS.items()):
        table.setdefault(target, {"accepted": 0, "rejected": 0})[outcome] = n
    total = sum(COUNTS.values())
    lines = [f"fuzz cases: {total} in total"] + [
        f"  {target:40s} {row['accepted'] + row['rejected']:4d} cases: {row['accepted']:4d} worked, "
        f"{row['rejected']:4d} rejected with a named ValueError/TypeError" for target, row in table.items()]
    report = {"mode": FUZZ_MODE, "total": total, "by_entry_point": table}
    path = tmp_path_factory.getbasetemp() / "fuzz_case_counts.json"
    paths = [path] + ([Path(os.environ["ADATOK_FUZZ_REPORT"])] if os.environ.get("ADATOK_FUZZ_REPORT") else [])
    for where in paths:
        where.write_text(json.dumps(report, indent=1))
    with capsys.disabled():
        print(f"\n(mode {FUZZ_MODE}) " + "\n".join(lines) + f"\n  (saved to {', '.join(map(str, paths))})")
    for target, row in table.items():
        assert row["accepted"] > 0 and row["rejected"] > 0, f"{target}: the fuzzing must hit both outcomes"
        if FUZZ_MODE == "full":
            cases = row["accepted"] + row["rejected"]
            assert cases >= FULL_EXAMPLES, f"{target}: {cases} cases, the full mode promises {FULL_EXAMPLES}"
