"""Defaults live in the dataclasses; a YAML file under configs/ states only what differs.

For every trainer config file, each value it sets is compared with what the file would get without that
line: the value its ``base:`` chain gives, or else the trainer dataclass's default (for the free-form
``model:`` section, the preset's value; for ``vlm:``, ``AdaTokVLMConfig``'s). A value equal to it restates a
default and fails, unless it is allowed below with a reason. The paper recipes (``*-imagenet.yaml``)
state every value with its source by design (configs/README.md: "Every line says where its value comes
from"), so a restated value is allowed there only when its line carries that comment.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from adatok_vlm.training.config import configs_dir, load_yaml

CONFIGS = configs_dir()

# (file relative to configs/, "section.key") -> why the restated value stays.
ALLOWED: dict[tuple[str, str], str] = {
    ("tokenizer/adatok-tiny.yaml", "model.preset"): "each per-size file names its preset, as adatok-s/b/l.yaml do, "
                                                    "whatever the default preset is",
}

# Files owned by other work (their values are checked by their owners' tests); see the module docstring.
SKIPPED = {"vlm/smollm2-fmnist.yaml"}


def _trainer_config(rel: str):
    """The dataclass of the trainer that reads ``rel`` (None: not a trainer config)."""
    family = rel.split("/")[0]
    if rel == "demo.yaml" or family == "tokenizer":
        from adatok_vlm.training.train_tokenizer import TokenizerTrainingConfig
        return TokenizerTrainingConfig
    if family == "dit":
        from adatok_vlm.training.train_dit import DiTTrainingConfig
        return DiTTrainingConfig
    if family == "vlm":
        from adatok_vlm.training.train_vlm import VLMTrainingConfig
        return VLMTrainingConfig
    if family == "policy":
        from adatok_vlm.training.train_policy import PolicyTrainingConfig
        return PolicyTrainingConfig
    return None


def trainer_files() -> list[str]:
    files = sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml"))
    return [f for f in files if _trainer_config(f) is not None and f not in SKIPPED
            and not f.startswith("policy/")]   # configs/policy/ is checked once its owner (H7) has gone through it


def _model_defaults(rel: str, cls, merged: dict) -> dict:
    """What the ``model:`` section's fields are without the file: its preset's values."""
    default_model = cls().model if hasattr(cls(), "model") else {}
    preset = (merged.get("model") or {}).get("preset", default_model.get("preset"))
    out = {"preset": default_model.get("preset")}
    if preset is None:
        return out
    if cls.__name__ == "DiTTrainingConfig":
        from adatok_vlm.generator.configuration_dit import DIT_PRESETS, AdaTokDiTConfig
        values = AdaTokDiTConfig(**DIT_PRESETS[preset]).to_dict()
    else:
        from adatok_vlm.tokenizer import AdaTokConfig
        values = AdaTokConfig.from_preset(preset).to_dict()
    return {**values, **out}


def _demo_dit_sections() -> dict:
    """demo_dit's own sections: extract_tokens' fields and the sampler's options."""
    from adatok_vlm.sample_c2i import build_parser
    from adatok_vlm.training.extract_tokens import TokenExtractionConfig

    extraction = dataclasses.asdict(TokenExtractionConfig())
    final = vars(build_parser().parse_args(["--dit", "DIT", "--out", "OUT"]))
    return {"images": extraction["data"], "extract": extraction["extract"], "num_tokens": extraction["num_tokens"],
            "final": final}


def defaults_without_the_file(rel: str, root: Path = CONFIGS) -> dict:
    """``{section: {key: value}}`` (and top-level ``{key: value}``) the trainer would use without ``rel``'s lines."""
    path = root / rel
    cls = _trainer_config(rel)
    own = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    merged = load_yaml(path)
    inherited = load_yaml(path.parent / own["base"]) if own.get("base") else {}
    base = dataclasses.asdict(cls())
    base["model"] = _model_defaults(rel, cls, merged)
    if "vlm" in base:
        from adatok_vlm.configuration_vlm import AdaTokVLMConfig
        base["vlm"] = AdaTokVLMConfig().to_dict()

    if rel == "dit/demo-fmnist.yaml":
        base.update(_demo_dit_sections())

    out: dict = {}
    for key in set(base) | set(inherited):
        if isinstance(base.get(key), dict) or isinstance(inherited.get(key), dict):
            out[key] = {**(base.get(key) or {}), **(inherited.get(key) or {})}
        else:
            out[key] = inherited.get(key, base.get(key))
    return out


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


def _line_comment(text: str, section: str | None, key: str) -> str:
    """The trailing comment of ``key:`` inside top-level ``section:`` (or at the top level), or ''."""
    current = None
    for line in text.splitlines():
        top = re.match(r"^([A-Za-z_][\w-]*):", line)
        if top:
            current = top.group(1)
            if section is None and current == key:
                return line.partition("#")[2].strip()
            continue
        inner = re.match(r"^\s+([A-Za-z_][\w-]*):", line)
        if inner and current == section and inner.group(1) == key:
            return line.partition("#")[2].strip()
    return ""


def restated_defaults(rel: str, root: Path = CONFIGS) -> list[str]:
    path = root / rel
    text = path.read_text(encoding="utf-8")
    own = yaml.safe_load(text) or {}
    ref = defaults_without_the_file(rel, root)
    found = []
    for section, value in own.items():
        if section == "base":
            continue
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for key, v in items:
            where = section if key is None else f"{section}.{key}"
            default = ref.get(section) if key is None else (ref.get(section) or {}).get(key, object())
            if key is not None and not isinstance(ref.get(section), dict):
                continue
            if not _same(v, default):
                continue
            if (rel, where) in ALLOWED:
                continue
            if rel.endswith("-imagenet.yaml") and _line_comment(text, section if key else None, key or section):
                continue
            found.append(f"{where}: {v!r}")
    return found


@pytest.mark.parametrize("rel", trainer_files())
def test_no_yaml_restates_a_default(rel):
    found = restated_defaults(rel)
    assert not found, (f"configs/{rel} restates defaults (delete the lines, or allow them in "
                       f"tests/test_config_defaults.py with a reason): {found}")


def test_the_checker_catches_a_restated_default(tmp_path):
    """The check can fail: a file repeating a LoopConfig default, a preset's width and its base's value."""
    (tmp_path / "dit").mkdir()
    (tmp_path / "dit" / "base.yaml").write_text("train:\n  lr: 3.0e-4\n", encoding="utf-8")
    (tmp_path / "dit" / "x.yaml").write_text(
        "base: base.yaml\nmodel:\n  preset: dit-s\n  hidden_size: 384\ntrain:\n  lr: 3.0e-4\n"
        "  grad_clip: 1.0\n  max_steps: 7\nsample:\n  cfg_scale: 4.0\n", encoding="utf-8")
    found = restated_defaults("dit/x.yaml", tmp_path)
    assert sorted(found) == ["model.hidden_size: 384", "sample.cfg_scale: 4.0", "train.grad_clip: 1.0",
                             "train.lr: 0.0003"]


def test_allowed_entries_are_used():
    """An allowance for a line that no longer restates a default is stale."""
    for rel, where in ALLOWED:
        assert (CONFIGS / rel).is_file(), rel
        section, _, key = where.partition(".")
        own = yaml.safe_load((CONFIGS / rel).read_text(encoding="utf-8"))
        assert key in (own.get(section) or {}), f"ALLOWED names {rel} {where}, which the file does not set"
