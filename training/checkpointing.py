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

Under DeepSpeed ZeRO (``engines``) a model's weights and optimizer are sharded across ranks, so the
engine writes them itself: every rank calls ``save``; the folder then also holds ``<name>/``, the
engine's own checkpoint (``engine.save_checkpoint(step_dir, tag=name)``: per-rank optimizer
partitions and, under ZeRO-3, parameter shards; DeepSpeed's format, torch files) plus, when a
``pretrained`` writer is registered, the ``config.json`` (and processor files) that ``adatok export``
needs to consolidate it into a ``save_pretrained`` folder. With several processes each rank keeps its
own RNG state (``rng-rank00001.safetensors``), so data randomness stays distinct per rank after a
resume. A ZeRO checkpoint resumes under the same world size; consolidate it with ``adatok export``
to move to another one. The rank-0 writes, rename and ``latest`` update are fenced by barriers, so
the step folder must lie on a file system every node sees (or set DeepSpeed's
``checkpoint.use_node_local_storage``, see the README).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable

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
                 keep: int = 2, is_main_process: bool = True, *, engines: dict[str, Any] | None = None,
                 pretrained: dict[str, Callable[[Path], None]] | None = None, rank: int = 0, world_size: int = 1,
                 local_rank: int = 0, barrier: Callable[[], None] | None = None):
        self.root = Path(output_dir) / "checkpoints"
        self.modules = modules
        self.optimizers = optimizers
        self.keep = max(1, int(keep))
        self.is_main_process = is_main_process
        self.engines = dict(engines or {})
        self.pretrained = dict(pretrained or {})
        self.rank, self.world_size, self.local_rank = int(rank), int(world_size), int(local_rank)
        self.barrier = barrier or (lambda: None)

    @property
    def collective(self) -> bool:
        """Whether every rank takes part in save/load (sharded engines or per-rank RNG states)."""
        return bool(self.engines) or self.world_size > 1

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
        if self.collective:
            return self._save_collective(step, trainer_state)
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
            self._write_main(tmp, step, trainer_state, rng_name="rng")
            self._publish(tmp, final, name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._prune()
        return final

    def _save_collective(self, step: int, trainer_state: dict) -> Path | None:
        """Every rank writes its part into one shared temporary folder; rank 0 completes and renames it.

        With node-local disks (DeepSpeed's ``checkpoint.use_node_local_storage``) each node's first
        process also creates, completes and renames the copy on its own disk (the replicated pieces
        and the trainer state are the same on every node), so each node can resume from its disk.
        """
        name = f"step-{step:08d}"
        final = self.root / name
        tmp = self.root / f".tmp-{name}-shared"
        if self.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        self.barrier()
        if self.local_rank == 0 and not self.is_main_process:
            tmp.mkdir(parents=True, exist_ok=True)   # a no-op on shared storage
        self.barrier()
        for tag, engine in self.engines.items():          # a collective inside DeepSpeed
            engine.save_checkpoint(str(tmp), tag=tag, save_latest=False)
        tensors, meta = rng_to_tensors()
        rng_name = f"rng-rank{self.rank:05d}"
        save_file(tensors, str(tmp / f"{rng_name}.safetensors"))
        (tmp / f"{rng_name}.json").write_text(json.dumps(meta), encoding="utf-8")
        self.barrier()
        if self.is_main_process:
            try:
                for tag, write in self.pretrained.items():
                    (tmp / tag).mkdir(exist_ok=True)
                    write(tmp / tag)
                (tmp / "world.json").write_text(json.dumps({"world_size": self.world_size,
                                                            "engines": sorted(self.engines)}), encoding="utf-8")
                self._write_main(tmp, step, trainer_state, rng_name=None)
                self._publish(tmp, final, name)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            self._prune()
        self.barrier()
        if self.local_rank == 0 and not self.is_main_process and tmp.is_dir():   # this node's own disk
            (tmp / "world.json").write_text(json.dumps({"world_size": self.world_size,
                                                        "engines": sorted(self.engines)}), encoding="utf-8")
            self._write_main(tmp, step, trainer_state, rng_name=None)
            self._publish(tmp, final, name)
            self._prune()
        self.barrier()
        return final if self.is_main_process else None

    def _write_main(self, tmp: Path, step: int, trainer_state: dict, rng_name: str | None) -> None:
        for key, module in self.modules.items():
            save_file(_contiguous(module.state_dict()), str(tmp / f"{key}.safetensors"))
        for key, optimizer in self.optimizers.items():
            tensors, meta = optimizer_to_tensors(optimizer)
            save_file(tensors, str(tmp / f"{key}.optim.safetensors"))
            (tmp / f"{key}.optim.json").write_text(json.dumps(meta), encoding="utf-8")
        if rng_name is not None:
            tensors, meta = rng_to_tensors()
            save_file(tensors, str(tmp / f"{rng_name}.safetensors"))
            (tmp / f"{rng_name}.json").write_text(json.dumps(meta), encoding="utf-8")
        state = dict(trainer_state, step=step)
        with open(tmp / STATE_FILE, "w", encoding="utf-8") as f:   # written last: marks completeness
            json.dump(state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)

    def _publish(self, tmp: Path, final: Path, name: str) -> None:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        write_text_atomic(self.root / LATEST, name)

    def _prune(self) -> None:
        complete = sorted(p for p in self.root.glob("step-*") if (p / STATE_FILE).is_file())
        for old in complete[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".tmp-*"):
            if not stale.name.endswith((f"-{os.getpid()}", "-shared")):
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
        for tag, engine in self.engines.items():          # a collective inside DeepSpeed
            if not (path / tag).is_dir():
                raise FileNotFoundError(f"checkpoint {path} lacks the DeepSpeed checkpoint '{tag}/' (was it "
                                        "written by a run without DeepSpeed?)")
            self._check_world_size(path)
            loaded, _ = engine.load_checkpoint(str(path), tag=tag, load_optimizer_states=True,
                                               load_lr_scheduler_states=False)
            if loaded is None:
                raise RuntimeError(f"DeepSpeed could not load '{tag}' from {path}")
        if restore_rng:
            rng_name = "rng"
            if self.collective:
                rng_name = f"rng-rank{self.rank:05d}"
                if not (path / f"{rng_name}.safetensors").is_file():
                    rng_name = "rng"   # a single-process checkpoint: every rank starts from its stream
            if (path / f"{rng_name}.safetensors").is_file():
                rng_from_tensors(load_file(str(path / f"{rng_name}.safetensors")),
                                 json.loads((path / f"{rng_name}.json").read_text(encoding="utf-8")))
        return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))

    def _check_world_size(self, path: Path) -> None:
        info = path / "world.json"
        if info.is_file():
            saved = json.loads(info.read_text(encoding="utf-8"))["world_size"]
            if saved != self.world_size:
                raise ValueError(f"the ZeRO checkpoint {path} was written by {saved} processes and this run has "
                                 f"{self.world_size}: resume with the same world size, or consolidate it with "
                                 f"`adatok export --checkpoint {path} --out DIR` and start from the export")
