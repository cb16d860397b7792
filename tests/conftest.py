"""Shared fixtures: tiny AdaTok models built from configs (no downloads), deterministic seeds."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

import adatok_vlm  # noqa: F401  (registers the Auto classes)
from adatok_vlm import AdaTokConfig, AdaTokModel

# One thread: many tests run small ops, which OpenMP's spinning slows badly when cores are shared.
torch.set_num_threads(1)

# A tiny diffusers AutoencoderKL (f4, 4 latent channels), randomly initialised on purpose.
TINY_VAE = {
    "in_channels": 3, "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [8, 16, 16], "layers_per_block": 1, "latent_channels": 4,
    "norm_num_groups": 4, "sample_size": 32, "scaling_factor": 0.5, "shift_factor": 0.1,
}

# Small variants the behaviour tests run over: continuous pixels, FSQ, KL tokens, a VAE space.
TINY_VARIANTS = {
    "continuous": dict(hidden_size=32, num_encoder_layers=2, num_decoder_layers=2, num_attention_heads=2,
                       decoder_hidden_size=32, decoder_num_attention_heads=2, num_latent_tokens=12),
    "fsq": dict(hidden_size=32, num_encoder_layers=2, num_decoder_layers=2, num_attention_heads=2,
                decoder_hidden_size=32, decoder_num_attention_heads=2, num_latent_tokens=12,
                bottleneck="fsq", fsq_levels=[8, 5, 5, 5], token_dim=4),
    "kl": dict(hidden_size=32, num_encoder_layers=2, num_decoder_layers=2, num_attention_heads=2,
               decoder_hidden_size=32, decoder_num_attention_heads=2, num_latent_tokens=12,
               token_regularizer="kl", kl_weight=1e-4),
    "vae": dict(hidden_size=32, num_encoder_layers=2, num_decoder_layers=2, num_attention_heads=2,
                decoder_hidden_size=32, decoder_num_attention_heads=2, num_latent_tokens=12,
                latent_space="vae", vae_config=TINY_VAE, vae_random_init=True, patch_size=2),
}


def tiny_model(variant: str = "continuous", seed: int = 0, **overrides) -> AdaTokModel:
    torch.manual_seed(seed)
    config = AdaTokConfig.from_preset("adatok-tiny", **{**TINY_VARIANTS[variant], **overrides})
    return AdaTokModel(config).eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Torch and BLAS (scipy's sqrtm runs on OpenBLAS) single-threaded for every test module, and
    the torch setting restored after it: tiny ops only wait on thread barriers when cores are shared."""
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def adatok_cache(tmp_path_factory):
    """A private ``$ADATOK_CACHE`` (converted LPIPS / VGG16 weights), shared within a module."""
    root = tmp_path_factory.mktemp("adatok_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADATOK_CACHE", str(root))
        yield root


@pytest.fixture(params=sorted(TINY_VARIANTS))
def variant(request):
    return request.param


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(1234)
    return torch.rand(4, 3, 32, 32, generator=g)
