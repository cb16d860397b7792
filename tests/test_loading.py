"""Loading is safe and strict (issue 9): safetensors only, no unpickling, no foreign code, no silent mismatch.

* ``AdaTokModel.from_pretrained`` / ``AdaTokDiT.from_pretrained`` (and ``AutoModel``, which calls them)
  raise a ``ValueError`` naming every missing, unexpected and shape-mismatched weight, and a
  ``config.json`` of another ``model_type``, where transformers only warns; ``strict=False`` opts out.
* A folder holding only a pickled ``pytorch_model.bin`` is refused, and the pickle never runs.
* Code in a checkpoint folder (``auto_map``) never runs without ``trust_remote_code=True``.
* Every ``torch.load`` in the repository passes ``weights_only=True``.
"""

from __future__ import annotations

import io
import json
import tokenize
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from adatok_vlm import AdaTokDiT, AdaTokDiTConfig, AdaTokModel
from conftest import tiny_model

REPO = Path(__file__).resolve().parents[1]


def tiny_dit() -> AdaTokDiT:
    torch.manual_seed(0)
    return AdaTokDiT(AdaTokDiTConfig.from_preset("dit-tiny", token_dim=16, max_tokens=12, num_classes=3)).eval()


BUILDERS = {"AdaTokModel": (AdaTokModel, tiny_model), "AdaTokDiT": (AdaTokDiT, tiny_dit)}


def saved(tmp_path, name: str) -> tuple[type, Path, dict]:
    cls, build = BUILDERS[name]
    folder = tmp_path / name
    build().save_pretrained(folder)
    return cls, folder, load_file(str(folder / "model.safetensors"))


def rewrite(folder: Path, state: dict) -> None:
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_a_matching_checkpoint_loads_identically(tmp_path, name):
    cls, folder, state = saved(tmp_path, name)
    for model in (cls.from_pretrained(folder), transformers.AutoModel.from_pretrained(folder)):
        assert type(model) is cls
        loaded = model.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in state.items())
    model, info = cls.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_missing_unexpected_and_mismatched_weights_raise_with_their_names(tmp_path, name):
    cls, folder, state = saved(tmp_path, name)
    keys = sorted(state)
    missing, reshaped = keys[0], next(k for k in keys[1:] if state[k].dim() == 2)
    broken = {k: v for k, v in state.items() if k != missing}
    broken[reshaped] = torch.zeros(3, 5)
    broken["extra.weight"] = torch.zeros(2)
    rewrite(folder, broken)
    for load in (cls.from_pretrained, transformers.AutoModel.from_pretrained):
        with pytest.raises(ValueError) as info:
            load(folder)
        message = str(info.value)
        assert missing in message and "extra.weight" in message and reshaped in message
        assert "(3, 5)" in message and "strict=False" in message
    # ignore_mismatched_sizes allows only the shape mismatch; strict=False restores transformers' warnings.
    with pytest.raises(ValueError, match="extra.weight") as info:
        cls.from_pretrained(folder, ignore_mismatched_sizes=True)
    assert reshaped not in str(info.value)
    model, info = cls.from_pretrained(folder, strict=False, ignore_mismatched_sizes=True, output_loading_info=True)
    assert info["missing_keys"] == {missing} and info["unexpected_keys"] == {"extra.weight"}


def test_only_an_unexpected_key_is_enough_to_refuse(tmp_path):
    cls, folder, state = saved(tmp_path, "AdaTokModel")
    rewrite(folder, {**state, "policy.net.0.weight": torch.zeros(4, 4)})
    with pytest.raises(ValueError, match=r"unexpected in the checkpoint: \['policy.net.0.weight'\]"):
        cls.from_pretrained(folder)


@pytest.mark.parametrize("name, other", [("AdaTokModel", "AdaTokDiT"), ("AdaTokDiT", "AdaTokModel")])
def test_a_config_of_another_model_type_raises(tmp_path, name, other):
    _, folder, _ = saved(tmp_path, other)
    cls = BUILDERS[name][0]
    with pytest.raises(ValueError, match="model_type.*expected") as info:
        cls.from_pretrained(folder)
    assert cls.config_class.model_type in str(info.value)
    with pytest.raises(ValueError, match="model_type"):
        cls.config_class.from_pretrained(folder)


