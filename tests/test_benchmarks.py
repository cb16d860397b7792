"""The benchmark scripts run end to end on tiny models and write every file they promise.

Only the plumbing is tested here: the numbers they measure are timings and trained-model results,
which never belong in unit tests.
"""

import importlib.util
import json
from pathlib import Path

import pytest

from adatok_vlm import AdaTokImageProcessor
from conftest import tiny_model

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    model = tiny_model(num_latent_tokens=8)
    model.enable_policy()
    path = tmp_path_factory.mktemp("bench") / "adatok"
    model.save_pretrained(path)
    AdaTokImageProcessor(size=model.config.image_size).save_pretrained(path)
    return path


@pytest.mark.parametrize("with_policy", [True, False])
def test_curves_writes_figures_and_numbers(adatok_cache, saved_model, tmp_path, with_policy):
    model_dir = saved_model
    if not with_policy:
        model_dir = tmp_path / "no_policy"
        tiny_model(num_latent_tokens=8).save_pretrained(model_dir)
        AdaTokImageProcessor(size=32).save_pretrained(model_dir)
    out = tmp_path / "curves"
    result = load_script("curves").main(["--model", str(model_dir), "--out", str(out), "--data", "natural_crops",
                                         "--limit", "6", "--batch-size", "4", "--device", "cpu"])
    expected = {"fig3_rmse_vs_tokens.png", "fig5_rqpr_vs_tokens.png", "fig6_reward_landscape.png"}
    if with_policy:
        expected.add("lengths_hist.png")
    assert set(result["files"]) == expected
    for name in expected | {"curves.json", "curves.md"}:
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "curves.json").read_text())
    assert [r["tokens"] for r in saved["rows"]] == list(range(1, 9))
    assert ("policy_mean_tokens" in saved) == with_policy
    if with_policy:
        assert sum(saved["policy_length_counts"].values()) == 6


def test_ata_cost_reports_every_method(tmp_path):
    out = tmp_path / "cost.json"
    result = load_script("ata_cost").main(["--preset", "adatok-tiny", "--images", "4", "--batch-size", "2",
                                           "--device", "cpu", "--out", str(out)])
    assert set(result["ms_per_image"]) == {"fixed", "ata", "search", "decode"}
    assert result["search_probes"] == 5 and result["grid_size"] == 32
    assert all(v > 0 for v in result["ms_per_image"].values())
    assert json.loads(out.read_text())["ratios"].keys() == result["ratios"].keys()
    assert "search costs" in out.with_suffix(".md").read_text()


# --------------------------------------------------------------------------------------------------
# Table 2 (benchmarks/ablation.py, training/ablation.py)
# --------------------------------------------------------------------------------------------------
def test_ablation_writes_the_paper_s_rows_beside_ours(adatok_cache, saved_model, tmp_path):
    """The baseline tokenizer's row, both truncations, the search at rl_base (or ``--search_threshold``) and
    at the paper's implied threshold, ATA and both oracles; the markdown names the paper's rows."""
    import torch
    from transformers import AutoModel

    from adatok_vlm.training.ablation import PAPER_TABLE2, searched_lengths

    baseline = tmp_path / "baseline"
    tiny_model(num_latent_tokens=8, seed=1).save_pretrained(baseline)
    out = tmp_path / "ablation.json"
    args = ["--model", str(saved_model), "--data", "natural_crops", "--limit", "6", "--batch_size", "4",
            "--device", "cpu", "--out", str(out)]
    result = load_script("ablation").main(args + ["--baseline_model", str(baseline)])
    rows = {r["method"]: r for r in result["rows"]}
    other = {"continuous": "structured", "structured": "continuous"}[result["reward_kind"]]
    assert list(rows) == ["baseline_fixed", "fixed", "truncate_fixed", "truncate_mean", "search", "search_paper",
                          "ata", "oracle", f"oracle_{other}"]
    assert rows[f"oracle_{other}"][f"reward_{other}"] >= max(r[f"reward_{other}"] for r in result["rows"][1:]) - 1e-6
    assert {k for k, r in rows.items() if "paper_row" in r} == set(PAPER_TABLE2)
    assert rows["truncate_fixed"]["length"] == round(8 * 143 / 256) == rows["truncate_fixed"]["mean_tokens"]
    model = AutoModel.from_pretrained(saved_model)
    assert rows["search"]["threshold"] == model.config.reward_rl_base == result["search_threshold"]
    assert rows["fixed"]["mean_tokens"] == rows["baseline_fixed"]["mean_tokens"] == 8
    assert rows["baseline_fixed"]["rmse"] != rows["fixed"]["rmse"]            # another tokenizer's errors
    assert model.config.search_threshold == json.loads((saved_model / "config.json").read_text())["search_threshold"]
    saved = json.loads(out.read_text())
    assert saved["baseline_model"] == str(baseline) and saved["rows"] == json.loads(json.dumps(result["rows"]))
    text = out.with_suffix(".md").read_text()
    assert "NTM + Heur: 100, 0.75, 70.2" in text and "Baseline: 256, 0.726, 1.8" in text
    # --search_threshold moves the search row (a threshold above every error: the shortest length for all)
    loose = load_script("ablation").main(args + ["--search_threshold", "10", "--truncate_length", "3"])
    rows = {r["method"]: r for r in loose["rows"]}
    assert "baseline_fixed" not in rows and "missing" in (tmp_path / "ablation.md").read_text()
    assert rows["search"]["threshold"] == 10 and rows["search"]["mean_tokens"] == 1
    assert rows["truncate_fixed"]["mean_tokens"] == 3
    # the replay of the search on measured curves is the model's own search
    errors = torch.tensor([[0.5, 0.3, 0.2, 0.1], [0.9, 0.8, 0.05, 0.01]])
    assert searched_lengths(errors, torch.tensor([1, 2, 3, 4]), 0.25).tolist() == [3, 3]


def test_the_paper_s_search_threshold_hits_its_target_length():
    """``threshold_for_mean_length`` on monotone curves of 10 images: the search's mean length at the
    threshold found is within one image's step (1/10 of a grid step) of the target, and looser targets
    give looser thresholds."""
    import torch

    from adatok_vlm.training.ablation import searched_lengths, threshold_for_mean_length

    g = torch.Generator().manual_seed(0)
    grid = torch.arange(1, 17)
    errors = (torch.rand(10, 1, generator=g) * 0.05 + 0.01) * torch.linspace(1.0, 0.1, 16)[None, :] ** \
        (1 + torch.rand(10, 1, generator=g))
    thresholds = []
    for target in (3.0, 6.5, 11.2):
        t = threshold_for_mean_length(errors, grid, target)
        assert abs(float(searched_lengths(errors, grid, t).float().mean()) - target) <= 0.1 + 1e-6
        thresholds.append(t)
    assert thresholds[0] > thresholds[1] > thresholds[2]
    with pytest.raises(ValueError, match="target_mean"):
        threshold_for_mean_length(errors, grid, 40.0)
