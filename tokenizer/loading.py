"""Checks every ``from_pretrained`` of ours runs before it builds anything (issue 20, "the wrong folder").

transformers, given a folder that is not what the caller thinks, does surprising things: a path that
does not exist is sent to the Hugging Face hub (tens of seconds of retries, then a message about repo
ids), a folder without ``config.json`` silently gets a default config, a ``config.json`` of another
model only warns, a damaged ``model.safetensors`` raises a ``SafetensorError`` that names no file.
These helpers turn each of those into an early, named error:

* :func:`check_pretrained_folder`: the path, ``config.json`` and its ``model_type``; never touches
  the network. A path that looks local (absolute, ``./``, ``../``, ``~``, an existing parent folder,
  or not a valid hub id) and does not exist is a ``FileNotFoundError``. Anything else is a hub id,
  which is read from the local Hugging Face cache only unless ``local_files_only=False`` (nothing is
  downloaded by default, DESIGN.md).
* :func:`check_weight_files`: the weights are safetensors whose headers parse; a pickle-only folder
  (``pytorch_model.bin``, ``*.pt``) is refused without unpickling it; a damaged file is a
  :class:`DamagedWeightsError` (an ``OSError``) naming it.
* :func:`load_checked`: both checks, then the strict load of ``validation.load_pretrained_strictly``,
  with any ``SafetensorError`` still raised during the load named as a damaged file.

The three model types of the project and the class that loads each are read from the config classes
(:func:`known_model_types`), so a folder of one of them loaded with another names the right class.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from safetensors import SafetensorError

CONFIG_NAME = "config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
# Pickled weight files: never opened here (unpickling can run code), only recognised to refuse them.
PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class DamagedWeightsError(OSError):
    """A weights file exists but cannot be read (zero bytes, truncated, random bytes, a bad index)."""


class PickledWeightsError(OSError):
    """A folder holds only pickled weights, which are never unpickled here."""


# ============================================================================================
# helpers
# ============================================================================================
# ``model_type -> the class that loads it`` for the project's three models. Written out here (not read
# from the config classes) because the DiT's and the VLM's live in layers above this one;
# ``tests/test_architecture.py`` checks it against the classes' own ``model_type``.
MODEL_CLASSES = {"adatok": "AdaTokModel", "adatok_dit": "AdaTokDiT", "adatok_vlm": "AdaTokVLMForCausalLM"}


def known_model_types() -> dict[str, str]:
    """``model_type -> the class that loads it`` (:data:`MODEL_CLASSES`)."""
    return dict(MODEL_CLASSES)


def model_fingerprint(path: str | os.PathLike) -> str:
    """SHA-256 (16 hex digits) of a saved model folder's ``config.json`` and ``*.safetensors``: which weights.

    A model folder's identity, below every layer: a token cache records its tokenizer's fingerprint
    (``extract_tokens``), the DiT export copies it, and sampling warns when ``--tokenizer`` names
    other weights.
    """
    path = Path(path)
    digest = hashlib.sha256()
    for file in [path / CONFIG_NAME] + sorted(path.glob("*.safetensors")):
        if file.is_file():
            digest.update(file.name.encode())
            with open(file, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    digest.update(chunk)
    return digest.hexdigest()[:16]


def is_hub_id(name: str) -> bool:
    """``name`` has the shape of a Hugging Face repo id (``repo`` or ``namespace/repo``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def looks_local(name: str) -> bool:
    """True when ``name`` can only mean a local path: absolute, ``./``/``../``/``~``, an existing parent
    folder (``outputs/modl`` with ``outputs/`` present), or not a valid hub id (``a/b/c``, spaces)."""
    if name in (".", "..") or name.startswith(("./", "../", "~", ".\\", "..\\")) or os.path.isabs(name):
        return True
    parent = os.path.dirname(name)
    if parent and os.path.isdir(parent):
        return True
    return not is_hub_id(name)


def _cached_file(repo_id: str, filename: str, cache_dir, revision) -> str | None:
    """The path of ``filename`` of ``repo_id`` in the local Hugging Face cache, or None (no network)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision)
    return found if isinstance(found, str) else None


def read_config_json(path: str | os.PathLike) -> dict:
    """``config.json`` as a dict; a ``ValueError`` naming the file when it is not a JSON object."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
        value = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({type(err).__name__}: {err}); it should be the config.json "
                         "written by save_pretrained: re-export or re-copy the model folder") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, expected a JSON object (the config.json "
                         "written by save_pretrained): re-export or re-copy the model folder")
    return value


