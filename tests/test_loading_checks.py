"""Loading checks what it loads (issue 20, "the wrong folder"), for the tokenizer and the DiT.

Every case a careful or clumsy user meets, each now an early, named error before anything is built:
a folder of another of our models (the message names the class to use), a missing ``config.json``,
one holding a list or garbage, a typo'd relative path or a missing absolute path (a
``FileNotFoundError`` without any network call, even with ``HF_HUB_OFFLINE`` unset), config sizes
that would allocate terabytes, a damaged ``model.safetensors`` (zero bytes, truncated, random bytes:
an ``OSError`` naming the file), a pickle-only folder (refused, never unpickled, no advice to disable
``weights_only``), and ``subfolder=`` loading.
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from adatok_vlm import AdaTokConfig, AdaTokDiT, AdaTokDiTConfig, AdaTokModel, ClassToImagePipeline
from adatok_vlm.tokenizer.loading import DamagedWeightsError, PickledWeightsError, check_pretrained_folder
from conftest import tiny_model


def tiny_dit() -> AdaTokDiT:
    torch.manual_seed(0)
    return AdaTokDiT(AdaTokDiTConfig.from_preset("dit-tiny", token_dim=16, max_tokens=12, num_classes=3)).eval()


BUILDERS = {"AdaTokModel": (AdaTokModel, tiny_model), "AdaTokDiT": (AdaTokDiT, tiny_dit)}
NAMES = sorted(BUILDERS)


@pytest.fixture(scope="module")
def saved_folders(tmp_path_factory) -> dict[str, Path]:
    """One saved folder per model, built once; tests copy them before damaging anything."""
    root = tmp_path_factory.mktemp("saved")
    folders = {}
    for name, (_, build) in BUILDERS.items():
        build().save_pretrained(root / name)
        folders[name] = root / name
    return folders


def copy_of(saved_folders, name: str, tmp_path: Path) -> Path:
    target = tmp_path / name
    shutil.copytree(saved_folders[name], target)
    return target


class NeverBuilt:
    """Replaces a model class's ``__init__`` so a test proves the check ran before anything was built."""

    def __init__(self, monkeypatch, *classes):
        self.calls = 0
        for cls in classes:
            monkeypatch.setattr(cls, "__init__", self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        raise AssertionError("a model was built before the folder was checked")


@pytest.fixture
def no_network(monkeypatch):
    """``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` unset; every DNS lookup or connect is recorded and refused."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[1:] if args else kwargs)
        raise OSError("network access attempted in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


# ============================================================================================
# a folder of another model
# ============================================================================================
@pytest.mark.parametrize("name, other", [("AdaTokModel", "AdaTokDiT"), ("AdaTokDiT", "AdaTokModel")])
def test_a_folder_of_the_other_model_names_the_right_class_before_building(saved_folders, monkeypatch, name, other):
    cls = BUILDERS[name][0]
    spy = NeverBuilt(monkeypatch, AdaTokModel, AdaTokDiT)
    with pytest.raises(ValueError, match=f"not {name}.*load it with adatok_vlm.{other}"):
        cls.from_pretrained(saved_folders[other])
    assert spy.calls == 0


@pytest.mark.parametrize("name", NAMES)
def test_a_vlm_folder_loaded_as_tokenizer_or_dit_names_the_vlm_class(saved_folders, tmp_path, monkeypatch, name):
    folder = copy_of(saved_folders, name, tmp_path)
    (folder / "config.json").write_text(json.dumps({"model_type": "adatok_vlm"}))
    spy = NeverBuilt(monkeypatch, AdaTokModel, AdaTokDiT)
    with pytest.raises(ValueError, match="'adatok_vlm' model.*AdaTokVLMForCausalLM"):
        BUILDERS[name][0].from_pretrained(folder)
    assert spy.calls == 0


@pytest.mark.parametrize("name", NAMES)
def test_a_foreign_or_missing_model_type_is_named(saved_folders, tmp_path, name):
    folder = copy_of(saved_folders, name, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError, match="'llama' model, not .*AutoModel"):
        BUILDERS[name][0].from_pretrained(folder)
    del config["model_type"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="has no 'model_type'"):
        BUILDERS[name][0].from_pretrained(folder)


# ============================================================================================
# config.json: missing, a list, garbage
# ============================================================================================
@pytest.mark.parametrize("name", NAMES)
def test_a_folder_without_config_json_is_a_file_not_found_error(saved_folders, tmp_path, monkeypatch, name):
    folder = copy_of(saved_folders, name, tmp_path)
    (folder / "config.json").unlink()
    cls = BUILDERS[name][0]
    spy = NeverBuilt(monkeypatch, AdaTokModel, AdaTokDiT)
    for load in (cls.from_pretrained, cls.config_class.from_pretrained):
        with pytest.raises(FileNotFoundError, match="has no config.json") as info:
            load(folder)
        assert str(folder) in str(info.value)
    assert spy.calls == 0


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("content, what", [(b"[1, 2, 3]", "JSON list"), (b"\x89PNG\x00\xff garbage", "not valid JSON"),
                                           (b'{"model_type": "adatok"', "not valid JSON"), (b"", "not valid JSON")])
def test_a_config_json_that_is_not_an_object_names_the_file(saved_folders, tmp_path, name, content, what):
    folder = copy_of(saved_folders, name, tmp_path)
    (folder / "config.json").write_bytes(content)
    cls = BUILDERS[name][0]
    for load in (cls.from_pretrained, cls.config_class.from_pretrained):
        with pytest.raises(ValueError, match=what) as info:
            load(folder)
        assert str(folder / "config.json") in str(info.value)


# ============================================================================================
# paths that do not exist: no network
# ============================================================================================
@pytest.mark.parametrize("name", NAMES)
def test_missing_paths_are_file_not_found_without_any_network_call(saved_folders, tmp_path, monkeypatch, no_network,
                                                                    name):
    cls = BUILDERS[name][0]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    shutil.copytree(saved_folders[name], tmp_path / "outputs" / "model")
    cases = {
        "outputs/modl": "no such folder",                          # a typo next to the real folder
        "./outputs/model-x": "no such folder",
        str(tmp_path / "nowhere" / "model"): "no such folder",      # a missing absolute path
        "outptus/model": "no such model in the local Hugging Face cache",   # parent missing: hub-shaped
        "no-such-model": "no such model in the local Hugging Face cache",
        "a/b/c": "no such folder",                                  # not a hub id
    }
    for path, message in cases.items():
        for load in (cls.from_pretrained, cls.config_class.from_pretrained):
            with pytest.raises(FileNotFoundError, match=message) as info:
                load(path)
            assert path in str(info.value)
    assert no_network == [], f"network access attempted: {no_network}"
    # The real folder next to the typo still loads, offline.
    assert type(cls.from_pretrained("outputs/model")) is cls
    assert no_network == []


@pytest.mark.parametrize("name", NAMES)
def test_a_weights_file_instead_of_its_folder_is_named(saved_folders, name):
    with pytest.raises(NotADirectoryError, match="is a file, not a model folder"):
        BUILDERS[name][0].from_pretrained(saved_folders[name] / "model.safetensors")


def test_the_check_itself_is_usable_by_every_loader(saved_folders, tmp_path, no_network):
    """``check_pretrained_folder`` (which the VLM's loader calls too) accepts a tuple of types and returns the folder."""
    folder = saved_folders["AdaTokDiT"]
    assert check_pretrained_folder(folder, ("adatok", "adatok_dit"), what="x") == folder
    assert check_pretrained_folder(str(folder), None) == folder
    with pytest.raises(TypeError, match="pretrained_model_name_or_path"):
        check_pretrained_folder(3, "adatok")
    with pytest.raises(FileNotFoundError, match="subfolder 'nope'"):
        check_pretrained_folder(folder, "adatok_dit", subfolder="nope")
    assert no_network == []


# ============================================================================================
# config sizes: bounded before allocation
# ============================================================================================
HUGE_FIELDS = {
    "AdaTokModel": [({"num_latent_tokens": 10**12}, "num_latent_tokens"),
                    ({"hidden_size": 2**20, "decoder_hidden_size": 2**20}, "hidden_size=1048576"),
                    ({"image_size": 2**20, "patch_size": 1}, "num_patches")],
    "AdaTokDiT": [({"max_tokens": 10**12}, "max_tokens"), ({"hidden_size": 2**20}, "hidden_size=1048576"),
                  ({"num_classes": 10**9}, "num_classes=1000000000")],
}


@pytest.mark.parametrize("name", NAMES)
def test_huge_config_sizes_are_rejected_before_allocation(saved_folders, tmp_path, monkeypatch, name):
    cls = BUILDERS[name][0]
    spy = NeverBuilt(monkeypatch, AdaTokModel, AdaTokDiT)
    for fields, message in HUGE_FIELDS[name]:
        folder = copy_of(saved_folders, name, tmp_path / message.split("=")[0])
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **fields}))
        for load in (cls.from_pretrained, transformers.AutoModel.from_pretrained):
            with pytest.raises(ValueError, match=message):
                load(folder)
        with pytest.raises(ValueError, match=message):
            cls.config_class(**{**config, **fields})
    assert spy.calls == 0


