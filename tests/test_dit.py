"""Behaviour of the class-conditional DiT over variable-length tokens, flow matching and sampling.

Tiny models on CPU. Zero-initialised (adaLN-Zero) layers are perturbed where a test needs a model
whose output depends on its inputs.
"""

import math

import pytest
import torch
import transformers

from adatok_vlm.generator import (
    DIT_PRESETS,
    AdaTokDiT,
    AdaTokDiTConfig,
    ClassToImagePipeline,
    LengthGroupedBatchSampler,
    LengthSampler,
    RunningTokenStats,
    VarLenCollator,
    drop_class_labels,
    flow_matching_loss,
    guided_velocity,
    sample_flow,
    sample_timesteps,
)
from adatok_vlm.registration import register
from adatok_vlm.tokenizer import AdaTokEncoding

from conftest import tiny_model

D, M, C = 6, 12, 4


def tiny_config(**overrides) -> AdaTokDiTConfig:
    return AdaTokDiTConfig.from_preset("dit-tiny", **{"token_dim": D, "max_tokens": M, "num_classes": C,
                                                      "hidden_size": 32, "num_heads": 2, **overrides})


def tiny_dit(seed: int = 0, randomize: bool = True, **overrides) -> AdaTokDiT:
    torch.manual_seed(seed)
    model = AdaTokDiT(tiny_config(**overrides)).eval()
    if randomize:  # leave adaLN-Zero's identity start: every input must matter
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
    return model


