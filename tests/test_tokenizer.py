"""Behaviour of the AdaTok tokenizer core: nested prefixes, a decoder blind to the masked tail,
per-sample Nested Tail Masking, Hugging Face round trips, gradients, presets."""

import pytest
import torch
import transformers

from adatok_vlm import AdaTokConfig, AdaTokEncoding, AdaTokModel
from adatok_vlm.tokenizer import ADATOK_PRESETS

from conftest import tiny_model


# ----------------------------------------------------------------------------- nested prefixes
def test_tokens_for_length_l_are_the_prefix_of_length_m(variant, images):
    model = tiny_model(variant)
    m = model.num_latent_tokens
    full = model.encode(images, num_tokens=m)
    for length in (1, 2, 5, m - 1, m):
        enc = model.encode(images, num_tokens=length)
        assert enc.tokens.shape == (images.shape[0], length, model.config.token_dim)
        assert torch.equal(enc.lengths, torch.full((images.shape[0],), length))
        torch.testing.assert_close(enc.tokens, full.tokens[:, :length], rtol=0, atol=1e-6)
    per_sample = torch.tensor([1, 3, 7, m])
    enc = model.encode(images, num_tokens=per_sample)
    for b, length in enumerate(per_sample.tolist()):
        torch.testing.assert_close(enc.tokens[b, :length], full.tokens[b, :length], rtol=0, atol=1e-6)
        assert enc.tokens[b, length:].abs().sum() == 0, "padding past a sample's length is zero"


def test_fsq_codes_round_trip_to_tokens(images):
    model = tiny_model("fsq")
    enc = model.encode(images, num_tokens=torch.tensor([2, 5, 12, 7]))
    assert enc.codes.shape == enc.tokens.shape[:2]
    assert (enc.codes[~enc.token_mask] == -1).all()
    valid = enc.codes[enc.token_mask]
    assert valid.min() >= 0 and valid.max() < model.bottleneck.codebook_size
    back = model.bottleneck.codes_to_tokens(enc.codes.clamp(min=0))
    torch.testing.assert_close(back[enc.token_mask], enc.tokens[enc.token_mask])
    torch.testing.assert_close(model.decode_codes(enc.codes, enc.lengths), model.decode(enc.tokens, enc.lengths))


# ----------------------------------------------------------------------------- decoder blindness
def test_values_at_masked_positions_have_no_effect(variant, images):
    model = tiny_model(variant)
    lengths = torch.tensor([1, 4, 9, 12])
    enc = model.encode(images, num_tokens=12)
    ref = model.decode(enc.tokens, lengths)
    mask = torch.arange(12)[None, :] < lengths[:, None]
    for fill in (torch.randn_like(enc.tokens) * 100, torch.full_like(enc.tokens, float("inf")),
                 torch.full_like(enc.tokens, float("nan"))):
        tampered = torch.where(mask[..., None], enc.tokens, fill)
        out = model.decode(tampered, lengths)
        assert (out - ref).abs().max() <= 1e-5


def test_mixed_length_batch_equals_each_sample_alone(variant, images):
    model = tiny_model(variant)
    lengths = torch.tensor([2, 12, 5, 1])
    enc = model.encode(images, num_tokens=lengths)
    batched = model.decode(enc.tokens, enc.lengths)
    for b, length in enumerate(lengths.tolist()):
        alone = model.decode(enc.tokens[b : b + 1, :length], torch.tensor([length]))
        assert (batched[b : b + 1] - alone).abs().max() <= 1e-5
        # Encoding alone gives the same tokens as inside the batch.
        enc_alone = model.encode(images[b : b + 1], num_tokens=length)
        torch.testing.assert_close(enc_alone.tokens[0], enc.tokens[b, :length], rtol=0, atol=1e-5)


def record_decoder_inputs(model) -> tuple[list, object]:
    """``(sequence length, key mask)`` of every call of the decoder's transformer, and the hook's handle."""
    seen = []
    handle = model.decoder.transformer.register_forward_pre_hook(
        lambda module, args: seen.append((args[0].shape[1], args[1])))
    return seen, handle


