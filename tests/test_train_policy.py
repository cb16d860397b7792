"""Stage 2 end to end on a briefly trained tiny tokenizer: the policy trains, saves inside the
AdaTok checkpoint, reloads with AutoModel, and every length mode answers."""

import json
from pathlib import Path

import pytest
import torch
import transformers

from adatok_vlm.training.config import fill_dataclass
from adatok_vlm.training.train_policy import PolicyTrainingConfig, main
from adatok_vlm.training.train_policy import train as train_policy
from adatok_vlm.training.train_tokenizer import TokenizerTrainingConfig
from adatok_vlm.training.train_tokenizer import train as train_tokenizer

DATA = {"dataset": "natural_crops", "num_crops": 256, "preload": True}


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1")
    cfg = fill_dataclass(TokenizerTrainingConfig, {
        "model": {"preset": "adatok-tiny", "hidden_size": 32, "decoder_hidden_size": 32, "num_attention_heads": 2,
                  "decoder_num_attention_heads": 2, "num_encoder_layers": 1, "num_decoder_layers": 1,
                  "num_latent_tokens": 8},
        "data": DATA,
        "train": {"output_dir": str(out), "max_steps": 30, "batch_size": 16, "lr": 3e-3, "warmup_steps": 3,
                  "log_every": 10, "sample_every": 0, "save_every": 0, "num_threads": 2},
    })
    return train_tokenizer(cfg)["model_dir"]


def test_stage2_trains_saves_and_reloads_the_policy(stage1, tmp_path):
    summary = main(["--tokenizer", stage1, "--output_dir", str(tmp_path), "--max_steps", "12",
                    "--train.batch_size", "16", "--train.log_every", "1", "--train.save_every", "6",
                    "--data.dataset", "natural_crops", "--data.num_crops", "256",
                    "--model.policy_min_tokens", "2", "--model.reward_kind", "structured"])
    assert summary["steps"] == 12
    rows = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    for key in ("reward", "entropy", "log_prob", "length_mean", "entropy_weight", "curve_loss"):
        assert all(torch.isfinite(torch.tensor(r[key])) for r in rows), key
    assert rows[0]["entropy_weight"] > rows[-1]["entropy_weight"], "the entropy bonus decays"
    for name in ("policy_entropy.png", "policy_log_prob.png"):
        assert (tmp_path / name).is_file()
    model = transformers.AutoModel.from_pretrained(summary["model_dir"]).eval()
    assert model.has_policy and model.config.policy_min_tokens == 2 and model.config.reward_kind == "structured"
    images = torch.rand(5, 3, 32, 32)
    auto = model.encode(images, num_tokens="auto")
    assert auto.lengths.min() >= 2 and auto.lengths.max() <= 8
    for mode in ("search", "oracle", {"max_mse": 0.05}, {"mean_budget": 4}):
        enc = model.encode(images, num_tokens=mode)
        assert enc.lengths.shape == (5,) and enc.lengths.min() >= 2, mode
    budget = model.encode(images, num_tokens={"mean_budget": 4}).lengths.float().mean()
    assert budget <= 4.0


def test_stage2_resume_continues_the_step_count(stage1, tmp_path):
    base = {"tokenizer": stage1, "data": DATA,
            "train": {"output_dir": str(tmp_path), "batch_size": 8, "save_every": 3, "num_threads": 2,
                      "lr_schedule": "constant", "warmup_steps": 0, "seed": 1}}
    train_policy(fill_dataclass(PolicyTrainingConfig, {**base, "train": {**base["train"], "max_steps": 3}}))
    summary = train_policy(fill_dataclass(PolicyTrainingConfig,
                                          {**base, "train": {**base["train"], "max_steps": 6, "resume": "auto"}}))
    assert summary["steps"] == 6
    state = json.loads((Path(summary["checkpoint"]) / "trainer_state.json").read_text())
    assert [h["step"] for h in state["history"]] == [1, 2, 3, 4, 5, 6]


def test_auto_makes_no_decoder_call(stage1, tmp_path, monkeypatch):
    summary = main(["--tokenizer", stage1, "--output_dir", str(tmp_path), "--max_steps", "2",
                    "--data.dataset", "natural_crops", "--data.num_crops", "64", "--train.batch_size", "8"])
    model = transformers.AutoModel.from_pretrained(summary["model_dir"]).eval()

    def forbidden(*args, **kwargs):
        raise AssertionError("the decoder was called")

    monkeypatch.setattr(model.decoder, "forward", forbidden)
    enc = model.encode(torch.rand(3, 3, 32, 32), num_tokens="auto")
    assert enc.lengths.shape == (3,)
