"""Determinism on CPU (issue 9): the same seed gives the same tokens, lengths and samples, and an image
encoded alone gives the same tokens (1e-5) and the same policy length as inside a batch."""

from __future__ import annotations

import pytest
import torch

from adatok_vlm import AdaTokDiT, AdaTokDiTConfig
from conftest import tiny_model

VARIANTS = ("continuous", "fsq", "vae")


def batch(seed: int = 7, n: int = 5) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", VARIANTS)
def test_same_seed_same_model_tokens_and_lengths(variant):
    a, b = tiny_model(variant, seed=3, policy_enabled=True), tiny_model(variant, seed=3, policy_enabled=True)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    x = batch()
    for mode in (None, 5, "auto", "search", {"mean_budget": 6}):
        ea, eb = a.encode(x, num_tokens=mode), b.encode(x, num_tokens=mode)
        assert torch.equal(ea.tokens, eb.tokens) and torch.equal(ea.lengths, eb.lengths), mode
    torch.manual_seed(11)
    sa = a.encode(x, num_tokens="sample").lengths
    torch.manual_seed(11)
    sb = b.encode(x, num_tokens="sample").lengths
    assert torch.equal(sa, sb)
    enc = a.encode(x, num_tokens=7)
    assert torch.equal(a.decode(enc.tokens, enc.lengths), b.decode(enc.tokens, enc.lengths))


@pytest.mark.parametrize("variant", VARIANTS)
def test_an_image_alone_or_inside_a_batch_gives_the_same_tokens_and_length(variant):
    model = tiny_model(variant, seed=1, policy_enabled=True)
    with torch.no_grad():   # a policy that prefers different lengths for different images
        for p in model.policy.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    x = batch(n=6)
    full = model.encode(x)
    auto = model.encode(x, num_tokens="auto")
    for i in range(x.shape[0]):
        alone = model.encode(x[i: i + 1])
        torch.testing.assert_close(alone.tokens[0], full.tokens[i], atol=1e-5, rtol=0)
        assert int(model.encode(x[i: i + 1], num_tokens="auto").lengths) == int(auto.lengths[i])
        if full.codes is not None:
            assert torch.equal(alone.codes[0], full.codes[i])
    assert len(set(auto.lengths.tolist())) > 1, "the test policy chooses several lengths"
    # decoding: an image alone or beside longer and shorter ones reconstructs the same
    images = model.decode(auto.tokens, auto.lengths)
    for i in range(x.shape[0]):
        length = int(auto.lengths[i])
        alone = model.decode(auto.tokens[i: i + 1, :length], auto.lengths[i: i + 1])
        torch.testing.assert_close(alone, images[i: i + 1], atol=1e-5, rtol=0)


def test_dit_samples_repeat_with_the_same_generator():
    torch.manual_seed(0)
    dit = AdaTokDiT(AdaTokDiTConfig.from_preset("dit-tiny", token_dim=16, max_tokens=12, num_classes=3)).eval()
    dit.set_length_histograms(torch.ones(3, 12))
    runs = [dit.generate([0, 1, 2, 3], cfg_scale=2.0, num_steps=3, generator=torch.Generator().manual_seed(5))
            for _ in range(2)]
    assert torch.equal(runs[0].tokens, runs[1].tokens) and torch.equal(runs[0].lengths, runs[1].lengths)
    other = dit.generate([0, 1, 2, 3], cfg_scale=2.0, num_steps=3, generator=torch.Generator().manual_seed(6))
    assert not torch.equal(other.tokens[:, :1], runs[0].tokens[:, :1])


def test_ntm_lengths_repeat_with_the_same_generator():
    model = tiny_model().train()
    draws = [model.sample_ntm_lengths(64, generator=torch.Generator().manual_seed(2)) for _ in range(2)]
    assert torch.equal(*draws)
