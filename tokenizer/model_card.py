"""Hub-ready saved folders: a ``README.md`` model card and the ``auto_map`` that loads without ``import adatok_vlm``.

Every model family of the project (the AdaTok tokenizer, the DiT, the VLM) writes the same two things beside
its ``config.json`` and ``model.safetensors`` on ``save_pretrained``:

* :func:`write_model_card`: ``README.md`` with a YAML header the Hugging Face hub reads (library, tags,
  pipeline) and a body a person reads: what the model is, its config summary, the preset it matches, the
  training data, steps and measured metrics when the trainer passes them, and how to load it.
* :func:`write_auto_map`: a two-line module, :data:`HUB_MODULE` ``.py``, that imports the installed
  ``adatok_vlm`` package, and the ``auto_map`` entries that point the Auto classes at it. Loading such a
  folder without ``import adatok_vlm`` then works with ``trust_remote_code=True`` (transformers runs that
  module, which only imports the package), or asks for that flag, instead of silently giving a plain text
  tokenizer or an "unrecognized model type" error. Nothing of the project's code is copied into the folder:
  the package stays the one source of truth.

Nothing here knows about LMs or trainers: callers pass their config, their Auto-class names and what
they know about training.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

HUB_MODULE = "adatok_vlm_hub"
MODEL_CARD = "README.md"
TRAINING_INFO = "training_info.json"   # {"training": {...}, "metrics": {...}} a trainer may leave in a model folder
_HUB_KWARGS = ("repo_id", "commit_message", "private", "token", "create_pr", "revision")

_HUB_SOURCE = '''"""Loads this folder with the installed adatok_vlm package (pip install adatok-vlm).

transformers runs this file for the Auto classes when trust_remote_code=True; `import adatok_vlm` before
loading makes the flag unnecessary. It defines nothing: the classes are the package's own.
"""
from adatok_vlm import {names}  # noqa: F401
'''


# ============================================================================================
# helpers
# ============================================================================================
def closest_preset(config: Mapping[str, Any], presets: Mapping[str, Mapping[str, Any]]) -> tuple[str | None, dict]:
    """``(name, overrides)``: the preset whose fields ``config`` differs from least, and those differences.

    ``overrides`` maps each differing field to the config's value; ``(None, {})`` when there are no presets.
    """
    best, best_diff = None, {}
    for name, fields in presets.items():
        diff = {k: config.get(k) for k, v in fields.items() if config.get(k) != v}
        if best is None or len(diff) < len(best_diff):
            best, best_diff = name, diff
    return best, best_diff


def read_training_info(folder: str | os.PathLike, filename: str = TRAINING_INFO) -> dict:
    """The JSON object in ``folder/filename`` (what a trainer recorded beside the model), ``{}`` when the file
    is absent, unreadable or not an object: a model card is written best effort and never fails a save."""
    path = Path(folder) / filename
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def card_sections(folder: str | os.PathLike, model_card: Mapping[str, Any] | None) -> tuple[dict, dict]:
    """``(training, metrics)`` for a card: ``model_card={"training": {...}, "metrics": {...}}`` given to
    ``save_pretrained``, over what :data:`TRAINING_INFO` in ``folder`` holds (same two keys)."""
    info, given = read_training_info(folder), dict(model_card or {})
    unknown = sorted(set(given) - {"training", "metrics"})
    if unknown:
        raise ValueError(f"model_card: expected the keys 'training' and/or 'metrics', got {unknown}")
    sections = []
    for key in ("training", "metrics"):
        saved = info.get(key) if isinstance(info.get(key), dict) else {}
        sections.append({**saved, **(given.get(key) or {})})
    return sections[0], sections[1]


def _value(v: Any) -> str:
    text = json.dumps(v, default=str) if not isinstance(v, str) else v
    return text if len(text) <= 80 else text[:77] + "..."


def _table(rows: Mapping[str, Any]) -> list[str]:
    lines = ["| field | value |", "| --- | --- |"]
    lines += [f"| {k} | {_value(v)} |" for k, v in rows.items()]
    return lines


# ============================================================================================
# the model card
# ============================================================================================
def model_card_text(model_type: str, title: str, description: str, summary: Mapping[str, Any], *,
                    preset: str | None = None, overrides: Mapping[str, Any] | None = None,
                    training: Mapping[str, Any] | None = None, metrics: Mapping[str, Any] | None = None,
                    usage: str | None = None, tags: list[str] | None = None, pipeline_tag: str | None = None,
                    license: str | None = None) -> str:
    """The text of a ``README.md`` model card (YAML front matter + markdown). See :func:`write_model_card`."""
    header = ["---", "library_name: adatok-vlm"]
    if license:
        header.append(f"license: {license}")
    if pipeline_tag:
        header.append(f"pipeline_tag: {pipeline_tag}")
    header.append("tags:")
    header += [f"- {t}" for t in dict.fromkeys(["adatok", model_type, *(tags or [])])]   # once each
    header.append("---")
    body = [f"# {title}", "", description, "", f"- model_type: `{model_type}`"]
    if preset:
        extra = f" with {len(overrides)} field(s) changed: " + ", ".join(
            f"`{k}={_value(v)}`" for k, v in overrides.items()) if overrides else " (unchanged)"
        body.append(f"- preset: `{preset}`{extra}")
    body += ["", "## Config summary", "", *_table(summary), ""]
    body += ["## Training", ""]
    if training:
        body += [*_table(training), ""]
    else:
        body += ["Not recorded (saved outside a trainer, or before training).", ""]
    if metrics:
        body += ["## Metrics", "", *_table(metrics), ""]
    body += ["## Usage", "", "```python", (usage or "import adatok_vlm").strip(), "```", "",
             "Without `import adatok_vlm`, the Auto classes load this folder with `trust_remote_code=True` "
             f"(`{HUB_MODULE}.py` here only imports the installed `adatok_vlm` package).", ""]
    return "\n".join(header + [""] + body)


def write_model_card(folder: str | os.PathLike, model_type: str, title: str, description: str,
                     summary: Mapping[str, Any], **kwargs) -> Path:
    """Write ``folder/README.md``: the model type, the config ``summary`` (field -> value), the preset it
    matches (``preset`` + ``overrides``), ``training`` (data, steps...) and ``metrics`` when known, ``usage``
    code, and hub ``tags`` / ``pipeline_tag`` / ``license``. Returns the path."""
    path = Path(folder) / MODEL_CARD
    path.write_text(model_card_text(model_type, title, description, summary, **kwargs), encoding="utf-8")
    return path


# ============================================================================================
# auto_map: loading without `import adatok_vlm`
# ============================================================================================
def auto_map(classes: Mapping[str, str]) -> dict[str, str]:
    """``{"AutoConfig": "AdaTokConfig", ...}`` -> the ``auto_map`` value pointing at :data:`HUB_MODULE`."""
    return {auto: f"{HUB_MODULE}.{name}" for auto, name in classes.items()}


def write_auto_map(folder: str | os.PathLike, classes: Mapping[str, str],
                   json_files: tuple[str, ...] = ("config.json",)) -> Path:
    """Write ``folder/adatok_vlm_hub.py`` and add ``auto_map`` (for ``classes``: Auto-class name -> our class
    name) to each of ``json_files`` that exists in ``folder``; returns the module's path."""
    folder = Path(folder)
    names = sorted(set(classes.values()))
    module = folder / f"{HUB_MODULE}.py"
    existing = module.read_text(encoding="utf-8") if module.is_file() else ""
    for line in existing.splitlines():   # several families may share one folder: keep every name
        if line.startswith("from adatok_vlm import "):
            names = sorted(set(names) | {n.strip() for n in line.split("import", 1)[1].split("#")[0].split(",")})
    module.write_text(_HUB_SOURCE.format(names=", ".join(names)), encoding="utf-8")
    mapping = auto_map(classes)
    for name in json_files:
        path = folder / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        data["auto_map"] = {**data.get("auto_map", {}), **mapping}
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return module


