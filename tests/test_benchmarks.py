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
