"""Understanding at adaptive lengths: the benchmark's accuracy code on a task whose answer is known, and
batched image-to-text generation from processor inputs equal to generating each prompt alone.

A tiny Llama (hidden 32) learns, in a few dozen steps through the real :class:`VLMCollator`, to name the
class of a synthetic image (noisy black -> "cat", white -> "shoe", half white -> "red") from image
tokens of every length 1..m; the benchmark's ``understanding_eval`` must then score it above chance at
every length rule it compares (auto, fixed m, fixed mean, two dial settings).
"""

import sys
from pathlib import Path

import pytest
import torch

from adatok_vlm.processing_vlm import AdaTokVLMProcessor
from adatok_vlm.vlm_data import VLMCollator
from test_vlm import M, tiny_vlm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from vlm_understanding import (length_rules, markdown, merge_results, t2i_length_comparison,  # noqa: E402
                                understanding_eval)

CAPTIONS = ["cat", "shoe", "red"]


def synthetic_images(n: int, seed: int):
    """``(pixels [n, 3, 32, 32], labels [n])``: black, white, or white on the left half only, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(CAPTIONS), (n,), generator=g)
    pixels = torch.zeros(n, 3, 32, 32)
    pixels[labels == 1] = 1.0
    pixels[labels == 2, :, :, :16] = 1.0
    pixels = pixels + 0.1 * torch.randn(n, 3, 32, 32, generator=g)
    return pixels.clamp(0, 1), labels


@pytest.fixture(scope="module")
def trained():
    """(vlm, processor): a tiny VLM with a (random) AdaTok policy, trained i2t to name the synthetic classes."""
    torch.set_num_threads(1)
    vlm, tok = tiny_vlm("llama", seed=0)
    vlm.adatok.enable_policy()
    vlm.adatok.eval()
    processor = AdaTokVLMProcessor.from_model(vlm, tok)
    collator = VLMCollator(tok, vlm.config, direction="i2t")
    optimizer = torch.optim.AdamW([p for p in vlm.parameters() if p.requires_grad], lr=3e-3)
    g = torch.Generator().manual_seed(1)
    vlm.train()
    for step in range(100):
        pixels, labels = synthetic_images(12, seed=100 + step)
        lengths = torch.randint(1, M + 1, (12,), generator=g)      # every length, as NTM trains AdaTok
        with torch.no_grad():
            enc = vlm.adatok.encode(pixels, num_tokens=lengths)
        items = [{"caption": CAPTIONS[int(y)], "tokens": enc.tokens[i, :int(n)]}
                 for i, (y, n) in enumerate(zip(labels, lengths))]
        batch = collator(items)
        out = vlm(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels", "image_tokens", "image_lengths")})
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    vlm.eval()
    return vlm, processor


def test_accuracy_is_above_chance_at_every_length_rule(trained):
    vlm, processor = trained
    pixels, labels = synthetic_images(24, seed=7)
    rules = length_rules(vlm.adatok, pixels, dial=(0.05, 0.2))
    assert [name.split(" ")[0] for name, _ in rules] == ["auto", "fixed", "fixed", "dial", "dial"]
    for name, rule in rules:
        r = understanding_eval(vlm, processor, pixels, labels, CAPTIONS, rule, batch_size=8)
        assert r["num_images"] == 24 and len(r["predictions"]) == 24
        assert r["accuracy"] > 1 / len(CAPTIONS) + 0.2, (name, r["accuracy"], r["predictions"][:6])
        assert 1 <= r["mean_image_tokens"] <= M and r["prefill_ms_per_image"] >= 0
    fixed = understanding_eval(vlm, processor, pixels, labels, CAPTIONS, 4, batch_size=8)
    assert fixed["mean_image_tokens"] == 4


def test_a_wrong_caption_set_scores_zero(trained):
    """Exact match: the same predictions scored against other captions are never right."""
    vlm, processor = trained
    pixels, labels = synthetic_images(6, seed=8)
    r = understanding_eval(vlm, processor, pixels, labels, ["is", "is", "is"], 5, batch_size=6)
    assert r["accuracy"] == 0.0


def test_batched_generation_from_processor_inputs_equals_each_alone(trained):
    """Greedy i2t from one left-padded batch of images with different lengths == each image alone."""
    vlm, processor = trained
    tok = processor.tokenizer
    pixels, _ = synthetic_images(4, seed=9)
    lengths = torch.tensor([1, 7, M, 3])
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    inputs = processor(text=["<image>", "<image>", "the <image>", "<image>"], images=pixels,
                       num_image_tokens=lengths, padding_side="left")
    assert inputs["attention_mask"][:, 0].tolist() == [0, 0, 1, 0]        # rows of different lengths, left-padded
    batched = vlm.generate(**inputs, **kwargs)[:, inputs["input_ids"].shape[1]:]
    no_cache = vlm.generate(**inputs, use_cache=False, **kwargs)[:, inputs["input_ids"].shape[1]:]
    assert torch.equal(batched, no_cache)

    def trim(row):
        row = row.tolist()
        return row[:row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row

    for i, text in enumerate(["<image>", "<image>", "the <image>", "<image>"]):
        alone = processor(text=[text], images=pixels[i:i + 1], num_image_tokens=lengths[i:i + 1])
        one = vlm.generate(**alone, **kwargs)[0, alone["input_ids"].shape[1]:]
        assert trim(one) == trim(batched[i]), i
    captions = vlm.caption(processor, pixels, num_image_tokens=lengths, max_new_tokens=4)
    assert captions == [vlm.caption(processor, pixels[i:i + 1], num_image_tokens=lengths[i:i + 1],
                                    max_new_tokens=4)[0] for i in range(4)]


def test_t2i_length_comparison_reports_per_class_means_and_distances(trained):
    vlm, processor = trained
    data = {0: [2, 3, 3], 1: [5, 6], 2: [9, 9, 10]}
    r = t2i_length_comparison(vlm, processor.tokenizer, CAPTIONS, data, per_class=3, batch_size=9)
    assert [row["class"] for row in r["per_class"]] == [0, 1, 2]
    assert [row["data_mean"] for row in r["per_class"]] == [8 / 3, 5.5, 28 / 3]
    assert all(1 <= row["lm_mean"] <= M and row["wasserstein"] >= 0 and row["num_lm"] == 3 for row in r["per_class"])
    assert r["distinct_data_lengths"] == 6


def _run(name: str, command: str, **settings) -> dict:
    """A benchmark result as ``main`` writes it, with one model of one row (no model is run)."""
    model = {"name": name, "lm": "LlamaForCausalLM", "lm_parameters": 10, "training": {"steps": 5, "direction": "mixed"},
             "tokenizer_rmse_by_length": {"1": 0.05, "32": 0.01}, "targets": {},
             "understanding": [{"rule": "auto", "accuracy": 0.5, "mean_image_tokens": 9.0, "prefill_ms_per_image": 1.0}],
             "t2i_lengths": {"data_mean": 9.0, "lm_mean": 10.0, "mean_wasserstein": 1.0, "spearman_class_means": 0.5,
                             "distinct_data_lengths": 4, "per_class": []}}
    base = {"dataset": "fashion_mnist", "split": "test", "num_images": 8, "per_class": 2, "device": "cpu",
            "threads": 1, "clock": "cpu", "seed": 0, "note": "", "command": command, "models": [model]}
    return {**base, **settings}


def test_merge_keeps_every_model_and_command_and_refuses_different_settings():
    merged = merge_results([_run("a", "python b.py --vlm A"), _run("b", "python b.py --vlm B")], note="trained so")
    assert [m["name"] for m in merged["models"]] == ["a", "b"]
    assert merged["commands"] == ["python b.py --vlm A", "python b.py --vlm B"]
    md = markdown(merged)
    assert "| a | auto |" in md and "| b | auto |" in md
    assert "`python b.py --vlm A`; `python b.py --vlm B`" in md and "trained so" in md
    with pytest.raises(ValueError, match="num_images"):
        merge_results([_run("a", "x"), _run("b", "y", num_images=9)])
    with pytest.raises(ValueError, match="at least one"):
        merge_results([])
