"""Stage 1 with LPIPS + PatchGAN through the public ``train_tokenizer.main``: the GAN changes something.

A run that merely writes a discriminator file and finite losses would pass even if the discriminator
never stepped or the adaptive weight were stuck at 0; these tests read the run's ``log.jsonl`` and
its checkpoints instead: before ``gan_start_step`` the GAN terms are zero, from it on the adaptive
GAN weight is positive, the discriminator's hinge loss is live, and its weights move.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adatok_vlm.training.train_tokenizer import main

GAN_START = 2    # 0-based step index at which the GAN switches on: logged steps 1 and 2 are before it
STEPS = 5


@pytest.fixture(scope="module")
def gan_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gan")
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADATOK_CACHE", str(cache))
        main(["--model.preset", "adatok-tiny", "--model.hidden_size", "32", "--model.decoder_hidden_size", "32",
              "--model.num_attention_heads", "2", "--model.decoder_num_attention_heads", "2",
              "--model.num_encoder_layers", "1", "--model.num_decoder_layers", "1", "--model.num_latent_tokens", "8",
              "--data.dataset", "natural_crops", "--data.num_crops", "64", "--data.preload", "true",
              "--output_dir", str(out), "--max_steps", str(STEPS), "--seed", "3",
              "--train.batch_size", "8", "--train.lr", "1e-3", "--train.warmup_steps", "0",
              "--train.lr_schedule", "constant", "--train.log_every", "1", "--train.sample_every", "0",
              "--train.save_every", "1", "--train.keep_checkpoints", str(STEPS + 1), "--train.num_threads", "1",
              "--loss.perceptual_weight", "0.1", "--loss.perceptual_net", "alex",
              "--loss.gan_weight", "0.1", "--loss.gan_start_step", str(GAN_START), "--loss.adaptive_gan_weight", "true",
              "--loss.disc_base_channels", "8", "--loss.disc_num_layers", "2"])
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return out, {r["step"]: r for r in rows if "loss" in r}


def _discriminator(out: Path, step: int) -> dict:
    return load_file(str(out / "checkpoints" / f"step-{step:08d}" / "discriminator.safetensors"))


def test_gan_terms_are_zero_before_the_start_step(gan_run):
    _, rows = gan_run
    for step in range(1, GAN_START + 1):
        assert rows[step]["gan_weight"] == 0.0 and rows[step]["d_loss"] == 0.0, rows[step]


def test_adaptive_gan_weight_and_discriminator_loss_are_live_after_the_start_step(gan_run):
    _, rows = gan_run
    after = [rows[step] for step in range(GAN_START + 1, STEPS + 1)]
    assert all(r["gan_weight"] > 0 for r in after), [r["gan_weight"] for r in after]
    assert all(r["d_loss"] > 0 for r in after), [r["d_loss"] for r in after]
    assert all(r["gan_g"] != 0 for r in after), [r["gan_g"] for r in after]
    assert all(r["perceptual"] > 0 for r in rows.values())


def test_the_discriminator_steps_once_the_gan_is_on(gan_run):
    out, _ = gan_run
    before, end = _discriminator(out, GAN_START), _discriminator(out, STEPS)
    assert before.keys() == end.keys() and before
    moved = [k for k in before if before[k].is_floating_point() and not torch.equal(before[k], end[k])]
    weights = [k for k in before if k.endswith("weight") and before[k].dim() > 1]
    assert set(weights) <= set(moved), f"discriminator weights that never changed: {sorted(set(weights) - set(moved))}"
    change = max(float((end[k] - before[k]).abs().max()) for k in weights)
    assert change > 1e-4, change
