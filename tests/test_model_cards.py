"""Saved folders a hub user recognises (issue 19, item 4), for the tokenizer, its image processor and the DiT.

``save_pretrained`` writes a ``README.md`` model card (model type, preset, config summary, training and
metrics when known) and the ``auto_map`` + ``adatok_vlm_hub.py`` that let the Auto classes load the folder
without ``import adatok_vlm`` when ``trust_remote_code=True`` is given (and ask for that flag otherwise,
instead of "unrecognized model type" or "lacks an image_processor_type key"). The VLM's side is in
``test_vlm_processor.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from adatok_vlm import AdaTokDiT, AdaTokDiTConfig, AdaTokImageProcessor, AdaTokModel
from adatok_vlm.tokenizer.model_card import HUB_MODULE, MODEL_CARD, TRAINING_INFO
from conftest import tiny_model


def tiny_dit() -> AdaTokDiT:
    torch.manual_seed(0)
    return AdaTokDiT(AdaTokDiTConfig.from_preset("dit-tiny", token_dim=16, max_tokens=12, num_classes=3)).eval()


def save_tokenizer(folder: Path, **kwargs) -> AdaTokModel:
    """A tokenizer folder as the trainers export it: the model and its image processor side by side."""
    model = tiny_model()
    model.save_pretrained(folder, **kwargs)
    AdaTokImageProcessor(size=32, resize_mode="pad").save_pretrained(folder)
    return model


def card_of(folder: Path) -> str:
    return (folder / MODEL_CARD).read_text(encoding="utf-8")


# ============================================================================================
# the model card
# ============================================================================================
def test_the_tokenizer_card_names_its_type_preset_and_config(tmp_path):
    save_tokenizer(tmp_path)
    card = card_of(tmp_path)
    assert card.startswith("---\nlibrary_name: adatok-vlm\n")           # the hub's YAML header
    assert "- model_type: `adatok`" in card
    assert "- preset: `adatok-tiny` with" in card and "`hidden_size=32`" in card   # tiny_model's overrides
    assert "| max tokens (m) | 12 |" in card and "| token_dim | 16 |" in card
    assert "none (stage 1 only)" in card                                # no length policy yet
    assert "## Training\n\nNot recorded" in card and "## Metrics" not in card
    assert card.count("- adatok\n") == 1                                 # the tag once, not per source


def test_training_and_metrics_come_from_the_trainers_file_or_the_argument(tmp_path):
    (tmp_path / TRAINING_INFO).write_text(json.dumps({
        "training": {"data": "fashion_mnist", "steps": 1500}, "metrics": {"rMSE@32": 0.0125}}), encoding="utf-8")
    model = tiny_model(policy_enabled=True)
    model.save_pretrained(tmp_path, model_card={"training": {"steps": 1600}})
    card = card_of(tmp_path)
    assert "| data | fashion_mnist |" in card and "| steps | 1600 |" in card      # the argument wins
    assert "## Metrics" in card and "| rMSE@32 | 0.0125 |" in card
    assert "lengths 1..12 step 1, continuous reward" in card and "num_tokens='auto'" in card
    with pytest.raises(ValueError, match=r"model_card: expected the keys 'training' and/or 'metrics', got \['metric'\]"):
        model.save_pretrained(tmp_path / "bad", model_card={"metric": {}})
    (tmp_path / TRAINING_INFO).write_text("{ not json", encoding="utf-8")  # a damaged file never fails a save
    model.save_pretrained(tmp_path)
    assert "## Training\n\nNot recorded" in card_of(tmp_path)


def test_the_dit_card_names_its_type_preset_and_the_token_cache(tmp_path):
    dit = tiny_dit()
    (tmp_path / "token_cache.json").write_text(json.dumps({"tokenizer": "outputs/demo/model", "num_items": 600,
                                                           "mean_length": 7.5, "path": "/data/tokens"}))
    dit.save_pretrained(tmp_path, model_card={"metrics": {"gFID": 41.2}})
    card = card_of(tmp_path)
    assert "- model_type: `adatok_dit`" in card and "- preset: `dit-tiny` (unchanged)" in card
    assert "| num_classes (+1 null class) | 3 |" in card and "| max tokens (m) | 12 |" in card
    assert "| token cache tokenizer | outputs/demo/model |" in card and "| token cache num_items | 600 |" in card
    assert "| gFID | 41.2 |" in card


# ============================================================================================
# auto_map and subfolder=
# ============================================================================================
def test_every_family_writes_its_auto_map_and_loads_by_auto_class_from_a_subfolder(tmp_path):
    save_tokenizer(tmp_path / "tokenizer")
    tiny_dit().save_pretrained(tmp_path / "dit")
    config = json.loads((tmp_path / "tokenizer" / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": f"{HUB_MODULE}.AdaTokConfig", "AutoModel": f"{HUB_MODULE}.AdaTokModel"}
    processor = json.loads((tmp_path / "tokenizer" / "preprocessor_config.json").read_text())
    assert processor["auto_map"] == {"AutoImageProcessor": f"{HUB_MODULE}.AdaTokImageProcessor"}
    hub = (tmp_path / "tokenizer" / f"{HUB_MODULE}.py").read_text()
    assert "from adatok_vlm import AdaTokConfig, AdaTokImageProcessor, AdaTokModel" in hub   # both writers kept
    dit_config = json.loads((tmp_path / "dit" / "config.json").read_text())
    assert dit_config["auto_map"]["AutoModel"] == f"{HUB_MODULE}.AdaTokDiT"

    assert type(transformers.AutoModel.from_pretrained(tmp_path, subfolder="tokenizer")) is AdaTokModel
    assert type(transformers.AutoModel.from_pretrained(tmp_path, subfolder="dit")) is AdaTokDiT
    loaded = transformers.AutoImageProcessor.from_pretrained(tmp_path, subfolder="tokenizer")
    assert type(loaded) is AdaTokImageProcessor and (loaded.size, loaded.resize_mode) == (32, "pad")
    assert AdaTokImageProcessor.from_pretrained(tmp_path, subfolder="tokenizer").resize_mode == "pad"
    loaded.save_pretrained(tmp_path / "again")                         # a loaded processor saves its auto_map again
    assert "auto_map" in json.loads((tmp_path / "again" / "preprocessor_config.json").read_text())


def test_push_to_hub_happens_after_the_card_and_auto_map_exist(tmp_path, monkeypatch):
    """``save_pretrained(push_to_hub=True)`` must not let transformers upload before the card is written: it
    pushes afterwards (``push_to_hub`` saves again, card included). The upload itself needs a network."""
    model, pushed = tiny_model(), []
    monkeypatch.setattr(model, "push_to_hub", lambda repo_id, **kw: pushed.append(
        (repo_id, kw, sorted(p.name for p in tmp_path.iterdir()))))
    model.save_pretrained(tmp_path, push_to_hub=True, repo_id="me/adatok-tiny", private=True)
    assert pushed == [("me/adatok-tiny", {"private": True},
                       [MODEL_CARD, f"{HUB_MODULE}.py", "config.json", "model.safetensors"])]


# ============================================================================================
# a fresh interpreter without `import adatok_vlm`
# ============================================================================================
def test_loading_without_import_adatok_vlm_asks_for_trust_remote_code_or_works_with_it(tmp_path):
    """Before this, AutoImageProcessor on a tokenizer folder claimed the folder lacks the
    ``image_processor_type`` key it has, and AutoModel said "does not recognize this architecture"."""
    save_tokenizer(tmp_path / "tokenizer")
    tiny_dit().save_pretrained(tmp_path / "dit")
    script = f"""
