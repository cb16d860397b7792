"""One table of presets per model family, each beside its config, and the README's "Presets" tables are
those tables: every preset, its sizes and its parameter count, counted here from the code (models built on
the meta device: no weights are allocated).

    python tests/test_presets.py      # prints the three tables as the README's "Presets" section holds them
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
# The DiT's size depends on the tokens it models: counted for adatok-s tokens of ImageNet (the paper's setting).
DIT_DATA = dict(token_dim=16, max_tokens=256, num_classes=1000)


def millions(n: int) -> str:
    """A parameter count as the README prints it: ``281.6k``, ``1.65M``, ``82.5M``."""
    if n < 1e6:
        return f"{n / 1e3:.1f}k"
    return f"{n / 1e6:.2f}M" if n < 10e6 else f"{n / 1e6:.1f}M"


def _count(model: torch.nn.Module, trainable: bool | None = None) -> int:
    return sum(p.numel() for p in model.parameters() if trainable is None or p.requires_grad == trainable)


# ---------------------------------------------------------------------------------------------
# the three tables, rendered from the preset dicts
# ---------------------------------------------------------------------------------------------
def adatok_table() -> list[str]:
    from adatok_vlm import AdaTokConfig, AdaTokModel
    from adatok_vlm.tokenizer.configuration_adatok import ADATOK_PRESETS, VAE_ARCHITECTURES

    lines = ["<!-- from code: AdaTokConfig.from_preset (tests/test_readme.py and tests/test_presets.py count each "
             "preset's parameters) -->",
             "| preset | input | latent space | tokens `m` x dim | encoder / decoder | trainable params |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name in ADATOK_PRESETS:
        c = AdaTokConfig.from_preset(name)
        if c.latent_space == "pixel":
            space = "pixels"
        else:
            arch = next((k for k, v in VAE_ARCHITECTURES.items() if v == c.vae_config), "custom")
            space = f"VAE {arch} (frozen)"
        with torch.device("meta"):
            model = AdaTokModel(AdaTokConfig.from_preset(name, **({} if c.latent_space == "pixel"
                                                                  else {"vae_random_init": True})))
        width = (str(c.hidden_size) if c.hidden_size == c.decoder_hidden_size
                 else f"{c.hidden_size} / {c.decoder_hidden_size}")
        lines.append(f"| `{name}` | {c.image_size}x{c.image_size} | {space}, patch {c.patch_size} ({c.num_patches} "
                     f"patches) | {c.num_latent_tokens} x {c.token_dim} | {c.num_encoder_layers} / "
                     f"{c.num_decoder_layers} layers, width {width} | {millions(_count(model, True))} |")
    return lines


def dit_table() -> list[str]:
    from adatok_vlm.generator import DIT_PRESETS, AdaTokDiT, AdaTokDiTConfig

    lines = ["<!-- from code: DIT_PRESETS (tests/test_presets.py counts each preset's parameters) -->",
             "| preset | hidden | depth | heads | mlp ratio | params (16-dim tokens, `m` = 256, 1000 classes) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name in DIT_PRESETS:
        c = AdaTokDiTConfig.from_preset(name, **DIT_DATA)
        with torch.device("meta"):
            model = AdaTokDiT(c)
        lines.append(f"| `{name}` | {c.hidden_size} | {c.depth} | {c.num_heads} | {c.mlp_ratio:g} | "
                     f"{millions(_count(model))} |")
    return lines


def lm_table() -> list[str]:
    from transformers import AutoConfig, AutoModelForCausalLM

    from adatok_vlm.configuration_vlm import LM_PRESETS
    from adatok_vlm.training.train_vlm import char_tokenizer

    tok = char_tokenizer()
    vocab = len(tok)
    lines = ["<!-- from code: LM_PRESETS (tests/test_presets.py counts each preset's parameters) -->",
             f"| preset | model type | hidden | layers | heads (key/value) | params ({vocab}-character vocabulary) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, fields in LM_PRESETS.items():
        fields = dict(fields)
        config = AutoConfig.for_model(fields.pop("model_type"), **fields, vocab_size=vocab, pad_token_id=tok.pad_token_id,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        lines.append(f"| `{name}` | {config.model_type} | {config.hidden_size} | {config.num_hidden_layers} | "
                     f"{heads} ({kv}) | {millions(_count(model))} |")
    return lines


TABLES = {"tokenizer (AdaTok)": adatok_table, "generator (DiT)": dit_table, "VLM language models": lm_table}


# ---------------------------------------------------------------------------------------------
# the README holds them
# ---------------------------------------------------------------------------------------------
def presets_section() -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"^## Presets\n(.*?)^## ", text, flags=re.S | re.M)
    assert match, "README.md has no '## Presets' section"
    return match.group(1)


@pytest.mark.parametrize("family", list(TABLES))
def test_readme_presets_table_is_the_code_s(family):
    """Every preset of the family, in the dict's order, with the sizes and counts the code gives."""
    expected = "\n".join(TABLES[family]())
    assert expected in presets_section(), (f"README.md's Presets table for the {family} is stale; print the "
                                           f"current one with `python tests/test_presets.py`:\n{expected}")


def test_each_family_has_one_preset_table_beside_its_config():
    """The presets live once, in the config module of their family (and the old homes only re-export them)."""
    from adatok_vlm import configuration_vlm
    from adatok_vlm.generator import configuration_dit
    from adatok_vlm.tokenizer import configuration_adatok
    from adatok_vlm.training import train_vlm

    assert set(configuration_adatok.ADATOK_PRESETS) >= {"adatok-tiny", "adatok-s"}
    assert set(configuration_dit.DIT_PRESETS) >= {"dit-tiny", "dit-xl"}
    assert train_vlm.LM_PRESETS is configuration_vlm.LM_PRESETS
    import adatok_vlm.training.demo_dit as demo_dit
    assert not hasattr(demo_dit, "DEMO_DEFAULTS")                      # the demo's settings are a config file
    assert demo_dit.REPO_CONFIG.name == "demo-fmnist.yaml" and demo_dit.REPO_CONFIG.is_file()


def test_a_changed_preset_fails_the_table_check(monkeypatch):
    """The check can fail: a preset whose depth changes no longer matches the README row."""
    from adatok_vlm.generator import configuration_dit

    monkeypatch.setitem(configuration_dit.DIT_PRESETS, "dit-s", dict(hidden_size=384, depth=13, num_heads=6))
    with pytest.raises(AssertionError, match="stale"):
        test_readme_presets_table_is_the_code_s("generator (DiT)")


if __name__ == "__main__":
    for family, render in TABLES.items():
        print(f"{family}:\n")
        print("\n".join(render()), end="\n\n")