def check_config_model_type(config: dict, model_type: str | tuple[str, ...], where, what: str) -> None:
    """``config["model_type"]`` must be one of ``model_type``; else a ``ValueError`` naming the right class."""
    expected = (model_type,) if isinstance(model_type, str) else tuple(model_type)
    found = config.get("model_type")
    if found in expected:
        return
    want = " or ".join(repr(t) for t in expected)
    if found is None:
        raise ValueError(f"model_type: {where} has no 'model_type' (expected {want} for {what}); it is not a "
                         "config.json written by save_pretrained")
    right = known_model_types().get(found)
    how = (f"load it with adatok_vlm.{right} (or transformers.AutoModel after `import adatok_vlm`)" if right
           else "load it with transformers.AutoModel / its own class")
    raise ValueError(f"model_type: {where} holds a {found!r} model, not {what} (expected model_type {want}); {how}")


# ============================================================================================
# the checks
# ============================================================================================
def check_pretrained_folder(pretrained_model_name_or_path, model_type: str | tuple[str, ...] | None,
                            subfolder: str = "", what: str = "AdaTok", *, need_config: bool = True,
                            cache_dir=None, revision: str | None = None,
                            local_files_only: bool = True) -> Path | None:
    """Check a ``from_pretrained`` source before anything is built; never touches the network.

    Args:
        pretrained_model_name_or_path: a folder, or a hub id (read from the local cache).
        model_type: the accepted ``model_type`` value(s) of its ``config.json``; ``None`` skips that check.
        subfolder: as in ``from_pretrained``.
        what: the loading class's name, for the messages.
        need_config: False when the caller passes its own ``config=`` object (``config.json`` unused).
        cache_dir / revision / local_files_only: as in ``from_pretrained``; with
            ``local_files_only=False`` a hub id that is not cached is left to transformers (a download).
    Returns:
        The local folder that holds the files (a cache snapshot for a hub id), or None when it is left
        to transformers.
    Raises:
        FileNotFoundError: the path, the subfolder or ``config.json`` does not exist.
        NotADirectoryError: the path is a file (e.g. the ``model.safetensors`` itself).
        ValueError: ``config.json`` is not a JSON object, or of another ``model_type``.
    """
    if not isinstance(pretrained_model_name_or_path, (str, os.PathLike)):
        raise TypeError(f"pretrained_model_name_or_path must be a folder path or a hub id, got "
                        f"{type(pretrained_model_name_or_path).__name__} {pretrained_model_name_or_path!r}"[:300])
    name = os.fspath(pretrained_model_name_or_path)
    subfolder = subfolder or ""
    if os.path.isdir(name):
        folder = Path(name, subfolder)
        if not folder.is_dir():
            raise FileNotFoundError(f"{name} has no subfolder {subfolder!r} (subfolder=) to load {what} from")
        config_path = folder / CONFIG_NAME
        if need_config and not config_path.is_file():
            raise FileNotFoundError(f"{folder} has no {CONFIG_NAME}: it is not a model folder written by "
                                    f"save_pretrained (a {what} folder holds {CONFIG_NAME} and {SAFE_WEIGHTS_NAME})")
    elif os.path.exists(name):
        raise NotADirectoryError(f"{name} is a file, not a model folder; pass the folder that holds {CONFIG_NAME} "
                                 f"and {SAFE_WEIGHTS_NAME} (what save_pretrained wrote)")
    elif looks_local(name):
        raise FileNotFoundError(f"{name}: no such folder (resolved to {os.path.abspath(os.path.expanduser(name))}); "
                                f"nothing was looked up on the Hugging Face hub")
    else:
        cached = _cached_file(name, f"{subfolder}/{CONFIG_NAME}" if subfolder else CONFIG_NAME, cache_dir, revision)
        if cached is None:
            if not local_files_only:
                return None      # the caller asked for a download: transformers handles the hub
            raise FileNotFoundError(
                f"{name}: no such folder here ({os.getcwd()}) and no such model in the local Hugging Face cache; "
                "nothing is downloaded (pass local_files_only=False to allow a download)")
        config_path = Path(cached)
        folder = config_path.parent
    if need_config:
        config = read_config_json(config_path)
        if model_type is not None:
            check_config_model_type(config, model_type, folder, what)
    return folder


def damaged(path, err: BaseException | str) -> DamagedWeightsError:
    """The error for a weights file that exists but does not read: names it and says what to do."""
    try:
        size = f"{os.path.getsize(path)} bytes"
    except OSError:
        size = "size unknown"
    return DamagedWeightsError(
        f"{path} is damaged ({size}; {type(err).__name__ if isinstance(err, BaseException) else 'error'}: {err}); "
        "it cannot be loaded. Re-export the model with save_pretrained, or re-download / re-copy the file")