def test_a_checkpoint_whose_config_lies_about_its_weights_raises(tmp_path):
    """config.json says "adatok" but the weights are a DiT's: AutoModel picks AdaTokModel, which refuses."""
    _, adatok_folder, _ = saved(tmp_path, "AdaTokModel")
    _, _, dit_state = saved(tmp_path, "AdaTokDiT")
    rewrite(adatok_folder, dit_state)
    with pytest.raises(ValueError, match="missing from the checkpoint.*unexpected in the checkpoint"):
        transformers.AutoModel.from_pretrained(adatok_folder)


PICKLE_BOMB_MARKER = "pickle_ran.txt"


class _Bomb:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "the pickle ran"))


def test_a_pickle_only_checkpoint_is_refused_and_never_unpickled(tmp_path):
    _, folder, state = saved(tmp_path, "AdaTokModel")
    marker = tmp_path / PICKLE_BOMB_MARKER
    (folder / "model.safetensors").unlink()
    torch.save({**state, "bomb": _Bomb(str(marker))}, folder / "pytorch_model.bin")
    for load in (AdaTokModel.from_pretrained, transformers.AutoModel.from_pretrained):
        with pytest.raises(OSError, match="safetensors"):
            load(folder)
    assert not marker.exists(), "the pickled payload was executed"


REMOTE_CODE = """
from pathlib import Path
Path({marker!r}).write_text("remote code ran")
from adatok_vlm import AdaTokModel as EvilModel, AdaTokConfig as EvilConfig, AdaTokImageProcessor as EvilProcessor
"""


def test_code_in_a_checkpoint_folder_never_runs_without_trust_remote_code(tmp_path):
    _, folder, _ = saved(tmp_path, "AdaTokModel")
    from adatok_vlm import AdaTokImageProcessor

    AdaTokImageProcessor(size=32).save_pretrained(folder)
    marker = tmp_path / "remote_ran.txt"
    (folder / "evil.py").write_text(REMOTE_CODE.format(marker=str(marker)))
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    processor_config = json.loads((folder / "preprocessor_config.json").read_text())
    processor_config["auto_map"] = {"AutoImageProcessor": "evil.EvilProcessor"}
    (folder / "preprocessor_config.json").write_text(json.dumps(processor_config))

    for load in (lambda: AdaTokModel.from_pretrained(folder), lambda: transformers.AutoModel.from_pretrained(folder),
                 lambda: transformers.AutoConfig.from_pretrained(folder),
                 lambda: transformers.AutoImageProcessor.from_pretrained(folder)):
        try:
            load()
        except (ValueError, OSError):
            pass                     # refusing is fine too; running the code is not
        assert not marker.exists(), "code from the checkpoint folder ran without trust_remote_code"


def torch_load_calls(source: str):
    """``(line, weights_only_true)`` for every ``torch.load(...)`` call in Python code (not in strings or comments)."""
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(source).readline)
              if t.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT)]
    for i in range(len(tokens) - 3):
        if [t.string for t in tokens[i: i + 4]] == ["torch", ".", "load", "("]:
            depth, call = 0, []
            for t in tokens[i + 3:]:
                depth += {"(": 1, ")": -1}.get(t.string, 0) if t.type == tokenize.OP else 0
                call.append(t.string)
                if depth == 0:
                    break
            text = "".join(call)
            yield tokens[i].start[0], "weights_only=True" in text


def test_every_torch_load_in_the_repository_is_weights_only():
    offenders, checked = [], 0
    for path in REPO.rglob("*.py"):
        if any(part in {".venv", "build", "outputs", ".git"} or part.endswith(".egg-info") for part in path.parts):
            continue
        for line, safe in torch_load_calls(path.read_text(encoding="utf-8")):
            checked += 1
            if not safe:
                offenders.append(f"{path.relative_to(REPO)}:{line}")
    assert checked >= 2, "the scan found the known torch.load calls (fid.py, lpips.py)"
    assert not offenders, "torch.load without weights_only=True at " + ", ".join(offenders)