def batch(b: int = 4, length: int = M, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(b, length, D, generator=g)
    t = torch.rand(b, generator=g)
    labels = torch.randint(0, C + 1, (b,), generator=g)
    return tokens, t, labels


# ============================================================================================
# config and presets
# ============================================================================================
# DiT paper Table 4 parameter counts (M); ours differ only by the length embedder and learned positions.
PAPER_PARAMS = {"dit-s": 33.0, "dit-b": 130.5, "dit-l": 458.0, "dit-xl": 675.0}


@pytest.mark.parametrize("name", sorted(DIT_PRESETS))
def test_presets_build_with_paper_sizes(name):
    cfg = AdaTokDiTConfig.from_preset(name, token_dim=16, max_tokens=256, num_classes=1000)
    assert cfg.model_type == "adatok_dit"
    with torch.device("meta"):
        model = AdaTokDiT(cfg)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    if name in PAPER_PARAMS:
        assert abs(params - PAPER_PARAMS[name]) / PAPER_PARAMS[name] < 0.015
    if name == "dit-xl":
        assert (cfg.hidden_size, cfg.depth, cfg.num_heads) == (1152, 28, 16)


@pytest.mark.parametrize("overrides, match", [
    (dict(learn_sigma=True), "learn_sigma"),
    (dict(hidden_size=30, num_heads=4), "divisible"),
    (dict(pos_embed="rope"), "pos_embed"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(class_dropout_prob=1.0), "class_dropout_prob"),
    (dict(length_histograms=[[1] * M] * (C - 1)), "length_histograms"),
    (dict(length_histograms=[[0] * M] * C), "all zeros"),
    (dict(token_mean=[0.0] * (D - 1), token_std=[1.0] * (D - 1)), "token_mean"),
    (dict(token_mean=[0.0] * D), "together"),
    (dict(token_mean=[0.0] * D, token_std=[0.0] * D), "token_std"),
])
def test_config_rejects_bad_fields(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**overrides)


def test_unknown_preset():
    with pytest.raises(ValueError, match="dit-tiny"):
        AdaTokDiTConfig.from_preset("dit-huge", token_dim=D, max_tokens=M, num_classes=C)


def test_fresh_model_is_adaln_zero():
    model = tiny_dit(randomize=False)
    tokens, t, labels = batch()
    assert torch.equal(model(tokens, t, labels, torch.full((4,), M)), torch.zeros(4, M, D))


# ============================================================================================
# masking: padded positions have no effect, the work follows the real lengths
# ============================================================================================
@pytest.mark.parametrize("pos_embed", ["learned", "sinusoidal"])
@pytest.mark.parametrize("fill", [float("nan"), float("inf"), -float("inf"), 1e4, "random"])
def test_padded_inputs_have_no_effect(pos_embed, fill):
    model = tiny_dit(pos_embed=pos_embed)
    tokens, t, labels = batch()
    lengths = torch.tensor([1, 5, 12, 8])
    ref = model(tokens, t, labels, lengths)
    pad = ~(torch.arange(M)[None] < lengths[:, None])
    perturbed = tokens.clone()
    perturbed[pad] = torch.randn(int(pad.sum()), D) * 50 if fill == "random" else fill
    out = model(perturbed, t, labels, lengths)
    torch.testing.assert_close(out[~pad], ref[~pad], atol=1e-5, rtol=0)
    assert torch.equal(out[pad], torch.zeros_like(out[pad]))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("pos_embed", ["learned", "sinusoidal"])
def test_mixed_length_batch_equals_samples_alone(pos_embed):
    model = tiny_dit(pos_embed=pos_embed)
    tokens, t, labels = batch()
    lengths = torch.tensor([3, 12, 1, 7])
    out = model(tokens, t, labels, lengths)
    for i in range(4):
        n = int(lengths[i])
        alone = model(tokens[i : i + 1, :n], t[i : i + 1], labels[i : i + 1], lengths[i : i + 1])
        torch.testing.assert_close(out[i, :n], alone[0], atol=1e-5, rtol=0)


def test_sequence_is_cut_at_longest_length():
    model = tiny_dit()
    tokens, t, labels = batch()
    lengths = torch.tensor([2, 5, 3, 4])
    seen = []
    hook = model.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    out = model(tokens, t, labels, lengths)
    hook.remove()
    assert seen == [5] and out.shape == (4, M, D)
    torch.testing.assert_close(out[:, :5], model(tokens[:, :5], t, labels, lengths), atol=1e-6, rtol=0)


def test_forward_checks_its_inputs():
    model = tiny_dit()
    tokens, t, labels = batch()
    lengths = torch.full((4,), 6)
    with pytest.raises(ValueError, match="tokens"):
        model(tokens[..., :3], t, labels, lengths)
    with pytest.raises(TypeError, match="lengths"):
        model(tokens, t, labels, lengths.float())
    with pytest.raises(ValueError, match="lengths must lie in 1..6"):
        model(tokens[:, :6], t, labels, torch.tensor([1, 2, 3, 7]))
    with pytest.raises(ValueError, match="lengths"):
        model(tokens, t, labels, torch.tensor([0, 2, 3, 4]))
    with pytest.raises(ValueError, match="class_labels must lie in 0..4"):
        model(tokens, t, torch.tensor([0, 1, 2, 5]), lengths)
    with pytest.raises(ValueError, match="timesteps"):
        model(tokens, t[:2], labels, lengths)
    with pytest.raises(ValueError, match="class_labels"):
        model(tokens, t, labels[:3], lengths)


def test_gradient_checkpointing_gives_same_gradients():
    tokens, t, labels = batch()
    lengths = torch.tensor([3, 12, 1, 7])
    grads = []
    for checkpointing in (False, True):
        model = tiny_dit().train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(tokens, t, labels, lengths).pow(2).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


# ============================================================================================
# flow matching objective
# ============================================================================================
def test_loss_ignores_padding():
    model = tiny_dit()
    tokens, _, labels = batch()
    labels = labels.clamp_max(C - 1)
    lengths = torch.tensor([2, 12, 5, 9])
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(4, M, D, generator=g)
    t = torch.rand(4, generator=g)
    kw = dict(null_class=C, class_dropout_prob=0.0, timesteps=t)
    ref = flow_matching_loss(model, tokens, lengths, labels, noise=noise, **kw).loss
    pad = ~(torch.arange(M)[None] < lengths[:, None])
    bad_tokens, bad_noise = tokens.clone(), noise.clone()
    bad_tokens[pad], bad_noise[pad] = float("nan"), 1e6
    tokens_req = bad_tokens.clone().requires_grad_(True)
    out = flow_matching_loss(model, tokens_req, lengths, labels, noise=bad_noise, **kw)
    torch.testing.assert_close(out.loss, ref, atol=1e-6, rtol=0)
    out.loss.backward()
    assert torch.isfinite(tokens_req.grad).all() and torch.isfinite(model.x_embedder.weight.grad).all()
    assert torch.equal(tokens_req.grad[pad], torch.zeros_like(tokens_req.grad[pad]))


def test_loss_is_velocity_mse_over_valid_tokens():
    tokens, _, labels = batch()
    lengths = torch.tensor([2, 12, 5, 9])
    noise, t = torch.randn(4, M, D), torch.rand(4)
    seen = {}

    def zero_model(x, t_, y, lengths_):
        seen["x"] = x
        return torch.zeros_like(x)

    out = flow_matching_loss(zero_model, tokens, lengths, labels, null_class=C, class_dropout_prob=0.0,
                             noise=noise, timesteps=t)
    valid = torch.arange(M)[None] < lengths[:, None]
    expected = (noise - tokens)[valid].pow(2).mean()
    torch.testing.assert_close(out.loss, expected)
    x_t = (1 - t[:, None, None]) * tokens + t[:, None, None] * noise
    torch.testing.assert_close(seen["x"][valid], x_t[valid])


def test_class_dropout_and_time_sampling():
    g = torch.Generator().manual_seed(0)
    labels = torch.zeros(20000, dtype=torch.long)
    dropped = drop_class_labels(labels, null_class=C, prob=0.1, generator=g)
    assert set(dropped.unique().tolist()) == {0, C}
    assert abs((dropped == C).float().mean().item() - 0.1) < 0.01
    t = sample_timesteps(20000, "logit_normal", generator=g)
    assert 0 < t.min() and t.max() < 1 and abs(t.median().item() - 0.5) < 0.02
    # logit-normal puts less mass near the ends than uniform
    u = sample_timesteps(20000, "uniform", generator=g)
    assert (t < 0.1).float().mean() < (u < 0.1).float().mean()
    with pytest.raises(ValueError, match="time distribution"):
        sample_timesteps(4, "beta")


# ============================================================================================
# sampling and classifier-free guidance
# ============================================================================================
def test_cfg_scale_one_is_the_conditional_model():
    model = tiny_dit()
    tokens, t, labels = batch()
    labels = labels.clamp_max(C - 1)
    lengths = torch.tensor([2, 12, 5, 9])
    cond = model(tokens, torch.full((4,), 0.3), labels, lengths)
    torch.testing.assert_close(guided_velocity(model, tokens, 0.3, labels, lengths, null_class=C, cfg_scale=1.0), cond)
    null = model(tokens, torch.full((4,), 0.3), torch.full_like(labels, C), lengths)
    guided = guided_velocity(model, tokens, 0.3, labels, lengths, null_class=C, cfg_scale=3.0)
    torch.testing.assert_close(guided, null + 3.0 * (cond - null), atol=1e-5, rtol=1e-5)
    # outside the guidance interval: the conditional model again
    outside = guided_velocity(model, tokens, 0.3, labels, lengths, null_class=C, cfg_scale=3.0,
                              guidance_interval=(0.5, 1.0))
    torch.testing.assert_close(outside, cond)
    noise = torch.randn(4, M, D)
    a = sample_flow(model, noise, labels, lengths, null_class=C, num_steps=4, cfg_scale=1.0)
    b = sample_flow(model, noise, labels, lengths, null_class=C, num_steps=4, cfg_scale=3.0,
                    guidance_interval=(0.0, 0.0))
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("sampler, order", [("euler", 1), ("heun", 2)])
def test_samplers_integrate_a_known_ode(sampler, order):
    # v(x, t) = x  =>  x(0) = x(1) * exp(-1): Euler converges at first order, Heun at second.
    noise = torch.randn(2, 5, D)
    lengths = torch.tensor([5, 3])
    labels = torch.zeros(2, dtype=torch.long)
    exact = noise * math.exp(-1.0)
    exact[1, 3:] = 0
    errors = [(sample_flow(lambda x, t, y, n: x, noise, labels, lengths, null_class=C, num_steps=s,
                           sampler=sampler) - exact).abs().max().item() for s in (8, 16)]
    assert 2 ** order * 0.8 < errors[0] / errors[1] < 2 ** order * 1.25


# ============================================================================================
# length sampler
# ============================================================================================
def test_length_sampler_reproduces_histograms():
    hist = torch.zeros(3, M)
    hist[0, [0, 3, 11]] = torch.tensor([1.0, 2.0, 7.0])
    hist[1, 5] = 4.0                                   # a single length
    sampler = LengthSampler(hist)                      # row 2 is empty: falls back to the pooled counts
    assert sampler.empty_classes == [2]
    g = torch.Generator().manual_seed(0)
    n = 20000
    for label, probs in ((0, hist[0] / hist[0].sum()), (2, hist.sum(0) / hist.sum()), (3, hist.sum(0) / hist.sum())):
        draws = sampler.sample(torch.full((n,), label), generator=g)
        assert draws.min() >= 1 and draws.max() <= M
        counts = torch.bincount(draws - 1, minlength=M).double()
        expected = probs.double() * n
        support = expected > 0
        assert counts[~support].sum() == 0
        chi2 = ((counts[support] - expected[support]) ** 2 / expected[support]).sum().item()
        assert chi2 < 25.0   # a handful of degrees of freedom: ~1e-5 false-alarm rate
    assert torch.equal(sampler.sample(torch.ones(100, dtype=torch.long)), torch.full((100,), 6))
    lengths = torch.tensor([1, 4, 4, 12, 6, 6, 6, 6])
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    built = LengthSampler.from_lengths(lengths, labels, num_classes=3, max_tokens=M)
    assert built.to_list()[0][3] == 2 and built.to_list()[1][5] == 4 and sum(built.to_list()[2]) == 0
    torch.testing.assert_close(built.mean_lengths()[:2], torch.tensor([21 / 4, 6.0], dtype=torch.float64))


def test_length_sampler_bad_input():
    with pytest.raises(ValueError, match="non-negative"):
        LengthSampler([[1, -1, 0]])
    with pytest.raises(ValueError, match="lengths"):
        LengthSampler.from_lengths(torch.tensor([0, 3]), torch.tensor([0, 1]), num_classes=2, max_tokens=M)
    with pytest.raises(ValueError, match="labels"):
        LengthSampler.from_lengths(torch.tensor([1, 3]), torch.tensor([0, 2]), num_classes=2, max_tokens=M)
    with pytest.raises(ValueError, match="class_labels must lie in 0..3"):
        LengthSampler([[1] * M] * 3).sample(torch.tensor([4]))


# ============================================================================================
# generate
# ============================================================================================
def with_histograms(model: AdaTokDiT) -> AdaTokDiT:
    hist = torch.zeros(C, M, dtype=torch.long)
    hist[0, 2] = 5           # class 0: always 3 tokens
    hist[1, [4, 8]] = 1      # class 1: 5 or 9
    hist[2:, 11] = 3         # classes 2, 3: 12
    model.set_length_histograms(hist)
    return model


def test_generate_returns_exactly_the_requested_lengths():
    model = with_histograms(tiny_dit())
    labels = torch.tensor([0, 1, 2, 3, 1])
    enc = model.generate(labels, num_tokens=4, num_steps=2)
    assert isinstance(enc, AdaTokEncoding) and enc.tokens.shape == (5, 4, D) and enc.lengths.tolist() == [4] * 5
    per_sample = torch.tensor([1, 12, 3, 7, 2])
    enc = model.generate(labels, num_tokens=per_sample, num_steps=2, sampler="heun", cfg_scale=2.0)
    assert enc.lengths.tolist() == per_sample.tolist() and enc.tokens.shape == (5, M, D)
    assert not enc.tokens[~enc.token_mask].any() and enc.tokens[enc.token_mask].abs().min() > 0
    enc = model.generate(labels.repeat(4), num_steps=1, generator=torch.Generator().manual_seed(0))
    lengths = enc.lengths.view(4, 5)
    assert (lengths[:, 0] == 3).all() and (lengths[:, 2:4] == 12).all()
    assert set(lengths[:, [1, 4]].flatten().tolist()) <= {5, 9}
    assert enc.tokens.shape[1] == int(enc.lengths.max())
    hist = torch.zeros(C, M, dtype=torch.long)
    hist[:, 6] = 1                                   # new histograms replace the cached sampler
    model.set_length_histograms(hist)
    assert model.generate(labels, num_steps=1).lengths.tolist() == [7] * 5


def test_generate_is_reproducible_and_denormalises():
    model = with_histograms(tiny_dit(randomize=False))     # fresh adaLN-Zero: velocity 0, output = noise
    model.set_token_statistics(torch.arange(D, dtype=torch.float32), torch.full((D,), 1e-3))
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    a = model.generate([0, 1, 2], generator=g(), num_steps=3)
    b = model.generate([0, 1, 2], generator=g(), num_steps=3)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.lengths, b.lengths)
    valid = a.token_mask
    expected = torch.arange(D, dtype=torch.float32).expand(3, a.tokens.shape[1], D)
    torch.testing.assert_close(a.tokens[valid], expected[valid], atol=0.01, rtol=0)
    normed = model.normalize_tokens(a.tokens, a.lengths)
    torch.testing.assert_close(model.denormalize_tokens(normed, a.lengths), a.tokens)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(class_labels=torch.tensor([0, 5])), ValueError, "class_labels must lie in 0..4"),
    (dict(class_labels=torch.tensor([0.0, 1.0])), TypeError, "class_labels"),
    (dict(class_labels=torch.tensor([[0, 1]])), ValueError, "class_labels"),
    (dict(class_labels="cat"), TypeError, "class_labels"),
    (dict(num_tokens=0), ValueError, "num_tokens must lie in 1..12"),
    (dict(num_tokens=M + 1), ValueError, "num_tokens"),
    (dict(num_tokens=torch.tensor([1, 2, 3])), ValueError, "num_tokens"),
    (dict(num_tokens=torch.tensor([1.0, 2.0])), TypeError, "num_tokens"),
    (dict(num_tokens="auto"), ValueError, "num_tokens"),
    (dict(cfg_scale=0.5), ValueError, "cfg_scale"),
    (dict(cfg_scale="4"), TypeError, "cfg_scale"),
    (dict(num_steps=0), ValueError, "num_steps"),
    (dict(sampler="dpm"), ValueError, "sampler"),
    (dict(guidance_interval=(0.8, 0.2)), ValueError, "guidance_interval"),
])
def test_generate_rejects_bad_input(kwargs, error, match):
    model = tiny_dit()
    kwargs = {"class_labels": torch.tensor([0, 1]), "num_tokens": 3, "num_steps": 1, **kwargs}
    with pytest.raises(error, match=match):
        model.generate(**kwargs)


