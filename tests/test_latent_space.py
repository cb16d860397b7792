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
