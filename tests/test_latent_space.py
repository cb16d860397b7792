"""The VAE latent space's normalisations: per-channel statistics (VA-VAE) and the scalar factor (SD-VAE)."""

import pytest
import torch
from diffusers import AutoencoderKL

from adatok_vlm.tokenizer.latent_space import VAELatentSpace
from conftest import tiny_model
from test_vae_convert import TINY_SD, TINY_VA, converted_folder, image_set, stats_argv

from adatok_vlm.training import convert_vae as cv


def vae_reconstruction(vae: AutoencoderKL, pixels: torch.Tensor) -> torch.Tensor:
    """The VAE's own reconstruction of ``pixels`` in [0, 1]: decode(mode(encode(x)))."""
    with torch.no_grad():
        return (vae.decode(vae.encode(pixels * 2 - 1).latent_dist.mode()).sample + 1) * 0.5


@pytest.fixture
def measured(tmp_path):
    """A converted tiny VA-VAE-layout folder whose config.json holds latent-stats' per-channel statistics."""
    vae_dir, source = converted_folder(tmp_path)
    data_dir, _ = image_set(tmp_path, count=4)
    record = cv.latent_stats_main(stats_argv(vae_dir, data_dir, "--limit", "null"))
    return vae_dir, source, record


def test_channel_statistics_normalise_and_reconstruct_like_the_vae(measured):
    vae_dir, source, record = measured
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    mean = torch.tensor(record["latent_mean"]).view(1, -1, 1, 1)
    std = torch.tensor(record["latent_std"]).view(1, -1, 1, 1)
    explicit = VAELatentSpace(TINY_VA, str(vae_dir), latent_mean=record["latent_mean"], latent_std=record["latent_std"])
    adopted = VAELatentSpace(TINY_VA, str(vae_dir))          # picks the statistics up from the folder's config.json
    with torch.no_grad():
        raw = source.encode(pixels * 2 - 1).latent_dist.mode()
    for space in (explicit, adopted):
        latents = space.encode(pixels)
        assert bool(space.has_latent_stats)
        torch.testing.assert_close(latents, (raw - mean) / std, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(space.decode(latents), vae_reconstruction(source, pixels), rtol=1e-5, atol=1e-5)
    # Not the identity normalisation (which would make the comparisons above trivially true).
    assert not torch.allclose(mean, torch.zeros_like(mean), atol=1e-3)
    assert not torch.allclose(std, torch.ones_like(std), atol=1e-3)


def test_adatok_model_keeps_the_folder_statistics_in_its_checkpoint(measured, tmp_path):
    vae_dir, source, record = measured
    model = tiny_model("vae", vae_config=TINY_VA, vae_random_init=False, vae_path=str(vae_dir))
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    latents = model.latent_space.encode(pixels)
    torch.testing.assert_close(model.latent_space.latent_std, torch.tensor(record["latent_std"]))
    model.save_pretrained(tmp_path / "adatok")
    (vae_dir / "config.json").unlink()                    # the reloaded model must not need the VAE folder
    loaded = type(model).from_pretrained(tmp_path / "adatok").eval()
    assert bool(loaded.latent_space.has_latent_stats) and bool(loaded.latent_space.weights_loaded)
    torch.testing.assert_close(loaded.latent_space.encode(pixels), latents)


def test_scalar_factor_stays_the_sd_vae_path(tmp_path):
    vae_dir, source = converted_folder(tmp_path, TINY_SD)
    space = VAELatentSpace(TINY_SD, str(vae_dir))
    pixels = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        raw = source.encode(pixels * 2 - 1).latent_dist.mode()
    assert not bool(space.has_latent_stats)
    torch.testing.assert_close(space.encode(pixels), raw * TINY_SD["scaling_factor"])
    with torch.no_grad():
        torch.testing.assert_close(space.decode(space.encode(pixels)), vae_reconstruction(source, pixels),
                                   rtol=1e-5, atol=1e-5)


def test_an_explicit_scalar_factor_wins_over_the_folder_statistics(measured):
    vae_dir, source, _ = measured
    space = VAELatentSpace(TINY_VA, str(vae_dir), scaling_factor=0.5)
    pixels = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        raw = source.encode(pixels * 2 - 1).latent_dist.mode()
    torch.testing.assert_close(space.encode(pixels), raw * 0.5)
    assert not bool(space.has_latent_stats)


def test_bad_statistics_are_clear_errors():
    channels = TINY_VA["latent_channels"]
    with pytest.raises(ValueError, match="one value per latent channel"):
        VAELatentSpace(TINY_VA, latent_mean=[0.0] * (channels - 1), latent_std=[1.0] * (channels - 1))
    with pytest.raises(ValueError, match="> 0"):
        VAELatentSpace(TINY_VA, latent_mean=[0.0] * channels, latent_std=[1.0] * (channels - 1) + [0.0])
    with pytest.raises(ValueError, match="both"):
        VAELatentSpace(TINY_VA, latent_mean=[0.0] * channels)
    with pytest.raises(ValueError, match="replace vae_scaling_factor"):
        VAELatentSpace(TINY_VA, scaling_factor=0.5, latent_mean=[0.0] * channels, latent_std=[1.0] * channels)
    with pytest.raises(TypeError, match="list of"):
        VAELatentSpace(TINY_VA, latent_mean="zero", latent_std=[1.0] * channels)


def test_config_statistics_reach_the_model(measured):
    vae_dir, _, _ = measured
    channels = TINY_VA["latent_channels"]
    mean, std = [0.5] * channels, [2.0] * channels     # explicit: they win over the folder's statistics
    model = tiny_model("vae", vae_config=TINY_VA, vae_random_init=False, vae_path=str(vae_dir),
                       vae_latent_mean=mean, vae_latent_std=std)
    model.latent_space.encode(torch.rand(1, 3, 32, 32))
    torch.testing.assert_close(model.latent_space.latent_mean, torch.tensor(mean))
    torch.testing.assert_close(model.latent_space.latent_std, torch.tensor(std))


# ----------------------------------------------------------------------------- speed options
def first_conv_inputs(space: VAELatentSpace) -> list:
    """The inputs the VAE encoder's and decoder's first convolutions receive (a hook records them)."""
    seen = []
    for conv in (space.vae.encoder.conv_in, space.vae.decoder.conv_in):
        conv.register_forward_hook(lambda module, args, out: seen.append((args[0], out.dtype)))
    return seen


def twin_spaces(config: dict, **options) -> tuple[VAELatentSpace, VAELatentSpace]:
    """The default space and one built with ``options``, holding the same random VAE weights."""
    torch.manual_seed(0)
    default = VAELatentSpace(config, random_init=True, channels_last=False)
    other = VAELatentSpace(config, random_init=True, **options)
    other.load_state_dict(default.state_dict())
    return default, other


@pytest.mark.parametrize("arch", ["tiny-va", "va-vae-f16d32"])
def test_channels_last_encode_and_decode_equal_the_default(arch):
    """NHWC activations (the default) give the NCHW results to float rounding, in the ordinary layout, with the
    same gradients into the decoder's input; the real VA-VAE f16d32 architecture runs at 64x64 to stay small."""
    from adatok_vlm.tokenizer.configuration_adatok import VAE_ARCHITECTURES

    config, size = (TINY_VA, 32) if arch == "tiny-va" else (VAE_ARCHITECTURES["va-vae-f16d32"], 64)
    nchw, nhwc = twin_spaces(config, channels_last=True)
    assert VAELatentSpace(config, random_init=True).channels_last, "channels-last is the default"
    seen_nchw, seen_nhwc = first_conv_inputs(nchw), first_conv_inputs(nhwc)
    pixels = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    ref, got = nchw.encode(pixels), nhwc.encode(pixels)
    assert got.is_contiguous() and got.dtype == pixels.dtype
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
    latents = [ref.clone().requires_grad_(True) for _ in range(2)]
    images = [space.decode(z) for space, z in zip((nchw, nhwc), latents)]
    assert images[1].is_contiguous() and images[1].shape == pixels.shape
    assert (images[1] - images[0]).abs().max() <= 1e-4 * images[0].abs().max()
    for image in images:
        image.square().mean().backward()   # LPIPS and the GAN back-propagate through the frozen decoder
    assert (latents[1].grad - latents[0].grad).abs().max() <= 1e-3 * latents[0].grad.abs().max()
    assert all(x.is_contiguous() for x, _ in seen_nchw)
    assert all(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() for x, _ in seen_nhwc)


def test_autocast_runs_the_vae_alone_in_bf16_and_returns_the_callers_dtype():
    fp32, bf16 = twin_spaces(TINY_VA, autocast="bfloat16")
    seen = first_conv_inputs(bf16)
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    ref, got = fp32.encode(pixels), bf16.encode(pixels)
    assert got.dtype == torch.float32 and bf16.decode(got).dtype == torch.float32
    assert [dtype for _, dtype in seen] == [torch.bfloat16, torch.bfloat16], "both convolutions ran under autocast"
    err = float((got - ref).abs().max() / ref.abs().max())
    assert 0 < err < 0.1, f"bf16 latents differ from fp32 by {err:.3g} of their range"
    assert fp32.autocast is None, "off unless asked for"


def test_bad_speed_options_are_clear_errors():
    with pytest.raises(ValueError, match="autocast must be None or one of"):
        VAELatentSpace(TINY_VA, random_init=True, autocast="int8")
    with pytest.raises(TypeError, match="channels_last must be a bool"):
        VAELatentSpace(TINY_VA, random_init=True, channels_last="yes")


def test_the_model_config_sets_the_vae_autocast_and_checks_it():
    """``AdaTokConfig.vae_autocast`` reaches the model's latent space (and survives save/load); a bad value is a
    ValueError naming the field, not a failure at the first encode."""
    from adatok_vlm import AdaTokConfig

    model = tiny_model("vae", vae_config=TINY_VA, vae_autocast="bfloat16")
    assert model.latent_space.autocast == "bfloat16"
    assert AdaTokConfig.from_dict(model.config.to_dict()).vae_autocast == "bfloat16"
    assert tiny_model("vae", vae_config=TINY_VA).latent_space.autocast is None
    with pytest.raises(ValueError, match="AdaTokConfig.vae_autocast must be None or one of"):
        AdaTokConfig(latent_space="vae", vae_config=TINY_VA, vae_autocast="int8")