def test_generate_without_histograms_says_what_to_do():
    with pytest.raises(ValueError, match="length_histograms"):
        tiny_dit().generate(torch.tensor([0, 1]), num_steps=1)


# ============================================================================================
# save / load
# ============================================================================================
@pytest.mark.parametrize("pos_embed", ["learned", "sinusoidal"])
def test_save_load_round_trip_through_auto_model(tmp_path, pos_embed):
    register()
    model = with_histograms(tiny_dit(pos_embed=pos_embed))
    model.set_token_statistics(torch.linspace(-1, 1, D), torch.linspace(0.5, 2, D))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    loaded = transformers.AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is AdaTokDiT
    assert loaded.config.length_histograms == model.config.length_histograms
    assert loaded.config.token_mean == model.config.token_mean
    tokens, t, labels = batch()
    lengths = torch.tensor([2, 12, 5, 9])
    assert torch.equal(loaded(tokens, t, labels, lengths), model(tokens, t, labels, lengths))
    a = model.generate([0, 1, 3], cfg_scale=2.0, num_steps=2, generator=torch.Generator().manual_seed(1))
    b = loaded.generate([0, 1, 3], cfg_scale=2.0, num_steps=2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.lengths, b.lengths)
    assert isinstance(transformers.AutoConfig.from_pretrained(tmp_path), AdaTokDiTConfig)


