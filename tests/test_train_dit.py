"""DiT training on a token cache: the loss falls, resume is exact, NaN stops the run, and the export
reloads with AutoModel carrying the cache's length histograms and token statistics."""

import json
from pathlib import Path

import pytest
import torch
import transformers
from conftest import tiny_model
from safetensors.torch import load_file

from adatok_vlm import AdaTokDiT
from adatok_vlm.training import train_dit
from adatok_vlm.training.engine import NonFiniteLossError
from adatok_vlm.training.extract_tokens import main as extract

TINY_YAML = Path(__file__).resolve().parents[1] / "configs" / "dit" / "dit-tiny.yaml"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A token cache of 96 natural crops with per-image lengths (a tiny AdaTok with a fresh policy)."""
    root = tmp_path_factory.mktemp("dit_cache")
    model = tiny_model(num_latent_tokens=8, seed=1)
    model.enable_policy()
    model.save_pretrained(root / "tokenizer")
    extract(["--tokenizer", str(root / "tokenizer"), "--output_dir", str(root / "tokens"),
             "--data.dataset", "natural_crops", "--data.num_crops", "96", "--extract.num_threads", "1"])
    return root


def flags(cache, out, *extra):
    return ["--data.tokens", str(cache / "tokens"), "--output_dir", str(out), "--train.batch_size", "16",
            "--train.num_threads", "1", "--train.log_every", "1", "--train.sample_every", "0",
            "--train.save_every", "0", "--train.ema_decay", "0.99", *extra]


def losses(out):
    return [json.loads(line)["loss"] for line in (Path(out) / "log.jsonl").read_text().splitlines()
            if '"loss"' in line]


def test_fifty_steps_lower_the_loss_and_write_samples(cache, tmp_path):
    summary = train_dit.main(["--config", str(TINY_YAML), *flags(cache, tmp_path),
                              "--max_steps", "50", "--train.lr", "2e-3", "--train.warmup_steps", "5",
                              "--train.time_budget_s", "null", "--train.sample_every", "25",
                              "--tokenizer", str(cache / "tokenizer"), "--sample.per_class", "2",
                              "--sample.num_steps", "4"])
    curve = losses(tmp_path)
    assert summary["steps"] == 50 and len(curve) == 50
    assert sum(curve[-10:]) / 10 < 0.8 * sum(curve[:5]) / 5, curve
    for step in (25, 50):
        assert (tmp_path / "samples" / f"step-{step:08d}.png").is_file()
    assert (tmp_path / "checkpoints" / "step-00000050" / "ema.safetensors").is_file()


def test_resume_is_exact(cache, tmp_path):
    constant = ["--train.lr_schedule", "constant", "--train.warmup_steps", "0", "--train.lr", "1e-3", "--seed", "5"]
    train_dit.main([*flags(cache, tmp_path / "straight"), *constant, "--max_steps", "4"])
    train_dit.main([*flags(cache, tmp_path / "resumed"), *constant, "--max_steps", "2"])
    summary = train_dit.main([*flags(cache, tmp_path / "resumed"), *constant, "--max_steps", "4", "--resume", "auto"])
    assert summary["steps"] == 4
    for name in ("model.safetensors", "ema.safetensors", "optimizer.optim.safetensors"):
        a = load_file(str(tmp_path / "straight" / "checkpoints" / "step-00000004" / name))
        b = load_file(str(tmp_path / "resumed" / "checkpoints" / "step-00000004" / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    assert losses(tmp_path / "straight")[2:] == losses(tmp_path / "resumed")[2:]


def test_export_reloads_and_generates_from_the_stored_histogram(cache, tmp_path):
    summary = train_dit.main([*flags(cache, tmp_path), "--max_steps", "3"])
    dit = transformers.AutoModel.from_pretrained(summary["model_dir"]).eval()
    meta = json.loads((cache / "tokens" / "tokens.json").read_text())
    assert isinstance(dit, AdaTokDiT)
    assert dit.config.length_histograms == meta["length_histograms"]
    assert dit.config.token_mean == pytest.approx(meta["token_mean"]) and dit.config.token_std == pytest.approx(
        meta["token_std"])
    assert [dit.config.id2label[i] for i in range(dit.config.num_classes)] == meta["class_names"]
    assert (dit.config.token_dim, dit.config.max_tokens) == (meta["token_dim"], meta["max_tokens"])
    provenance = json.loads((Path(summary["model_dir"]) / "token_cache.json").read_text())
    assert provenance["tokenizer_fingerprint"] == meta["tokenizer_fingerprint"]

    # Lengths come from the class's histogram: only lengths seen for that class, in proportion.
    hist = torch.tensor(meta["length_histograms"], dtype=torch.float64)
    label = int(hist.sum(1).argmax())
    labels = torch.full((400,), label)
    enc = dit.generate(labels, num_steps=2, generator=torch.Generator().manual_seed(0))
    drawn = torch.bincount(enc.lengths - 1, minlength=hist.shape[1]).double()
    assert (drawn[hist[label] == 0] == 0).all()
    expected = hist[label] / hist[label].sum()
    assert (drawn / drawn.sum() - expected).abs().max() < 0.1
    assert enc.tokens.shape == (400, int(enc.lengths.max()), meta["token_dim"])


def test_non_finite_loss_stops_with_a_checkpoint(cache, tmp_path, monkeypatch):
    real = train_dit.flow_matching_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(train_dit, "flow_matching_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match="at step 2") as info:
        train_dit.main([*flags(cache, tmp_path), "--max_steps", "10"])
    assert info.value.checkpoint and (Path(info.value.checkpoint) / "trainer_state.json").is_file()


def test_the_cache_decides_the_data_fields(cache, tmp_path):
    with pytest.raises(ValueError, match="model.max_tokens comes from the token cache"):
        train_dit.main([*flags(cache, tmp_path), "--max_steps", "1", "--model.max_tokens", "4"])


def test_demo_writes_samples_and_the_length_histogram(cache, tmp_path):
    from PIL import Image

    from adatok_vlm.training.demo_dit import main as demo

    result = demo(["--tokenizer", str(cache / "tokenizer"), "--output_dir", str(tmp_path),
                   "--images.dataset", "natural_crops", "--images.num_crops", "48", "--images.resize_mode", "pad",
                   "--max_steps", "6", "--train.batch_size", "8", "--train.num_threads", "1",
                   "--train.time_budget_s", "null", "--train.sample_every", "3", "--sample.num_steps", "2",
                   "--final.per_class", "2", "--final.num_steps", "2"])
    for name in ("samples.png", "lengths_hist.png", "demo_dit.json", "model/config.json", "tokens/tokens.json",
                 "samples/step-00000006.png"):
        assert (tmp_path / name).is_file(), name
    assert result["train"]["steps"] == 6 and result["sample"]["num_images"] == 2 * 10
    rows = Image.open(tmp_path / "samples.png").height // (32 * 3)
    assert rows == 10                                                  # one row per class