def _check_safetensors_header(path: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError, ValueError) as err:
        raise damaged(path, err) from None


def check_weight_files(folder: str | os.PathLike, what: str = "AdaTok") -> list[Path]:
    """The safetensors weights of a local model ``folder``, each with a header that parses.

    A folder with only pickled weights (``pytorch_model.bin``, ``*.pt`` ...) is a
    :class:`PickledWeightsError`, whatever ``use_safetensors`` says: the pickle is never opened.
    A missing or damaged file is a ``FileNotFoundError`` / :class:`DamagedWeightsError` naming it.
    """
    folder = Path(folder)
    index = folder / SAFE_WEIGHTS_INDEX_NAME
    single = folder / SAFE_WEIGHTS_NAME
    if single.is_file():          # transformers' order: the single file first, then a sharded index
        files = [single]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_bytes().decode("utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise damaged(index, err) from None
        files = [folder / shard for shard in shards]
    else:
        pickles = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name.endswith(PICKLE_WEIGHT_SUFFIXES))
        if pickles:
            raise PickledWeightsError(
                f"{folder} holds only pickled weights ({', '.join(pickles)}), no {SAFE_WEIGHTS_NAME}; {what} loads "
                "safetensors only and never unpickles a file (unpickling can run code). Re-export the model with "
                "save_pretrained (it writes safetensors), or convert the file where you trust its origin")
        raise FileNotFoundError(f"{folder} has no {SAFE_WEIGHTS_NAME}: not a complete {what} folder "
                                "(save_pretrained writes config.json and model.safetensors)")
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: a weights shard named in {index} is missing; re-copy the model folder")
        _check_safetensors_header(path)
    return files


# ============================================================================================
# the load
# ============================================================================================
def check_config_source(config_cls, pretrained_model_name_or_path, kwargs: dict) -> None:
    """What our config classes' ``from_pretrained`` checks before transformers reads ``config.json``.

    The folder and its ``config.json`` (:func:`check_pretrained_folder`, no network; ``local_files_only``
    defaults to True in ``kwargs``), then its ``model_type`` (``validation.check_model_type``, which also
    accepts a composite config nesting one of ``config_cls``, as transformers' sub-configs do).
    """
    from .validation import check_model_type

    kwargs.setdefault("local_files_only", True)
    check_pretrained_folder(pretrained_model_name_or_path, None, kwargs.get("subfolder", ""), config_cls.__name__,
                            cache_dir=kwargs.get("cache_dir"), revision=kwargs.get("revision"),
                            local_files_only=kwargs["local_files_only"])
    config_dict, _ = config_cls.get_config_dict(pretrained_model_name_or_path, **kwargs)
    check_model_type(config_dict, config_cls.model_type, pretrained_model_name_or_path)


def load_checked(load, cls, pretrained_model_name_or_path, model_args: tuple, kwargs: dict, strict: bool):
    """``cls.from_pretrained`` with every check above first, then the strict load.

    ``load`` is ``PreTrainedModel.from_pretrained`` bound to ``cls``; ``kwargs`` pass through
    (``subfolder``, ``cache_dir``, ``revision`` included). ``local_files_only`` defaults to True:
    nothing downloads unless asked. ``use_safetensors=False`` is refused: pickled weights never load.
    """
    from transformers import PretrainedConfig

    from .validation import load_pretrained_strictly

    kwargs.setdefault("local_files_only", True)
    folder = check_pretrained_folder(
        pretrained_model_name_or_path, cls.config_class.model_type, kwargs.get("subfolder", ""), cls.__name__,
        need_config=not isinstance(kwargs.get("config"), PretrainedConfig), cache_dir=kwargs.get("cache_dir"),
        revision=kwargs.get("revision"), local_files_only=kwargs["local_files_only"])
    files = check_weight_files(folder, cls.__name__) if folder is not None else []
    if kwargs.get("use_safetensors", True) is False:
        raise ValueError(f"use_safetensors=False: {cls.__name__} loads safetensors weights only (pickled weights "
                         "can run code when loaded); drop the argument")
    try:
        return load_pretrained_strictly(load, cls.__name__, pretrained_model_name_or_path, model_args, kwargs,
                                        strict)
    except SafetensorError as err:
        raise damaged(files[0] if len(files) == 1 else (folder or pretrained_model_name_or_path), err) from None