# ============================================================================================
# training smoke test: synthetic cached tokens, class-dependent means and lengths
# ============================================================================================
def synthetic_tokens(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (n,), generator=g)
    means = torch.linspace(-2, 2, C)[:, None].expand(C, D) * torch.tensor([1.0, -1.0]).repeat(D // 2)
    lengths = (2 + 3 * labels + torch.randint(0, 2, (n,), generator=g)).clamp_max(M)
    items = []
    for i in range(n):
        x = means[labels[i]] + 0.3 * torch.randn(int(lengths[i]), D, generator=g)
        items.append({"tokens": x, "length": int(lengths[i]), "label": int(labels[i])})
    return items, lengths, labels


def test_training_reduces_the_loss():
    items, lengths, labels = synthetic_tokens(512)
    sampler = LengthGroupedBatchSampler(lengths, batch_size=32, seed=0, mega_batch_mult=4)
    loader = torch.utils.data.DataLoader(items, batch_sampler=sampler, collate_fn=VarLenCollator())
    torch.manual_seed(0)
    model = AdaTokDiT(tiny_config(hidden_size=64, num_heads=4)).train()
    stats = RunningTokenStats(D)
    for b in loader:
        stats.update(b["tokens"], b["lengths"])
    model.set_token_statistics(stats.mean, stats.std)
    model.set_length_histograms(LengthSampler.from_lengths(lengths, labels, C, M))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    losses, step = [], 0
    while step < 50:
        sampler.set_epoch(step)
        for b in loader:
            x0 = model.normalize_tokens(b["tokens"], b["lengths"])
            out = flow_matching_loss(model, x0, b["lengths"], b["labels"], null_class=model.null_class,
                                     class_dropout_prob=model.config.class_dropout_prob, generator=g)
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            losses.append(out.loss.item())
            step += 1
            if step == 50:
                break
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.75 * first, (first, last)
    model.eval()
    enc = model.generate(torch.tensor([0, C - 1] * 8), cfg_scale=2.0, num_steps=10, generator=g)
    # the generated lengths follow the class-dependent data lengths
    assert set(enc.lengths[::2].tolist()) <= {2, 3} and set(enc.lengths[1::2].tolist()) <= {11, 12}


# ============================================================================================
# pipeline
# ============================================================================================
def test_pipeline_generates_images_with_the_lengths_used(tmp_path):
    adatok = tiny_model("continuous")           # token_dim 16, 12 tokens, 32x32 images
    dit = with_histograms(AdaTokDiT(tiny_config(token_dim=16)).eval())
    pipe = ClassToImagePipeline(dit, adatok)
    images = pipe([0, 2, 1], num_steps=2, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert len(images) == 3 and images[0].size == (32, 32) and images[0].mode == "RGB"
    assert images.lengths[0] == 3 and images.lengths[1] == 12 and images.lengths[2] in (5, 9)
    out = pipe(torch.tensor([1, 3]), num_tokens=torch.tensor([2, 7]), num_steps=2, output_type="pt", batch_size=1)
    assert out.images.shape == (2, 3, 32, 32) and out.lengths.tolist() == [2, 7]
    assert 0 <= out.images.min() and out.images.max() <= 1
    expected = adatok.decode(out.tokens, out.lengths)
    torch.testing.assert_close(out.images, expected)
    images, lengths = pipe(3, num_tokens=4, num_steps=1, return_dict=False)
    assert len(images) == 1 and lengths.tolist() == [4]
    dit.save_pretrained(tmp_path / "dit")
    adatok.save_pretrained(tmp_path / "adatok")
    loaded = ClassToImagePipeline.from_pretrained(tmp_path / "dit", tmp_path / "adatok")
    kw = dict(num_steps=2, cfg_scale=3.0, output_type="pt")
    a = pipe([1, 2], generator=torch.Generator().manual_seed(4), **kw)
    b = loaded([1, 2], generator=torch.Generator().manual_seed(4), **kw)
    assert torch.equal(a.images, b.images) and torch.equal(a.lengths, b.lengths)
    with pytest.raises(ValueError, match="token_dim"):
        ClassToImagePipeline(AdaTokDiT(tiny_config(token_dim=8)), adatok)
    with pytest.raises(ValueError, match="num_latent_tokens"):
        ClassToImagePipeline(AdaTokDiT(tiny_config(token_dim=16, max_tokens=13)), adatok)
    with pytest.raises(ValueError, match="output_type"):
        pipe([0], output_type="np")
