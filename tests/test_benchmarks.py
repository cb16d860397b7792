"""The benchmark scripts run end to end on tiny models and write every file they promise.

Only the plumbing is tested here: the numbers they measure are timings and trained-model results,
which never belong in unit tests.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from adatok_vlm import AdaTokImageProcessor
from conftest import tiny_model

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module                 # dataclasses look their module up there
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
                                         "--limit", "6", "--batch_size", "4", "--device", "cpu"])
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
    result = load_script("ata_cost").main(["--preset", "adatok-tiny", "--images", "4", "--batch_size", "2",
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


# --------------------------------------------------------------------------------------------------
# one writer, one flag style
# --------------------------------------------------------------------------------------------------
LEAD_SCRIPTS = {"gpu_check"}      # its own atomic writer, which writes nothing without CUDA (tests/test_gpu_check.py)
NOT_YET: set[str] = set()                        # scripts not yet on FlagParser + write_results
# script: (argv with one old hyphenated spelling (None: it has no underscored option), the option's dest, value)
OLD_SPELLINGS = {
    "ablation": (["--model", "M", "--out", "O", "--batch-size", "3"], "batch_size", 3),
    "ar_generation": (["--num-images", "3"], "num_images", 3),
    "ata_cost": (["--batch-size", "3"], "batch_size", 3),
    "curves": (["--model", "M", "--out", "O", "--batch-size", "3"], "batch_size", 3),
    "dit_varlen": (["--measured-batches", "3"], "measured_batches", 3),
    "eq8_ablation": (["--out", "O", "--test-limit", "3"], "test_limit", 3),
    "latent_cache": (["--batch-size", "3"], "batch_size", 3),
    "natural_recipe": (None, "name", "run"),
    "policy_features": (["--model", "M", "--table_dir", "T", "--photo-split", "x"], "photo_split", "x"),
    "throughput": (["--batch-size", "3"], "batch_size", 3),
    "train_fixed_baseline": (["--output_dir", "O", "--ntm-config", "C"], "ntm_config", "C"),
    "vlm_understanding": (["--per-class", "3"], "per_class", 3),
    "zero_memory": (None, "nproc", 2),
}
WRITES_NO_RESULT = {"natural_recipe", "train_fixed_baseline", "run_all"}   # JSON lines; a launcher; the runner


def test_write_results_writes_sorted_standard_json_and_markdown(tmp_path):
    """FILE.json (keys sorted, indent 2, trailing newline, NaN/inf as null, numpy scalars as numbers) and FILE.md,
    in a folder it creates; ``--out FILE.json`` and ``FILE`` name the same pair; bad data touches no file."""
    import math

    import numpy as np

    from adatok_vlm.training.results import write_results

    data = {"b": [1.5, math.nan, (2, math.inf)], "a": {"z": np.float32(0.25), "y": np.int64(7), "x": True}}
    paths = write_results(tmp_path / "new" / "deep" / "bench.json", data, "| a |\n| --- |")
    assert paths == (tmp_path / "new" / "deep" / "bench.json", tmp_path / "new" / "deep" / "bench.md")
    text = paths[0].read_text(encoding="utf-8")
    assert text == ('{\n  "a": {\n    "x": true,\n    "y": 7,\n    "z": 0.25\n  },\n  "b": [\n    1.5,\n    null,\n'
                    '    [\n      2,\n      null\n    ]\n  ]\n}\n')
    assert paths[1].read_text(encoding="utf-8") == "| a |\n| --- |\n"
    assert write_results(tmp_path / "new" / "deep" / "bench", {"c": 1}, "x\n") == paths
    assert json.loads(paths[0].read_text()) == {"c": 1} and paths[1].read_text() == "x\n"
    assert write_results(tmp_path / "run.v2", {}, "")[0].name == "run.v2.json"
    with pytest.raises(TypeError):
        write_results(paths[0], {"c": object()}, "y\n")
    assert json.loads(paths[0].read_text()) == {"c": 1} and paths[1].read_text() == "x\n"   # untouched
    assert sorted(p.name for p in paths[0].parent.iterdir()) == ["bench.json", "bench.md"]  # no temporary left


def test_every_benchmark_takes_underscored_flags_and_the_old_spellings(monkeypatch, capsys):
    """Every benchmark but the lead's two parses with ``FlagParser`` (``--like_this``; the old ``--like-this``
    still parses, with one deprecation line), and every one that writes a result writes it with
    ``write_results``. The parse is stopped right after it: nothing runs."""
    import argparse

    from adatok_vlm.training.flags import FlagParser

    scripts = {p.stem for p in BENCHMARKS.glob("*.py")} - LEAD_SCRIPTS - NOT_YET
    assert scripts - {"run_all"} == set(OLD_SPELLINGS), "a benchmark without an entry in OLD_SPELLINGS"

    class Parsed(Exception):
        pass

    base = argparse.ArgumentParser.parse_known_args

    def only_flag_parser(self, *args, **kwargs):
        if not isinstance(self, FlagParser):
            raise AssertionError(f"{self.prog}: parses with argparse.ArgumentParser, not FlagParser")
        return base(self, *args, **kwargs)

    flag_parse = FlagParser.parse_known_args

    def stop(self, *args, **kwargs):
        raise Parsed(flag_parse(self, *args, **kwargs)[0])

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", only_flag_parser)
    monkeypatch.setattr(FlagParser, "parse_known_args", stop)
    for name, (argv, dest, value) in sorted(OLD_SPELLINGS.items()):
        module = load_script(name)
        with pytest.raises(Parsed) as parsed:
            module.main(["run"] if name == "natural_recipe" else (argv or []))
        assert getattr(parsed.value.args[0], dest) == value, name
        err = capsys.readouterr().err
        if argv is not None:
            old = next(a for a in argv if a.startswith("--") and "-" in a[2:])
            assert f"{old} is deprecated and goes in the next release; use --{dest}" in err, (name, err)
            assert err.count("deprecated") == 1, (name, err)
    for name in scripts - WRITES_NO_RESULT:
        source = (BENCHMARKS / f"{name}.py").read_text(encoding="utf-8")
        assert "write_results(" in source and 'with_suffix(".md")' not in source, name