@pytest.mark.parametrize("variant", ["continuous", "fsq"])
def test_decoder_runs_on_the_longest_kept_prefix_only_and_that_changes_nothing(variant, images):
    """Below ``m`` kept tokens the decoder's transformer sees ``n + max(lengths)`` positions (its cost falls with
    the kept length), with no key mask when every sample keeps the whole cut prefix; and the output equals the
    untrimmed one: the same samples decoded beside one that keeps all ``m``, so nothing is cut there."""
    model = tiny_model(variant)
    m, n = model.num_latent_tokens, model.config.num_patches
    tokens = model.encode(images, num_tokens=m).tokens                  # [4, m, D]
    untrimmed_tokens = torch.cat([tokens, tokens[:1]])                  # a 5th sample keeps all m
    for lengths in ([2, 7, 5, 1], [4, 4, 4, 4], [1, 1, 1, 1], [m - 1, 3, m - 1, 6]):
        lengths = torch.tensor(lengths)
        seen, handle = record_decoder_inputs(model)
        trimmed = model.decode(tokens, lengths)
        untrimmed = model.decode(untrimmed_tokens, torch.cat([lengths, torch.tensor([m])]))[:4]
        trained = model(images, num_tokens=lengths, return_reconstruction=False)
        handle.remove()
        longest, uniform = int(lengths.max()), bool((lengths == lengths[0]).all())
        assert [length for length, _ in seen] == [n + longest, n + m, n + longest]
        assert (seen[0][1] is None) == uniform, "a key mask exactly when some sample's tail is masked"
        assert seen[1][1] is not None
        torch.testing.assert_close(trimmed, untrimmed, rtol=0, atol=1e-5)
        torch.testing.assert_close(trained.latents, model.forward_decoder(untrimmed_tokens,
                                                                          torch.cat([lengths, torch.tensor([m])]))[:4],
                                   rtol=0, atol=1e-5)
        assert (trimmed - model.decode(tokens)).abs().max() > 1e-4, "the cut tokens would have changed the output"


def test_reconstruction_changes_with_length(images):
    model = tiny_model("continuous")
    a = model.decode(*model.encode(images, num_tokens=1).to_tuple()[:2])
    b = model.decode(*model.encode(images, num_tokens=12).to_tuple()[:2])
    assert (a - b).abs().max() > 1e-4, "the decoder must read the tokens it is given"


# ----------------------------------------------------------------------------- Nested Tail Masking
@pytest.mark.parametrize("distribution", ["uniform", "log_uniform"])
def test_training_draws_a_length_per_sample_within_range(distribution):
    model = tiny_model("continuous", ntm_min_tokens=3, ntm_max_tokens=10, ntm_distribution=distribution,
                       ntm_full_prob=0.0).train()
    images = torch.rand(64, 3, 32, 32)
    torch.manual_seed(0)
    out = model(images)
    assert out.lengths.shape == (64,)
    assert out.lengths.min() >= 3 and out.lengths.max() <= 10
    assert len(set(out.lengths.tolist())) >= 4, "lengths vary within one batch"
    many = model.sample_ntm_lengths(20000)
    counts = torch.bincount(many, minlength=11)[3:11].float()
    assert (counts > 0).all(), "every length in [a, b] is drawn"
    if distribution == "uniform":
        assert counts.max() / counts.min() < 1.15
    else:
        assert counts[0] > 2 * counts[-1], "log-uniform favours short prefixes"


def test_eval_forward_keeps_all_tokens_and_matches_decode(images):
    model = tiny_model("continuous")
    out = model(images)
    assert torch.equal(out.lengths, torch.full((4,), 12))
    torch.testing.assert_close(out.reconstruction.clamp(0, 1), model.decode(*model.encode(images).to_tuple()[:2]))
    out5 = model(images, num_tokens=5)
    torch.testing.assert_close(out5.reconstruction.clamp(0, 1),
                               model.decode(*model.encode(images, num_tokens=5).to_tuple()[:2]))


def test_every_trainable_parameter_gets_a_gradient(variant, images):
    model = tiny_model(variant).train()
    torch.manual_seed(3)
    out = model(images)
    out.loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    missing = [n for n, p in trainable if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"parameters without gradient: {missing}"
    if variant == "vae":
        assert all(p.grad is None for p in model.latent_space.parameters()), "the VAE stays frozen"


# ----------------------------------------------------------------------------- Hugging Face form
def test_save_and_auto_model_round_trip(variant, images, tmp_path):
    model = tiny_model(variant)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin")), "weights are saved as safetensors only"
    loaded = transformers.AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is AdaTokModel
    loaded.eval()
    lengths = torch.tensor([1, 3, 12, 6])
    a, b = model.encode(images, num_tokens=lengths), loaded.encode(images, num_tokens=lengths)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.lengths, b.lengths)
    if variant == "fsq":
        assert torch.equal(a.codes, b.codes)
    assert torch.equal(model.decode(a.tokens, a.lengths), loaded.decode(b.tokens, b.lengths))
    cfg = transformers.AutoConfig.from_pretrained(tmp_path)
    assert isinstance(cfg, AdaTokConfig)
    ignore = {"_name_or_path", "architectures"}
    saved = {k: v for k, v in cfg.to_dict().items() if k not in ignore}
    assert saved == {k: v for k, v in model.config.to_dict().items() if k not in ignore}


