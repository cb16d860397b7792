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

**Checkpoints verify themselves** (see ``integrity``). The last file written, ``manifest.json``,
records the size and CRC-32 of every file in the folder (the engine's shards written by other ranks
included: rank 0 lists the folder after the barrier that ends their writes), and the run's model
config when the manager was given one. Every load verifies before it reads anything; ``latest()``
(``--resume auto``) walks back to the newest checkpoint that verifies, warns
(``CheckpointSkippedWarning``) which it skipped and why, and never deletes the damaged one. A bad
checkpoint loaded by path raises ``CheckpointCorruptError`` naming the file and the failed check.

**Save errors** (a full disk included, whether it surfaces as ``OSError`` or as safetensors'
``SafetensorError``) become ``CheckpointWriteError`` (an ``OSError`` keeping the ``errno``) naming
the file; nothing is published, so the previous checkpoint stays ``latest``.

**Output folders are owned** once the loop calls ``claim(resume=..., overwrite=...)``: the main
process takes ``<output_dir>/.adatok-run.lock`` (``OutputDirLock``, see ``run_lock``), a fresh run
into a folder holding another run refuses unless it resumes or overwrites, and pruning removes only
this run's temporary folders (named with a pid, a random nonce and the host) and temporary folders
of processes that no longer run. Without ``claim`` the manager behaves as before (no lock, no
refusal), so callers opt in.

The errors, manifests and verification live in ``integrity`` and the lock in ``run_lock``; this
module re-exports their public names, so ``from adatok_vlm.training.checkpointing import ...``
keeps working for all of them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import secrets
import shutil
import socket
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from .integrity import (CHECKSUM_CHUNK, MANIFEST, STATE_FILE, CheckpointCorruptError, CheckpointError,
                        CheckpointFileMissingError, CheckpointSkippedWarning, CheckpointWriteError, _corrupt,
                        _jsonable_config, _read_json, _read_state, _read_tensors, build_manifest, config_defaults,
                        config_differences, file_checksum, verify_checkpoint)
from .run_lock import (LOCK_FILE, RUN_ENTRIES, OutputDirLock, OutputDirLockedError, OutputDirNotEmptyError,
                       _pid_alive, clear_interrupted_overwrites, remove_run_entries)

__all__ = [
    "CHECKSUM_CHUNK", "LATEST", "LOCK_FILE", "MANIFEST", "RUN_ENTRIES", "STATE_FILE",
    "CheckpointCorruptError", "CheckpointError", "CheckpointFileMissingError", "CheckpointManager",
    "CheckpointSkippedWarning", "CheckpointWriteError", "OutputDirLock", "OutputDirLockedError",
    "OutputDirNotEmptyError", "build_manifest", "config_differences", "file_checksum", "optimizer_from_tensors",
    "optimizer_to_tensors", "rng_from_tensors", "rng_to_tensors", "verify_checkpoint", "write_text_atomic",
]

LATEST = "latest"

_STEP_DIR = re.compile(r"step-(\d+)")
_OWNED_TMP = re.compile(r"\.tmp-.+-(?P<pid>\d+)-(?P<nonce>[0-9a-f]{8})@(?P<host>.+)")   # this version's temp names
_LEGACY_TMP = re.compile(r"\.tmp-step-\d+-(?P<pid>\d+)")                                # older versions'
_SHARED_TMP = re.compile(r"\.tmp-step-\d+-shared")                                       # the collective save's


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
    # pid + nonce: two writers (two managers, two hosts) never share the temporary name
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def _errno_of(error: BaseException) -> int | None:
    """The OS error code of an ``OSError``, or the one safetensors' Rust writer puts in its message."""
    if isinstance(error, OSError) and error.errno:
        return error.errno
    text = str(error)
    found = re.search(r"os error (\d+)|Os \{ code: (\d+)", text)
    if found:
        return int(found.group(1) or found.group(2))
    return errno.ENOSPC if "No space left" in text else None


