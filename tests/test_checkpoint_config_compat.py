"""A checkpoint written before a config field existed resumes while the run keeps that field's default.

A new release that adds a field to ``AdaTokConfig`` (say a policy option, default off) must not turn every
older checkpoint into "written for another model config: <field>: saved '<absent>' vs now False"; a run that
sets the new field to a non-default value is still refused, naming it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adatok_vlm.tokenizer import AdaTokConfig
from adatok_vlm.training.checkpointing import CheckpointManager
from adatok_vlm.training.integrity import MANIFEST, _read_json, config_defaults, config_differences


def _manager(out, config) -> CheckpointManager:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    return CheckpointManager(out, {"model": model}, {"optimizer": torch.optim.SGD(model.parameters(), lr=0.1)},
                             model_config=config)


def _drop_from_manifest(checkpoint, field: str) -> None:
    """Rewrite the manifest as an older release wrote it: without ``field`` in its model config (the manifest's
    own checksum covers the files, not the config, so the checkpoint stays valid)."""
    import json

    path = checkpoint / MANIFEST
    manifest = _read_json(path)
    del manifest["model_config"][field]
    path.write_text(json.dumps(manifest))


def test_a_field_absent_from_the_saved_config_counts_as_its_default(tmp_path):
    config = AdaTokConfig(preset="adatok-tiny")
    saved = _manager(tmp_path, config).save(3, {"step": 3})
    _drop_from_manifest(saved, "policy_image_statistics")

    assert _manager(tmp_path, AdaTokConfig(preset="adatok-tiny")).load()["step"] == 3

    changed = AdaTokConfig(preset="adatok-tiny", policy_image_statistics=True)
    with pytest.raises(ValueError, match=r"policy_image_statistics: saved False vs now True"):
        _manager(tmp_path, changed).load()


def test_without_defaults_an_absent_field_is_still_a_difference():
    saved, now = {"a": 1}, {"a": 1, "b": False}
    assert config_differences(saved, now) == ["b: saved '<absent>' vs now False"]
    assert config_differences(saved, now, {"a": 0, "b": False}) == []
    assert config_differences(saved, {"a": 1, "b": True}, {"a": 0, "b": False}) == ["b: saved False vs now True"]
    # a plain mapping has no class defaults to fall back on
    assert config_defaults({"a": 1}) is None and config_defaults(None) is None
    assert config_defaults(AdaTokConfig())["policy_image_statistics"] is False


def test_the_loop_records_the_defaults_of_each_trainer_s_model_config():
    """What ``training.loop`` hands the checkpoint manager: the architecture dict and the class defaults
    beside it, so a trainer's resume applies the rule above."""
    from adatok_vlm import AdaTokModel
    from adatok_vlm.training.loop import NOT_ARCHITECTURE, architecture

    model = AdaTokModel(AdaTokConfig(preset="adatok-tiny"))
    now, defaults = architecture(model), architecture(model, defaults=True)
    assert defaults["policy_image_statistics"] is False and defaults["vae_autocast"] is None
    assert set(defaults) >= set(now) - {"preset"} and not set(NOT_ARCHITECTURE) & set(defaults)
    assert architecture(nn.Linear(2, 2)) is None and architecture(nn.Linear(2, 2), defaults=True) is None