def test_vae_space_without_weights_is_a_clear_error(tmp_path):
    from conftest import TINY_VAE

    missing = tmp_path / "no-vae-here"
    model = tiny_model("vae", vae_random_init=False, vae_path=str(missing))
    with pytest.raises(FileNotFoundError, match="no-vae-here"):
        model.encode(torch.rand(1, 3, 32, 32))
    model = tiny_model("vae", vae_random_init=False, vae_path=None)
    with pytest.raises(FileNotFoundError, match="vae_path"):
        model.encode(torch.rand(1, 3, 32, 32))


def test_vae_weights_load_from_a_local_diffusers_folder(tmp_path, images):
    from diffusers import AutoencoderKL

    from conftest import TINY_VAE

    torch.manual_seed(7)
    vae = AutoencoderKL(**{k: v for k, v in TINY_VAE.items()})
    vae.save_pretrained(tmp_path / "vae")
    model = tiny_model("vae", vae_random_init=False, vae_path=str(tmp_path / "vae"))
    latents = model.latent_space.encode(images)
    expected = (vae.encode(images * 2 - 1).latent_dist.mean - TINY_VAE["shift_factor"]) * TINY_VAE["scaling_factor"]
    torch.testing.assert_close(latents, expected)
    assert bool(model.latent_space.weights_loaded)


# ----------------------------------------------------------------------------- presets
@pytest.mark.parametrize("name", sorted(ADATOK_PRESETS))
def test_presets_build_consistent_configs(name):
    config = AdaTokConfig.from_preset(name)
    assert config.num_latent_tokens >= 1 and config.image_size % config.latent_downsample == 0
    with torch.device("meta"):
        model = AdaTokModel(config)
    assert model.encoder.suffix_tokens.shape[1] == config.num_latent_tokens


def test_adatok_s_has_the_papers_83m_trainable_parameters():
    model = AdaTokModel(AdaTokConfig.from_preset("adatok-s"))  # builds without the VAE's weights
    trainable = model.num_parameters(only_trainable=True)
    assert abs(trainable - 83e6) / 83e6 < 0.10, trainable
    assert model.config.num_latent_tokens == 256 and model.config.num_patches == 256


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="adatok-xl.*adatok-b"):
        AdaTokConfig.from_preset("adatok-xl")


def test_encoding_is_a_model_output():
    enc = AdaTokEncoding(tokens=torch.zeros(2, 3, 4), lengths=torch.tensor([1, 3]))
    assert enc.token_mask.tolist() == [[True, False, False], [True, True, True]]


@pytest.mark.parametrize("name", sorted(ADATOK_PRESETS))
def test_every_preset_has_a_yaml_config_naming_it(name):
    from pathlib import Path

    from adatok_vlm.training.config import load_yaml

    raw = load_yaml(Path(__file__).resolve().parents[1] / "configs" / "tokenizer" / f"{name}.yaml")
    model = dict(raw["model"])
    assert model.pop("preset") == name
    built, preset = AdaTokConfig.from_preset(name, **model).to_dict(), AdaTokConfig.from_preset(name).to_dict()
    for key, value in model.items():   # every field the YAML sets reaches the config ...
        assert built[key] == value, f"{name}.yaml sets model.{key} = {value!r}, the config has {built[key]!r}"
    # ... and every field it leaves out is the preset's
    assert {k: v for k, v in built.items() if k not in model} == {k: v for k, v in preset.items() if k not in model}


def test_token_noise_is_training_only(images):
    model = tiny_model("continuous", token_regularizer="layernorm", token_noise_std=0.5)
    a, b = model.encode(images), model.encode(images)
    assert torch.equal(a.tokens, b.tokens), "inference is deterministic"
    model.train()
    t1 = model(images, num_tokens=12).tokens
    t2 = model(images, num_tokens=12).tokens
    assert (t1 - t2).abs().mean() > 0.1, "training tokens carry noise"
    assert torch.allclose(a.tokens.pow(2).mean(-1), torch.ones(4, 12), atol=1e-2), "layernorm tokens"


def test_ntm_full_prob_sends_that_share_through_at_full_length():
    model = tiny_model("continuous", ntm_min_tokens=2, ntm_max_tokens=10, ntm_full_prob=0.5).train()
    torch.manual_seed(0)
    lengths = model.sample_ntm_lengths(20000)
    share_full = float((lengths == 10).float().mean())
    assert abs(share_full - (0.5 + 0.5 / 9)) < 0.02
    assert lengths.min() >= 2 and (lengths < 10).any()
