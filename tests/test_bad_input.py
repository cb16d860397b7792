"""Every bad input to encode/decode/forward gets a ValueError/TypeError that names the argument."""

import numpy as np
import pytest
import torch

from conftest import tiny_model

GOOD = torch.rand(2, 3, 32, 32)

PIXEL_CASES = {
    "numpy array": (np.random.rand(2, 3, 32, 32), TypeError),
    "uint8 tensor": ((GOOD * 255).to(torch.uint8), TypeError),
    "rank 3": (GOOD[0], ValueError),
    "rank 5": (GOOD[None], ValueError),
    "one channel": (GOOD[:, :1], ValueError),
    "four channels": (torch.rand(2, 4, 32, 32), ValueError),
    "wrong size": (torch.rand(2, 3, 28, 28), ValueError),
    "not square": (torch.rand(2, 3, 32, 16), ValueError),
    "empty batch": (torch.rand(0, 3, 32, 32), ValueError),
    "nan": (GOOD.clone().index_put_((torch.tensor([0]),), torch.tensor(float("nan"))), ValueError),
    "inf": (GOOD.clone().index_put_((torch.tensor([1]),), torch.tensor(float("inf"))), ValueError),
    "range 0..255": (GOOD * 255, ValueError),
    "range -1..1": (GOOD * 2 - 1, ValueError),
}


@pytest.mark.parametrize("case", sorted(PIXEL_CASES))
@pytest.mark.parametrize("method", ["encode", "forward", "reconstruction_error"])
def test_bad_pixel_values(case, method):
    model = tiny_model()
    value, error = PIXEL_CASES[case]
    with pytest.raises(error, match="pixel_values"):
        getattr(model, method)(value)


NUM_TOKEN_CASES = {
    "zero": (0, ValueError),
    "negative": (-3, ValueError),
    "above m": (13, ValueError),
    "bool": (True, TypeError),
    "float": (2.5, TypeError),
    "float tensor": (torch.tensor([2.0, 3.0]), TypeError),
    "wrong batch": (torch.tensor([2, 3, 4]), ValueError),
    "tensor above m": (torch.tensor([2, 40]), ValueError),
    "tensor zero": (torch.tensor([0, 3]), ValueError),
    "2-d tensor": (torch.tensor([[2, 3]]), ValueError),
    "list": ([2, 3], TypeError),
    "unknown mode": ("fastest", ValueError),
}


@pytest.mark.parametrize("case", sorted(NUM_TOKEN_CASES))
@pytest.mark.parametrize("method", ["encode", "forward"])
def test_bad_num_tokens(case, method):
    model = tiny_model()
    value, error = NUM_TOKEN_CASES[case]
    with pytest.raises(error, match="num_tokens"):
        getattr(model, method)(GOOD, num_tokens=value)


def test_auto_without_a_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="policy"):
        tiny_model().encode(GOOD, num_tokens="auto")


TOKENS = torch.randn(2, 5, 16)
DECODE_CASES = {
    "tokens list": (dict(tokens=[[0.0] * 16]), TypeError, "tokens"),
    "tokens int": (dict(tokens=torch.zeros(2, 5, 16, dtype=torch.long)), TypeError, "tokens"),
    "tokens rank 2": (dict(tokens=torch.randn(5, 16)), ValueError, "tokens"),
    "tokens wrong dim": (dict(tokens=torch.randn(2, 5, 8)), ValueError, "tokens"),
    "tokens too long": (dict(tokens=torch.randn(2, 13, 16)), ValueError, "tokens"),
    "tokens empty": (dict(tokens=torch.randn(2, 0, 16)), ValueError, "tokens"),
    "tokens empty batch": (dict(tokens=torch.randn(0, 5, 16)), ValueError, "tokens"),
    "tokens nan at valid": (dict(tokens=TOKENS.clone().index_fill_(1, torch.tensor([0]), float("nan")),
                                 lengths=torch.tensor([2, 5])), ValueError, "tokens"),
    "lengths float": (dict(tokens=TOKENS, lengths=torch.tensor([1.0, 2.0])), TypeError, "lengths"),
    "lengths list": (dict(tokens=TOKENS, lengths=[1, 2]), TypeError, "lengths"),
    "lengths batch mismatch": (dict(tokens=TOKENS, lengths=torch.tensor([1, 2, 3])), ValueError, "lengths"),
    "lengths zero": (dict(tokens=TOKENS, lengths=torch.tensor([0, 2])), ValueError, "lengths"),
    "lengths beyond tokens": (dict(tokens=TOKENS, lengths=torch.tensor([6, 2])), ValueError, "lengths"),
}


@pytest.mark.parametrize("case", sorted(DECODE_CASES))
def test_bad_decode_input(case):
    kwargs, error, name = DECODE_CASES[case]
    with pytest.raises(error, match=name):
        tiny_model().decode(**kwargs)


def test_decode_codes_needs_fsq_and_integer_codes():
    with pytest.raises(ValueError, match="FSQ"):
        tiny_model().decode_codes(torch.zeros(1, 3, dtype=torch.long))
    fsq = tiny_model("fsq")
    with pytest.raises(ValueError, match="codes"):
        fsq.decode_codes(torch.full((1, 3), 10**6, dtype=torch.long))
    with pytest.raises(TypeError, match="codes"):
        fsq.decode_codes(torch.zeros(1, 3))


@pytest.mark.parametrize("field, value", [
    ("num_latent_tokens", 0), ("hidden_size", 30), ("patch_size", 5), ("latent_space", "jpeg"),
    ("bottleneck", "vq"), ("ntm_min_tokens", 40), ("ntm_distribution", "beta"), ("token_dim", 3.5),
])
def test_bad_config_fields_are_named(field, value):
    from adatok_vlm import AdaTokConfig

    with pytest.raises(ValueError, match=field.split("_")[0]):
        AdaTokConfig.from_preset("adatok-tiny", **{field: value})


def test_fsq_token_dim_must_match_levels():
    from adatok_vlm import AdaTokConfig

    with pytest.raises(ValueError, match="token_dim"):
        AdaTokConfig.from_preset("adatok-tiny", bottleneck="fsq", fsq_levels=[8, 5, 5], token_dim=16)
