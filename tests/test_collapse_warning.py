"""Stage 2 warns when the length policy collapses early (RELIABILITY.md: 'policy collapse in stage 2').

Real runs through the public ``train_policy.main`` on a briefly trained tiny tokenizer: a huge
learning rate with no warm-up and no entropy bonus drives the policy to one length within the first
10% of training, which must raise the warning; the same run at a sane learning rate must not.
"""

import json
import warnings

import pytest

from adatok_vlm.training.train_policy import main as train_policy
from adatok_vlm.training.train_tokenizer import main as train_tokenizer

STEPS = 20   # the check runs at step max(1, STEPS // 10) = 2: after one update


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1")
    summary = train_tokenizer([
        "--model.preset", "adatok-tiny", "--model.hidden_size", "32", "--model.decoder_hidden_size", "32",
        "--model.num_attention_heads", "2", "--model.decoder_num_attention_heads", "2",
        "--model.num_encoder_layers", "1", "--model.num_decoder_layers", "1", "--model.num_latent_tokens", "8",
        "--data.dataset", "natural_crops", "--data.num_crops", "64", "--data.preload", "true",
        "--output_dir", str(out), "--max_steps", "3", "--train.batch_size", "8", "--train.sample_every", "0",
        "--train.save_every", "0", "--train.num_threads", "1"])
    return summary["model_dir"]


def _run(tokenizer_dir, out, lr):
    return train_policy(["--tokenizer", tokenizer_dir, "--output_dir", str(out), "--max_steps", str(STEPS),
                         "--data.dataset", "natural_crops", "--data.num_crops", "64", "--data.preload", "true",
                         "--train.batch_size", "8", "--train.lr", str(lr), "--train.warmup_steps", "0",
                         "--train.lr_schedule", "constant", "--train.entropy_start", "0", "--train.grad_clip", "0",
                         "--train.log_every", "1", "--train.save_every", "0", "--train.num_threads", "1"])


def _entropy_at(out, step):
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return next(r["entropy"] for r in rows if r.get("step") == step and "entropy" in r)


def test_a_policy_that_collapses_early_is_warned_about(tokenizer_dir, tmp_path):
    with pytest.warns(UserWarning, match="collapsed early") as caught:
        _run(tokenizer_dir, tmp_path, lr=100.0)
    assert _entropy_at(tmp_path, STEPS // 10) < 0.05, "the run really collapsed"
    assert sum("collapsed early" in str(w.message) for w in caught) == 1, "warned once"


def test_a_healthy_policy_is_not_warned_about(tokenizer_dir, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run(tokenizer_dir, tmp_path, lr=1e-4)
    assert _entropy_at(tmp_path, STEPS // 10) > 0.5
    assert not [w for w in caught if "collapsed early" in str(w.message)]
