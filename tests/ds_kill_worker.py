"""One rank of a multi-process stage-1 run that may SIGKILL itself inside a checkpoint write.

    RANK=0 WORLD_SIZE=2 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29511 \
        python tests/ds_kill_worker.py [--kill-in-save STEP:FILES] -- <train_tokenizer flags>

``tests/test_multiproc_faults.py`` starts one of these per rank itself (no launcher, so a rank that
loses its peer is left to notice on its own, as it would be on another node). Without
``--kill-in-save`` it is exactly ``python -m adatok_vlm.training.train_tokenizer`` (offline, one thread).
With ``--kill-in-save 6:2`` this rank sends itself SIGKILL right after it has written its 2nd file
of checkpoint ``step-00000006`` (files counted as the checkpoint writers ``_save_tensors`` /
``_write_json`` write them, and DeepSpeed's ``engine.save_checkpoint`` counted as one): a crash
between two files of one checkpoint, with the other rank somewhere in the same save.
"""

import os
import signal
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)


def kill_after_files(step: int, files: int) -> None:
    """Make this process SIGKILL itself after its ``files``-th file write into checkpoint ``step``."""
    from adatok_vlm.training import checkpointing

    folder, written = f"step-{step:08d}", [0]

    def counted(write):
        def wrapper(*args, **kwargs):
            result = write(*args, **kwargs)
            path = str(args[1] if write.__name__ == "_save_tensors" else args[0])
            if folder in path:
                written[0] += 1
                if written[0] >= files:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os.kill(os.getpid(), signal.SIGKILL)
            return result
        wrapper.__name__ = write.__name__
        return wrapper

    checkpointing._save_tensors = counted(checkpointing._save_tensors)
    checkpointing._write_json = counted(checkpointing._write_json)
    real_save = checkpointing.CheckpointManager._save_collective

    def save_collective(self, step_, trainer_state):   # the engine's shards count as one file
        if step_ == step:
            for tag, engine in list(self.engines.items()):
                if not getattr(engine, "_kill_counted", False):
                    real = engine.save_checkpoint

                    def save_checkpoint(*args, _real=real, **kwargs):
                        result = _real(*args, **kwargs)
                        written[0] += 1
                        if written[0] >= files:
                            os.kill(os.getpid(), signal.SIGKILL)
                        return result
                    engine.save_checkpoint = save_checkpoint
                    engine._kill_counted = True
        return real_save(self, step_, trainer_state)

    checkpointing.CheckpointManager._save_collective = save_collective


def main(argv: list[str]) -> None:
    if "--" not in argv:
        raise SystemExit("usage: ds_kill_worker.py [--kill-in-save STEP:FILES] -- <train_tokenizer flags>")
    split = argv.index("--")
    own, flags = argv[:split], argv[split + 1:]
    if own[:1] == ["--kill-in-save"]:
        step, files = (int(x) for x in own[1].split(":"))
        kill_after_files(step, files)
    from adatok_vlm.training.train_tokenizer import main as train_main

    train_main(flags)


if __name__ == "__main__":
    main(sys.argv[1:])