# ============================================================================================
# save_pretrained of every family
# ============================================================================================
def save_for_hub(obj: Any, save: Any, save_directory: str | os.PathLike, args: tuple, kwargs: dict,
                 classes: Mapping[str, str], json_files: tuple[str, ...] = ("config.json",),
                 write_card: Any = None) -> Any:
    """Set ``auto_map`` for ``classes`` on ``obj`` (a model's config, or an image processor), run
    ``save(save_directory, *args, **kwargs)`` (the parent's ``save_pretrained``), then, on the main process,
    :func:`write_auto_map` and ``write_card(save_directory)``; returns what ``save`` returned.
    ``push_to_hub=True`` (and ``repo_id``, ``token``, ...) pushes afterwards through
    ``obj.push_to_hub``, which saves again into a temporary folder, so the card and ``auto_map`` go too (the
    parent's own push would upload before they exist)."""
    kwargs = dict(kwargs)
    push = kwargs.pop("push_to_hub", False)
    hub = {k: kwargs.pop(k) for k in _HUB_KWARGS if k in kwargs}
    # The object itself carries the auto_map too (as transformers' own register_for_auto_class does), so the
    # saved and the reloaded object agree (``to_dict()`` equal) and a re-save keeps it.
    target = getattr(obj, "config", obj)        # a model's config, or an image processor itself
    target.auto_map = {**(getattr(target, "auto_map", None) or {}), **auto_map(classes)}
    result = save(save_directory, *args, **kwargs)
    if kwargs.get("is_main_process", True):
        write_auto_map(save_directory, classes, json_files=json_files)
        if write_card is not None:
            write_card(save_directory)
    if push:
        obj.push_to_hub(hub.pop("repo_id", Path(save_directory).resolve().name), **hub)
    return result


__all__ = ["HUB_MODULE", "MODEL_CARD", "TRAINING_INFO", "auto_map", "card_sections", "closest_preset",
           "model_card_text", "read_training_info", "save_for_hub", "write_auto_map", "write_model_card"]