def test_every_preset_is_far_inside_the_bounds():
    from adatok_vlm.generator.configuration_dit import DIT_PRESETS
    from adatok_vlm.tokenizer.configuration_adatok import ADATOK_PRESETS
    from adatok_vlm.tokenizer.validation import MAX_PARAMETERS, estimate_adatok_parameters, estimate_dit_parameters

    for preset in ADATOK_PRESETS:
        assert estimate_adatok_parameters(AdaTokConfig.from_preset(preset)) < MAX_PARAMETERS / 10
    for preset in DIT_PRESETS:
        config = AdaTokDiTConfig.from_preset(preset, token_dim=32, max_tokens=1024, num_classes=1000)
        assert estimate_dit_parameters(config) < MAX_PARAMETERS / 10
    # the estimate tracks the real count of a built model
    for model in (tiny_model(), tiny_dit()):
        estimate = (estimate_adatok_parameters if isinstance(model, AdaTokModel) else estimate_dit_parameters)(
            model.config)
        assert abs(estimate / model.num_parameters() - 1) < 0.05


# ============================================================================================
# damaged and pickled weights
# ============================================================================================
def damage(path: Path, kind: str) -> None:
    data = path.read_bytes()
    path.write_bytes({"zero bytes": b"", "truncated": data[: len(data) // 2], "header only": data[:8],
                      "random bytes": torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)
                                                    ).to(torch.uint8).numpy().tobytes()}[kind])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", ["zero bytes", "truncated", "header only", "random bytes"])
