"""benchmarks/throughput.py runs its real code at the tiny preset and writes every field it promises.

Only the plumbing is tested: the numbers are timings, which never belong in unit tests.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_model

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"
OPS = {"encode", "vae_encoder", "decode", "vae_decoder", "round_trip"}


def load_script():
    spec = importlib.util.spec_from_file_location("bench_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_entry(entry: dict, m: int, precisions=("fp32", "bf16")) -> None:
    """One model's measurement: every op timed at every precision, the shares and the per-length rows."""
    lengths = sorted({max(1, m // 8), max(1, m // 2), m})
    assert entry["kept_lengths"] == lengths
    expected = OPS | {f"decoder@{n}" for n in lengths} | {f"decode@{n}" for n in lengths if n != m}
    for precision in precisions:
        ops = entry[precision]["ops"]
        assert expected <= set(ops), sorted(expected - set(ops))
        for name, op in ops.items():
            assert op["wall_s"] > 0 and op["cpu_s"] >= 0, name
            assert op["images_per_second"] == pytest.approx(entry["batch_size"] / op["wall_s"])
        assert set(entry[precision]["vae_share"]) == {"encode", "decode", "round_trip"}
        assert all(share > 0 for share in entry[precision]["vae_share"].values())
        by_length = entry[precision]["decode_by_length"]
        for key in ("decode_images_per_second", "decoder_images_per_second"):
            assert sorted(int(n) for n in by_length[key]) == lengths
        assert by_length["decode_images_per_second"][str(m)] == ops["decode"]["images_per_second"]
    diff = entry["bf16_vs_fp32_round_trip"]
    assert 0 <= diff["mean_abs_diff"] <= diff["max_abs_diff"] <= 1.0, "reconstructions in [0, 1]"


def test_the_benchmark_writes_json_and_markdown_at_the_tiny_preset(tmp_path):
    out = tmp_path / "results" / "throughput.json"
    argv = ["--presets", "adatok-tiny", "--batch-size", "2", "--repeats", "1", "--warmup", "0", "--threads", "1",
            "--out", str(out)]
    script = load_script()
    record = script.main(argv)
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(record))
    assert saved["presets"] == ["adatok-tiny"] and saved["precisions"] == ["fp32", "bf16"]
    assert saved["batch_size"] == 2 and saved["repeats"] == 1 and saved["warmup"] == 0
    assert saved["machine"]["torch_threads"] == 1 and saved["machine"]["device"] == "cpu"
    assert saved["machine"]["cpu"] and saved["machine"]["cpu_count"] >= 1
    assert "load average" in saved["uptime_before"] and "load average" in saved["uptime_after"]
    load = saved["load_average_1min"]
    assert load["min"] <= load["mean"] <= load["max"] and load["samples"] >= 2
    entry = saved["results"]["adatok-tiny"]
    assert entry["latent_space"] == "pixel" and entry["image_size"] == 32 and entry["trainable_parameters"] > 0
    check_entry(entry, m=32)
    assert saved["command"] == "python benchmarks/throughput.py " + " ".join(argv)
    md = out.with_suffix(".md").read_text()
    assert "| adatok-tiny | fp32 |" in md and "| adatok-tiny | bf16 | 4 |" in md
    assert saved["command"] in md and "1 thread(s)" in md
    out.with_suffix(".md").unlink()                     # --markdown_only rewrites the table, measuring nothing
    assert script.main(["--markdown_only", "--out", str(out)]) == saved
    assert out.with_suffix(".md").read_text() == md
    with pytest.raises(FileNotFoundError, match="does not exist"):
        script.main(["--markdown_only", "--out", str(tmp_path / "none.json")])


def test_a_vae_model_reports_the_vae_share_and_the_channels_last_speedup():
    script = load_script()
    model = tiny_model("vae")
    record = script.measure_model(model, torch.rand(2, 3, 32, 32), repeats=1, warmup=0)
    check_entry(record, m=model.num_latent_tokens)
    assert model.latent_space.channels_last, "the NCHW comparison restores the default layout"
    for precision in ("fp32", "bf16"):
        assert {"vae_encoder_nchw", "vae_decoder_nchw"} <= set(record[precision]["ops"])
        speedup = record[precision]["vae_channels_last_speedup"]
        assert set(speedup) == {f"{p}_{c}" for p in ("encoder", "decoder") for c in ("wall_s", "cpu_s")}
        assert all(x > 0 for x in speedup.values())
    record.update(latent_space="vae")
    md = script.markdown({"machine": {"device": "cpu", "torch_threads": 1, "cpu": "x", "cpu_count": 2, "torch": "t"},
                          "load_average_1min": {"min": 1.0, "max": 2.0}, "uptime_before": "u", "uptime_after": "u",
                          "presets": ["tiny-vae"], "precisions": ["fp32", "bf16"], "batch_size": 2, "repeats": 1,
                          "warmup": 0, "results": {"tiny-vae": record}, "command": "cmd"})
    assert "| tiny-vae | fp32 |" in md and "%" in md and "channels-last layout" in md


def test_bad_arguments_are_clear_errors(capsys):
    script = load_script()
    for argv, message in ((["--presets", "adatok-xl"], "--presets"), (["--precisions", "fp16"], "--precisions"),
                          (["--repeats", "0"], "--repeats"), (["--warmup", "-1"], "--warmup")):
        with pytest.raises(SystemExit):
            script.parse_args(argv)
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        script.measure_model(tiny_model(), torch.rand(1, 3, 32, 32), repeats=0)
    with pytest.raises(ValueError, match="precision must be one of"):
        script.precision_context("fp16", "cpu")
