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


# ============================================================================================
# the order of a parallel run: the long modules first, spread over the workers
# ============================================================================================
# The modules whose tests take the longest, with their seconds: the sum of their tests among the 60 slowest
# (`--durations=60`, setup + call) of one `make test` on the 2 shared development cores (2026-12-02). Whole
# modules move, never single tests, because their tests share module-scoped fixtures (the rehearsal, the
# DeepSpeed launches) that must stay on one worker.
LONG_MODULES = {
    "test_rehearse.py": 354, "test_multiproc_faults.py": 217, "test_deepspeed.py": 137,
    "test_fid_reference.py": 125, "test_train_vlm.py": 72, "test_faults.py": 59, "test_vlm.py": 59,
    "test_train_policy.py": 58, "test_checkpointing.py": 47, "test_checkpoint_integrity.py": 45,
    "test_vlm_processor.py": 38, "test_stream_training.py": 38, "test_fuzz_inputs.py": 30,
    "test_train_tokenizer.py": 28, "test_benchmarks.py": 20, "test_model_cards.py": 20, "test_demo.py": 18,
}


def long_first_order(items: list, workers: int, seconds: dict = LONG_MODULES) -> list:
    """``items`` reordered for ``--dist worksteal`` on ``workers`` workers, which hands worker ``k`` the ``k``-th
    of ``workers`` contiguous, near-equal slices of the collection and lets an idle worker steal from the end
    of another's queue: the long modules are dealt to the slices longest first, each to the slice with the
    least seconds so far, and head their slice, so no worker ends the run alone on a long test; the other
    tests fill the slices in their collected order. Order within a module is kept. With fewer than two
    workers, or long modules that do not fit their slices, the long modules simply come first."""
    groups: dict[str, list] = {}
    rest = []
    for item in items:
        name = item.path.name
        (groups.setdefault(name, []) if name in seconds else rest).append(item)
    ranked = sorted(groups, key=lambda name: -seconds[name])
    if workers < 2:
        return [item for name in ranked for item in groups[name]] + rest
    bins, totals = [[] for _ in range(workers)], [0.0] * workers
    for name in ranked:
        k = totals.index(min(totals))
        bins[k] += groups[name]
        totals[k] += seconds[name]
    sizes, left = [], len(items)
    for k in range(workers):          # xdist's split: each idle worker gets len(pending) // workers_left
        sizes.append(left // (workers - k))
        left -= sizes[-1]
    if any(len(b) > size for b, size in zip(bins, sizes)):
        return [item for name in ranked for item in groups[name]] + rest
    order, taken = [], 0
    for b, size in zip(bins, sizes):
        fill = size - len(b)
        order += b + rest[taken:taken + fill]
        taken += fill
    return order


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Under ``-n N --dist worksteal`` (``make test``), :func:`long_first_order`; other runs keep their order."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers >= 2 and config.getoption("dist", None) == "worksteal":
        items[:] = long_first_order(items, workers)