import sys, transformers
root = {str(tmp_path)!r}
cases = [(transformers.AutoImageProcessor, "tokenizer"), (transformers.AutoModel, "tokenizer"),
         (transformers.AutoModel, "dit")]
for cls, sub in cases:
    try:
        print("LOADED", type(cls.from_pretrained(root + "/" + sub)).__name__)
    except ValueError as err:
        print("REFUSED", "trust_remote_code" in str(err))
for cls, sub in cases:   # (transformers looks for remote code at the root even with subfolder=: a path here)
    print("REMOTE", type(cls.from_pretrained(root + "/" + sub, trust_remote_code=True)).__name__)
model = transformers.AutoModel.from_pretrained(root + "/tokenizer", trust_remote_code=True)
model.save_pretrained(root + "/resaved")          # register_for_auto_class is a no-op: no source copied
print("RESAVED", sorted(__import__("os").listdir(root + "/resaved")), "adatok_vlm" in sys.modules)
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         stdin=subprocess.DEVNULL, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    # (transformers' "[y/N]" question, answered by the closed stdin, precedes a refusal on the same line)
    marks = ("LOADED", "REFUSED", "REMOTE", "RESAVED")
    lines = [line[min(line.find(m) for m in marks if m in line):]
             for line in run.stdout.splitlines() if any(m in line for m in marks)]
    assert lines == ["REFUSED True"] * 3 + ["REMOTE AdaTokImageProcessor", "REMOTE AdaTokModel", "REMOTE AdaTokDiT",
                                            f"RESAVED ['{MODEL_CARD}', '{HUB_MODULE}.py', 'config.json', "
                                            "'model.safetensors'] True"]
    assert type(AdaTokModel.from_pretrained(tmp_path / "resaved")) is AdaTokModel