def test_a_damaged_model_safetensors_is_an_os_error_naming_the_file(saved_folders, tmp_path, name, kind):
    folder = copy_of(saved_folders, name, tmp_path)
    weights = folder / "model.safetensors"
    damage(weights, kind)
    for load in (BUILDERS[name][0].from_pretrained, transformers.AutoModel.from_pretrained):
        with pytest.raises(DamagedWeightsError) as info:
            load(folder)
        message = str(info.value)
        assert isinstance(info.value, OSError)
        assert str(weights) in message and "damaged" in message and "re-download" in message
        assert "weights_only" not in message


def test_a_damaged_shard_index_is_named(saved_folders, tmp_path):
    folder = copy_of(saved_folders, "AdaTokModel", tmp_path)
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    (folder / "model.safetensors.index.json").write_bytes(b"\x00\x01 not json")
    with pytest.raises(DamagedWeightsError, match="model.safetensors.index.json is damaged"):
        AdaTokModel.from_pretrained(folder)
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00001.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors: a weights shard named in"):
        AdaTokModel.from_pretrained(folder)


@pytest.mark.parametrize("name", NAMES)
def test_a_pickle_only_folder_is_refused_even_with_use_safetensors_false(saved_folders, tmp_path, name):
    folder = copy_of(saved_folders, name, tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pickle_ran.txt"
    from test_loading import _Bomb

    torch.save({**state, "bomb": _Bomb(str(marker))}, folder / "pytorch_model.bin")
    cls = BUILDERS[name][0]
    for kwargs in ({}, {"use_safetensors": False}, {"use_safetensors": None}):
        with pytest.raises(PickledWeightsError, match="pytorch_model.bin.*never unpickles") as info:
            cls.from_pretrained(folder, **kwargs)
        assert "weights_only" not in str(info.value)
    assert not marker.exists(), "the pickled payload was executed"
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        cls.from_pretrained(folder)


@pytest.mark.parametrize("name", NAMES)
def test_use_safetensors_false_is_refused_by_name(saved_folders, name):
    with pytest.raises(ValueError, match="use_safetensors=False"):
        BUILDERS[name][0].from_pretrained(saved_folders[name], use_safetensors=False)


# ============================================================================================
# subfolder=
# ============================================================================================
@pytest.mark.parametrize("name", NAMES)
def test_subfolder_loading_works_and_a_missing_subfolder_is_named(saved_folders, tmp_path, name):
    cls = BUILDERS[name][0]
    parent = tmp_path / "bundle"
    shutil.copytree(saved_folders[name], parent / "part")
    model = cls.from_pretrained(parent, subfolder="part")
    reference = load_file(str(saved_folders[name] / "model.safetensors"))
    loaded = model.state_dict()
    assert type(model) is cls and all(torch.equal(loaded[k], v) for k, v in reference.items())
    assert type(cls.config_class.from_pretrained(parent, subfolder="part")) is cls.config_class
    with pytest.raises(FileNotFoundError, match="no subfolder 'prat'"):
        cls.from_pretrained(parent, subfolder="prat")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        cls.from_pretrained(parent)          # the parent itself is not a model folder


def test_the_pipeline_loader_names_a_swapped_pair(saved_folders):
    with pytest.raises(ValueError, match="load it with adatok_vlm.AdaTokModel"):
        ClassToImagePipeline.from_pretrained(saved_folders["AdaTokModel"], saved_folders["AdaTokDiT"])
    pipe = ClassToImagePipeline.from_pretrained(saved_folders["AdaTokDiT"], saved_folders["AdaTokModel"])
    assert isinstance(pipe.dit, AdaTokDiT) and isinstance(pipe.adatok, AdaTokModel)



def test_a_sharded_checkpoint_still_loads_and_a_damaged_shard_is_named(tmp_path):
    from safetensors.torch import save_file

    model = tiny_model()
    model.save_pretrained(tmp_path / "sharded")
    folder = tmp_path / "sharded"
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    keys = sorted(state)
    shards = [folder / "model-00001-of-00002.safetensors", folder / "model-00002-of-00002.safetensors"]
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    for shard, part in zip(shards, halves):
        save_file({k: state[k] for k in part}, str(shard), metadata={"format": "pt"})
    weight_map = {k: shard.name for shard, part in zip(shards, halves) for k in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    loaded = AdaTokModel.from_pretrained(tmp_path / "sharded").state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    damage(shards[-1], "truncated")
    with pytest.raises(DamagedWeightsError) as info:
        AdaTokModel.from_pretrained(tmp_path / "sharded")
    assert str(shards[-1]) in str(info.value)