@contextlib.contextmanager
def _writing(path: Path):
    """Turn a failed write of ``path`` (``OSError`` or ``SafetensorError``) into ``CheckpointWriteError``."""
    try:
        yield
    except CheckpointWriteError:
        raise
    except (OSError, SafetensorError) as error:
        failed = Path(error.filename) if isinstance(error, OSError) and error.filename else path
        why = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise CheckpointWriteError(f"could not write the checkpoint file {failed}: {why}. The checkpoint was not "
                                   "published: the previous one is intact", failed, "write", _errno_of(error)) from error


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    with _writing(path):
        save_file(tensors, str(path))


def _write_json(path: Path, obj, indent: int | None = None, sync: bool = False) -> None:
    with _writing(path), open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent)
        if sync:
            f.flush()
            os.fsync(f.fileno())

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

    ``model_config`` (a dict, or a config with ``to_dict()``) is recorded in every manifest and
    compared on load, before any weights are touched: a changed architecture is a ``ValueError``
    listing each differing field. A field the saved config lacks (written before the field existed)
    counts as its default: ``model_config_defaults`` (the class's defaults, as a dict), else the defaults
    of ``model_config``'s class when it is a config object. ``any_rank`` (``lambda flag: distributed.any_rank(accelerator,
    flag)``) lets every rank learn that the main process failed to claim the folder or to write a
    checkpoint, so none waits forever. ``claim``/``release`` own the output folder (see the module
    docstring); without them nothing is locked or refused.
    """

    def __init__(self, output_dir: str | Path, modules: dict[str, Any], optimizers: dict[str, torch.optim.Optimizer],
                 keep: int = 2, is_main_process: bool = True, *, engines: dict[str, Any] | None = None,
                 pretrained: dict[str, Callable[[Path], None]] | None = None, rank: int = 0, world_size: int = 1,
                 local_rank: int = 0, barrier: Callable[[], None] | None = None,
                 model_config: Mapping | None = None, any_rank: Callable[[bool], bool] | None = None,
                 model_config_defaults: Mapping | None = None):
        self.output_dir = Path(output_dir)
        self.root = self.output_dir / "checkpoints"
        self.modules = modules
        self.optimizers = optimizers
        self.keep = max(1, int(keep))
        self.is_main_process = is_main_process
        self.engines = dict(engines or {})
        self.pretrained = dict(pretrained or {})
        self.rank, self.world_size, self.local_rank = int(rank), int(world_size), int(local_rank)
        self.barrier = barrier or (lambda: None)
        self.model_config = _jsonable_config(model_config)
        self.model_config_defaults = _jsonable_config(model_config_defaults) or config_defaults(model_config)
        self.any_rank = any_rank
        self.lock = OutputDirLock(self.output_dir)
        self._nonce = secrets.token_hex(4)          # with the pid and host: this manager's temp folders
        self._host = socket.gethostname()
        self._verified: dict[Path, tuple] = {}      # folder -> file stats when it last verified

    def attach(self, modules: dict[str, Any], optimizers: dict[str, torch.optim.Optimizer], *,
               engines: dict[str, Any] | None = None, pretrained: dict[str, Callable[[Path], None]] | None = None,
               model_config: Mapping | None = None,
               model_config_defaults: Mapping | None = None) -> "CheckpointManager":
        """Register what the checkpoints hold (as the constructor's arguments of those names), for a run that
        claims its output folder before it builds anything: ``CheckpointManager(out, {}, {}, ...).claim(...)``,
        then the model, then ``attach``. Returns self."""
        self.modules, self.optimizers = dict(modules), dict(optimizers)
        self.engines, self.pretrained = dict(engines or {}), dict(pretrained or {})
        self.model_config = _jsonable_config(model_config)
        self.model_config_defaults = _jsonable_config(model_config_defaults) or config_defaults(model_config)
        return self

    @property
    def collective(self) -> bool:
        """Whether every rank takes part in save/load (sharded engines or per-rank RNG states)."""
        return bool(self.engines) or self.world_size > 1

    # -- owning the output folder
    def claim(self, resume: str | Path | None = None, overwrite: bool = False,
              entries: tuple[str, ...] = RUN_ENTRIES) -> "CheckpointManager":
        """Own ``output_dir`` for this run; call on every rank before anything writes there.

        The main process takes the lock (``OutputDirLockedError`` names the holder). A fresh run
        (``resume`` None) into a folder holding another run (checkpoints, ``checkpoints/latest`` or
        ``model/``) raises ``OutputDirNotEmptyError`` unless ``overwrite``, which removes that run's
        ``entries`` (moved into one hidden folder first, so a crash never leaves two runs mixed, then
        deleted). ``resume="auto"`` into a folder whose checkpoints all fail verification raises
        ``CheckpointCorruptError`` rather than silently starting over. Idempotent; returns self, and
        as a context manager releases on exit (exceptions included).
        """
        if not isinstance(overwrite, bool):
            raise TypeError(f"overwrite: expected a bool, got {type(overwrite).__name__}")
        if overwrite and resume:
            raise ValueError(f"overwrite=True discards the run in {self.output_dir} and resume={str(resume)!r} "
                             "continues one: choose one of them")
        failure = None
        if self.is_main_process and not self.lock.held:
            try:
                self.lock.acquire()
                self._check_previous_run(resume, overwrite, entries)
            except Exception as error:
                self.lock.release()
                failure = error
        if self.world_size > 1:
            if self.any_rank is not None:
                if self.any_rank(failure is not None) and failure is None:
                    raise CheckpointError(f"the main process could not claim {self.output_dir} (its error says "
                                          "why); this rank stops too", self.output_dir, "claim")
            else:
                self.barrier()
        if failure is not None:
            raise failure
        return self

    def release(self) -> None:
        """Give up the output folder (idempotent; a no-op where nothing was claimed)."""
        self.lock.release()

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _previous_run(self) -> list[str]:
        found = []
        steps = self._step_dirs()
        if steps:
            found.append(f"{len(steps)} checkpoint(s) up to checkpoints/{steps[-1][1].name}")
        if (self.root / LATEST).exists():
            found.append(f"checkpoints/{LATEST}")
        if (self.output_dir / "model").exists():
            found.append("model/")
        return found

    def _check_previous_run(self, resume, overwrite: bool, entries: tuple[str, ...]) -> None:
        clear_interrupted_overwrites(self.output_dir)
        previous = self._previous_run()
        if not resume:
            if previous and not overwrite:
                raise OutputDirNotEmptyError(
                    f"the output folder {self.output_dir} already holds a run ({', '.join(previous)}): resume it "
                    "(resume='auto', --train.resume auto), replace it (overwrite=True, --train.overwrite true), "
                    "or choose another output_dir", self.output_dir, "not empty", errno.EEXIST)
            if previous:
                moved = remove_run_entries(self.output_dir, entries, self._nonce)
                self._verified.clear()
                warnings.warn(f"overwrite=True: removed the previous run's {', '.join(moved)} from "
                              f"{self.output_dir}", stacklevel=3)
        elif resume == "auto" and self._step_dirs():
            chosen, skipped = self._newest_verified()
            if chosen is None:
                raise self._none_verifies(skipped)

    # -- paths
    def _step_dirs(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        found = ((_STEP_DIR.fullmatch(p.name), p) for p in self.root.iterdir())
        return sorted((int(m.group(1)), p) for m, p in found if m and p.is_dir())

    def _read_pointer(self) -> tuple[Path | None, str | None]:
        """The folder ``checkpoints/latest`` names, or why it names none."""
        pointer = self.root / LATEST
        try:
            raw = pointer.read_bytes()[:4096]
        except OSError as error:
            return None, f"{pointer} cannot be read ({error})"
        try:
            name = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            return None, f"{pointer} holds {len(raw)} bytes of garbage, not a checkpoint name"
        if not _STEP_DIR.fullmatch(name):
            return None, f"{pointer} holds {name[:40]!r}, not a step-XXXXXXXX name"
        if not (self.root / name).is_dir():
            return None, f"{pointer} names {name}, which does not exist"
        return self.root / name, None

    def verify(self, path: str | Path) -> dict | None:
        """``verify_checkpoint`` (returns the manifest), remembered while no file of the folder changes."""
        path = Path(path)
        try:
            stats = tuple((p.relative_to(path).as_posix(), s.st_size, s.st_mtime_ns, s.st_ctime_ns, s.st_ino)
                          for p in sorted(path.rglob("*")) if p.is_file() and (s := p.stat()))
        except OSError:
            stats = None
        cached = self._verified.get(path)
        if stats is not None and cached is not None and cached[0] == stats:
            return cached[1]
        manifest = verify_checkpoint(path)
        if stats is not None:
            self._verified[path] = (stats, manifest)
        return manifest

    def _newest_verified(self) -> tuple[Path | None, list[tuple[Path, CheckpointCorruptError]]]:
        """The folder ``latest`` names if it verifies, else the newest step folder that does; and the skipped."""
        skipped: list[tuple[Path, CheckpointCorruptError]] = []
        order: list[Path] = []
        pointer = self.root / LATEST
        if pointer.exists() or pointer.is_symlink():
            target, problem = self._read_pointer()
            if problem:
                skipped.append((pointer, CheckpointCorruptError(f"bad latest pointer: {problem}", pointer,
                                                                "bad latest pointer")))
            else:
                order.append(target)
        order += [p for _, p in reversed(self._step_dirs()) if p not in order]
        for path in order:
            try:
                self.verify(path)
                return path, skipped
            except CheckpointCorruptError as error:
                skipped.append((path, error))
            except FileNotFoundError:   # removed while we looked
                continue
        return None, skipped

    def _warn_skipped(self, chosen: Path | None, skipped) -> None:
        instead = f"using {chosen} instead" if chosen else "no other checkpoint verifies"
        for path, error in skipped:
            warnings.warn(f"skipped checkpoint {path.name if path.name != LATEST else path}: {error}; {instead} "
                          "(the damaged one is left in place)", CheckpointSkippedWarning, stacklevel=3)

    def _none_verifies(self, skipped) -> CheckpointCorruptError:
        first = next((e for p, e in skipped if p.name != LATEST), skipped[0][1] if skipped else None)
        details = "; ".join(f"{p.name}: {e}" for p, e in skipped)
        return _corrupt(Path(first.filename) if first and first.filename else self.root,
                        first.check if first else "missing",
                        f"no checkpoint in {self.root} verifies ({details}). Repair or remove the damaged files, "
                        "resume from an explicit good checkpoint, or start over with overwrite")

    def latest(self) -> Path | None:
        """The newest checkpoint that verifies, or None; warns about each one it skipped, deletes none."""
        chosen, skipped = self._newest_verified()
        self._warn_skipped(chosen, skipped)
        return chosen

    # -- save
    def _tmp_name(self, what: str) -> Path:
        return self.root / f".tmp-{what}-{os.getpid()}-{self._nonce}@{self._host}"

    def save(self, step: int, trainer_state: dict) -> Path | None:
        """Write checkpoint ``step`` (every rank calls it); returns its folder on the main process.
        Any failed write is a ``CheckpointWriteError`` naming the file; the previous checkpoint stays."""
        if self.collective:
            return self._save_collective(step, trainer_state)
        if not self.is_main_process:
            return None
        name = f"step-{step:08d}"
        final = self.root / name
        tmp = self._tmp_name(name)
        try:
            with _writing(tmp):
                self.root.mkdir(parents=True, exist_ok=True)
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir()
            self._write_main(tmp, step, trainer_state, rng_name="rng")
            self._publish(tmp, final, name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._prune(step)
        return final

    def _save_collective(self, step: int, trainer_state: dict) -> Path | None:
        """Every rank writes its part into one shared temporary folder; rank 0 completes and renames it.

        With node-local disks (DeepSpeed's ``checkpoint.use_node_local_storage``) each node's first
        process also creates, completes and renames the copy on its own disk (the replicated pieces
        and the trainer state are the same on every node), so each node can resume from its disk.
        Rank 0 writes the manifest after the barrier that ends every rank's writes, so it lists (and
        checksums) the other ranks' shards too.
        """
        name = f"step-{step:08d}"
        final = self.root / name
        tmp = self.root / f".tmp-{name}-shared"
        if self.is_main_process:
            with _writing(tmp):
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
        _save_tensors(tensors, tmp / f"{rng_name}.safetensors")
        _write_json(tmp / f"{rng_name}.json", meta)
        self.barrier()
        failure = None
        if self.is_main_process:
            try:
                for tag, write in self.pretrained.items():
                    with _writing(tmp / tag):
                        (tmp / tag).mkdir(exist_ok=True)
                        write(tmp / tag)
                _write_json(tmp / "world.json", {"world_size": self.world_size, "engines": sorted(self.engines)})
                self._write_main(tmp, step, trainer_state, rng_name=None)
                self._publish(tmp, final, name)
            except Exception as error:
                shutil.rmtree(tmp, ignore_errors=True)
                failure = error
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            if failure is None:
                self._prune(step)
        if self.any_rank is not None:                      # every rank learns of rank 0's failure
            if self.any_rank(failure is not None) and failure is None:
                raise CheckpointWriteError(f"the main process could not write checkpoint {final} (its error says "
                                           "why); this rank stops too", final, "write")
        elif failure is None:
            self.barrier()
        if failure is not None:
            raise failure
        if self.local_rank == 0 and not self.is_main_process and tmp.is_dir():   # this node's own disk
            _write_json(tmp / "world.json", {"world_size": self.world_size, "engines": sorted(self.engines)})
            self._write_main(tmp, step, trainer_state, rng_name=None)
            self._publish(tmp, final, name)
            self._prune(step)
        self.barrier()
        return final if self.is_main_process else None

    def _write_main(self, tmp: Path, step: int, trainer_state: dict, rng_name: str | None) -> None:
        for key, module in self.modules.items():
            _save_tensors(_contiguous(module.state_dict()), tmp / f"{key}.safetensors")
        for key, optimizer in self.optimizers.items():
            tensors, meta = optimizer_to_tensors(optimizer)
            _save_tensors(tensors, tmp / f"{key}.optim.safetensors")
            _write_json(tmp / f"{key}.optim.json", meta)
        if rng_name is not None:
            tensors, meta = rng_to_tensors()
            _save_tensors(tensors, tmp / f"{rng_name}.safetensors")
            _write_json(tmp / f"{rng_name}.json", meta)
        _write_json(tmp / STATE_FILE, dict(trainer_state, step=step), indent=1, sync=True)
        with _writing(tmp):
            manifest = build_manifest(tmp, self.model_config)
        _write_json(tmp / MANIFEST, manifest, indent=1, sync=True)   # written last: lists everything above
        _fsync_dir(tmp)

    def _publish(self, tmp: Path, final: Path, name: str) -> None:
        with _writing(final):
            if final.exists():
                self._set_aside(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
        pointer = self.root / LATEST
        try:
            write_text_atomic(pointer, name)
        except (OSError, SafetensorError) as error:
            raise CheckpointWriteError(f"checkpoint {final} is complete but {pointer} could not be updated "
                                       f"({error}); it still names the previous checkpoint", pointer, "write",
                                       _errno_of(error)) from error

    def _set_aside(self, final: Path) -> None:
        """Make room for a new checkpoint of an existing step: a good old one goes, a damaged one is kept."""
        try:
            self.verify(final)
            damaged = None
        except (CheckpointCorruptError, FileNotFoundError) as error:
            damaged = error
        if damaged is None:
            old = self._tmp_name(f"old-{final.name}")
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
            return
        kept = self.root / f"corrupt-{final.name}-{self._nonce}"
        os.replace(final, kept)
        warnings.warn(f"{final} did not verify ({damaged}); it is kept as {kept} and a new checkpoint of that step "
                      "replaces it", CheckpointSkippedWarning, stacklevel=4)

    def _prune(self, step: int) -> None:
        """Keep the newest ``keep`` complete checkpoints up to ``step`` (newer ones belong to a timeline this run
        walked back from: left alone); remove this manager's temporary folders and those of dead processes."""
        complete = [p for s, p in self._step_dirs() if s <= step and (p / STATE_FILE).is_file()]
        for old in complete[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
            self._verified.pop(old, None)
        for stale in self.root.glob(".tmp-*"):
            if stale.is_dir() and self._disposable(stale.name):
                shutil.rmtree(stale, ignore_errors=True)

    def _disposable(self, name: str) -> bool:
        """Whether a temporary folder is this manager's or a dead process's (never a live run's)."""
        owned = _OWNED_TMP.fullmatch(name)
        if owned:
            pid = int(owned["pid"])
            if owned["host"] != self._host:
                return self.lock.held        # the folder's owner may clear another machine's leftovers
            if pid == os.getpid():
                return owned["nonce"] == self._nonce
            return not _pid_alive(pid)
        legacy = _LEGACY_TMP.fullmatch(name)
        if legacy:
            return not _pid_alive(int(legacy["pid"]))
        return bool(_SHARED_TMP.fullmatch(name)) and self.lock.held

    # -- load
    def load(self, path: str | Path | None = None, restore_rng: bool = True) -> dict:
        """Restore every registered object from ``path`` (default: the latest that verifies); returns the
        trainer state. The folder is verified first; a damaged one raises ``CheckpointCorruptError`` naming
        the file and the check, a changed architecture a ``ValueError`` naming the fields."""
        if path is None:
            path, skipped = self._newest_verified()
            self._warn_skipped(path, skipped)
            if path is None:
                if any(p.name != LATEST for p, _ in skipped):
                    raise self._none_verifies(skipped)
                raise FileNotFoundError(f"no complete checkpoint at {self.root}")
        path = Path(path)
        manifest = self.verify(path)
        self._check_model_config(path, manifest)
        for key, module in self.modules.items():
            file = path / f"{key}.safetensors"
            state = _read_tensors(file)
            try:
                result = module.load_state_dict(state)
            except RuntimeError as error:
                raise ValueError(f"checkpoint {file} does not fit '{key}' (was it written for another "
                                 f"architecture?): {error}") from error
            missing = getattr(result, "missing_keys", None)
            unexpected = getattr(result, "unexpected_keys", None)
            if missing or unexpected:
                raise ValueError(f"checkpoint {file} does not match '{key}': missing {missing}, unexpected {unexpected}")
        for key, optimizer in self.optimizers.items():
            file = path / f"{key}.optim.safetensors"
            tensors = _read_tensors(file)
            meta = _read_json(path / f"{key}.optim.json")
            try:
                optimizer_from_tensors(optimizer, tensors, meta)
            except (KeyError, ValueError, TypeError, AttributeError) as error:
                raise ValueError(f"checkpoint {file} does not fit the optimizer '{key}' (another model or "
                                 f"optimizer?): {error!r}") from error
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
                file = path / f"{rng_name}.safetensors"
                tensors, meta = _read_tensors(file), _read_json(path / f"{rng_name}.json")
                try:
                    rng_from_tensors(tensors, meta)
                except (KeyError, ValueError, TypeError, RuntimeError) as error:
                    raise _corrupt(file, "bad value", f"the RNG state {file} cannot be restored ({error!r}): "
                                   "it is damaged") from error
        return _read_state(path / STATE_FILE)

    def _check_model_config(self, path: Path, manifest: dict | None) -> None:
        saved = (manifest or {}).get("model_config")
        if self.model_config is None or not isinstance(saved, Mapping):
            return
        differences = config_differences(saved, self.model_config, self.model_config_defaults)
        if differences:
            raise ValueError(f"checkpoint {path} was written for another model config: {'; '.join(differences)}. "
                             "Resume with the saved model settings, or start a new run (another output_dir, or "
                             "overwrite)")

    def _check_world_size(self, path: Path) -> None:
        info = path / "world.json"
        if info.is_file():
            saved = _read_json(info).get("world_size")
            if saved != self.world_size:
                raise ValueError(f"the ZeRO checkpoint {path} was written by {saved} processes and this run has "
                                 f"{self.world_size}: resume with the same world size, or consolidate it with "
                                 f"`adatok export --checkpoint {path} --out DIR` and start from the export")
