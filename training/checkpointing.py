"""Atomic, pickle-free training checkpoints with exact resume.

A checkpoint is a folder ``<output_dir>/checkpoints/step-000123`` holding

* ``<name>.safetensors`` for every module (model, discriminator, EMA, ...),
* ``<name>.optim.safetensors`` + ``<name>.optim.json`` for every optimizer (tensors / structure),
* ``rng.safetensors`` + ``rng.json`` (torch CPU/CUDA generators, Python and NumPy states),
* ``trainer_state.json`` (step, data position, elapsed time, counters), written last.

It is written under a temporary name and renamed only when complete; ``checkpoints/latest`` (a
one-line text file, itself replaced atomically) then points at it. A crash at any moment leaves the
previous checkpoint and ``latest`` loadable. Nothing here unpickles: weights and states are
safetensors and JSON only.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

LATEST = "latest"
STATE_FILE = "trainer_state.json"


# ---------------------------------------------------------------------------------------------
# small atomic writers
# ---------------------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage; clone views into their own memory.
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


# ---------------------------------------------------------------------------------------------
# optimizer and RNG states as tensors + JSON
# ---------------------------------------------------------------------------------------------
def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, param_state in sd["state"].items():
        for key, value in param_state.items():
            name = f"{idx}.{key}"
            if isinstance(value, torch.Tensor):
                tensors[name] = value
            else:
                scalars[name] = value
    return _contiguous(tensors), {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    # JSON turned tuples (e.g. AdamW's betas) into lists; "params" is the one list that must stay one.
    groups = [{k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()}
              for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_to_tensors() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    np_state = np.random.get_state()
    meta = {
        "python": _jsonable(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def rng_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    random.setstate(_tupled(meta["python"]))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _jsonable(obj):
    if isinstance(obj, tuple):
        return {"__tuple__": [_jsonable(v) for v in obj]}
    if isinstance(obj, list):
        return [_jsonable(v) for v in obj]
    return obj


def _tupled(obj):
    if isinstance(obj, dict) and "__tuple__" in obj:
        return tuple(_tupled(v) for v in obj["__tuple__"])
    if isinstance(obj, list):
        return [_tupled(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------
# the checkpoint manager
# ---------------------------------------------------------------------------------------------
class CheckpointManager:
    """Saves and restores named modules, optimizers, RNG states and a JSON trainer state.

    ``modules`` / ``optimizers`` map names to objects with ``state_dict``/``load_state_dict``
    (modules may be EMA helpers). Only the main process writes; call ``save`` on every rank anyway
    (it is a no-op elsewhere) and synchronise around it in distributed runs.
    """

    def __init__(self, output_dir: str | Path, modules: dict[str, Any], optimizers: dict[str, torch.optim.Optimizer],
                 keep: int = 2, is_main_process: bool = True):
        self.root = Path(output_dir) / "checkpoints"
        self.modules = modules
        self.optimizers = optimizers
        self.keep = max(1, int(keep))
        self.is_main_process = is_main_process

    # -- paths
    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        pointer = self.root / LATEST
        if pointer.is_file():
            candidate = self.root / pointer.read_text(encoding="utf-8").strip()
            if (candidate / STATE_FILE).is_file():
                return candidate
        complete = sorted(p for p in self.root.glob("step-*") if (p / STATE_FILE).is_file())
        return complete[-1] if complete else None

    # -- save
    def save(self, step: int, trainer_state: dict) -> Path | None:
        if not self.is_main_process:
            return None
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"step-{step:08d}"
        final = self.root / name
        tmp = self.root / f".tmp-{name}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            for key, module in self.modules.items():
                save_file(_contiguous(module.state_dict()), str(tmp / f"{key}.safetensors"))
            for key, optimizer in self.optimizers.items():
                tensors, meta = optimizer_to_tensors(optimizer)
                save_file(tensors, str(tmp / f"{key}.optim.safetensors"))
                (tmp / f"{key}.optim.json").write_text(json.dumps(meta), encoding="utf-8")
            tensors, meta = rng_to_tensors()
            save_file(tensors, str(tmp / "rng.safetensors"))
            (tmp / "rng.json").write_text(json.dumps(meta), encoding="utf-8")
            state = dict(trainer_state, step=step)
            with open(tmp / STATE_FILE, "w", encoding="utf-8") as f:   # written last: marks completeness
                json.dump(state, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            write_text_atomic(self.root / LATEST, name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._prune()
        return final

    def _prune(self) -> None:
        complete = sorted(p for p in self.root.glob("step-*") if (p / STATE_FILE).is_file())
        for old in complete[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".tmp-*"):
            if not stale.name.endswith(f"-{os.getpid()}"):
                shutil.rmtree(stale, ignore_errors=True)

    # -- load
    def load(self, path: str | Path | None = None, restore_rng: bool = True) -> dict:
        """Restore every registered object from ``path`` (default: the latest); returns the trainer state."""
        path = Path(path) if path is not None else self.latest()
        if path is None or not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"no complete checkpoint at {path or self.root}")
        for key, module in self.modules.items():
            file = path / f"{key}.safetensors"
            if not file.is_file():
                raise FileNotFoundError(f"checkpoint {path} lacks {file.name}")
            state = load_file(str(file))
            result = module.load_state_dict(state)
            missing = getattr(result, "missing_keys", None)
            unexpected = getattr(result, "unexpected_keys", None)
            if missing or unexpected:
                raise ValueError(f"checkpoint {file} does not match '{key}': missing {missing}, unexpected {unexpected}")
        for key, optimizer in self.optimizers.items():
            tensors = load_file(str(path / f"{key}.optim.safetensors"))
            meta = json.loads((path / f"{key}.optim.json").read_text(encoding="utf-8"))
            optimizer_from_tensors(optimizer, tensors, meta)
        if restore_rng:
            rng_from_tensors(load_file(str(path / "rng.safetensors")),
                             json.loads((path / "rng.json").read_text(encoding="utf-8")))
        return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
