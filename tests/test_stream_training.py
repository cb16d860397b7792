"""Stage 1 trains from a stream (webdataset tar shards): the batches, exact kill-free resume, unreadable
images counted as skipped, the errors for what a stream cannot do (preload, indexable-data stages), and the
epoch end that every rank reaches together."""

import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_loop import SMALL_TOKENIZER

from adatok_vlm.training import train_tokenizer
from adatok_vlm.training.data import load_image_dataset
from adatok_vlm.training.data_setup import DataConfig, StreamData, StreamEpochs, require_map_style
from adatok_vlm.training.data_transforms import NaturalImageTransform


def write_shards(folder: Path, num_shards: int, per_shard: int, broken: tuple[int, ...] = ()) -> list[str]:
    """``train-00000{s}.tar`` shards of ``per_shard`` images (``key.jpg`` + ``key.cls``, a horizontal ramp per
    image so crops and flips change the pixels); the images numbered in ``broken`` are truncated JPEGs."""
    folder.mkdir(parents=True, exist_ok=True)
    keys, k = [], 0
    for s in range(num_shards):
        with tarfile.open(folder / f"train-{s:06d}.tar", "w") as tar:
            for _ in range(per_shard):
                key = f"img{k:05d}"
                ramp = (10 * k + 9 * np.arange(40)) % 256
                buffer = io.BytesIO()
                Image.fromarray(np.tile(ramp.astype(np.uint8)[None, :, None], (36, 1, 3))).save(buffer, format="JPEG")
                image = buffer.getvalue()[:40] if k in broken else buffer.getvalue()
                for name, data in ((f"{key}.jpg", image), (f"{key}.cls", str(k % 3).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                keys.append(key)
                k += 1
    return keys


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream_shards")
    write_shards(root / "good", num_shards=2, per_shard=5)
    write_shards(root / "broken", num_shards=2, per_shard=4, broken=(1, 6))
    return root


def argv(data: Path, out: Path, max_steps: int, *extra: str) -> list[str]:
    return [*SMALL_TOKENIZER, "--data.dataset", str(data), "--output_dir", str(out), "--max_steps", str(max_steps),
            "--train.batch_size", "4", "--train.log_every", "1", "--train.save_every", "0",
            "--train.num_threads", "1", "--train.warmup_steps", "0", "--train.lr_schedule", "constant",
            "--train.sample_every", "0", "--train.export", "false", "--data.num_workers", "0", *extra]


def losses(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def final_tensors(summary: dict) -> dict:
    """Every tensor the final checkpoint holds (model, optimizer), by file."""
    folder = Path(summary["checkpoint"])
    return {f.name: load_file(str(f)) for f in sorted(folder.glob("*.safetensors")) if not f.name.startswith("rng")}


def test_stage1_resumes_a_stream_exactly(shards, tmp_path):
    """10 images in 2 shards, batch 4: 3 batches an epoch (4, 4, 2), so 4 steps cross an epoch end; the
    natural transforms crop and flip per (key, epoch). 2 steps, then --resume auto to 4 == 4 straight."""
    flags = ("--data.transforms", "natural", "--data.flip", "true")
    straight = train_tokenizer.main(argv(shards / "good", tmp_path / "straight", 4, *flags))
    first = train_tokenizer.main(argv(shards / "good", tmp_path / "resumed", 2, *flags))
    assert first["steps"] == 2
    resumed = train_tokenizer.main(argv(shards / "good", tmp_path / "resumed", 4, "--train.resume", "auto", *flags))
    assert resumed["steps"] == straight["steps"] == 4
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    assert len(losses(tmp_path / "straight")) == 4
    a, b = final_tensors(straight), final_tensors(resumed)
    assert a.keys() == b.keys() and "model.safetensors" in a
    assert all(a[f].keys() == b[f].keys() and all(torch.equal(a[f][k], b[f][k]) for k in a[f]) for f in a)
    state = json.loads((Path(straight["checkpoint"]) / "trainer_state.json").read_text())
    assert (state["epoch"], state["batch"]) == (1, 1)    # 3 batches in epoch 0, then 1 of epoch 1


def test_stream_batches_match_the_map_style_keys_and_reseed_each_epoch(shards):
    """Every image once per epoch, in an order fixed by (seed, epoch); other crops in another epoch; the
    batch dict has the keys of the map-style path; two workers give the same batches on a rerun."""
    cfg = DataConfig(dataset=str(shards / "good"), transforms="natural", flip=True)
    stream = StreamData(load_image_dataset(cfg.dataset, streaming=cfg.streaming), NaturalImageTransform(16, train=True))

    def epoch(reader, e, start=0):
        reader.set_position(e, start)
        return list(reader.stream())

    reader = StreamEpochs(stream, 4, num_workers=0, shuffle_buffer=100, seed=3)
    e0, e0_again, e1 = epoch(reader, 0), epoch(reader, 0), epoch(reader, 1)
    assert {"pixel_values", "labels", "keys", "num_skipped", "skipped"} <= set(e0[0])
    keys = [k for b in e0 for k in b["keys"]]
    assert sorted(keys) == [f"img{k:05d}" for k in range(10)]
    assert [b["keys"] for b in e0] == [b["keys"] for b in e0_again]
    assert all(torch.equal(x["pixel_values"], y["pixel_values"]) for x, y in zip(e0, e0_again))
    assert [b["keys"] for b in e1] != [b["keys"] for b in e0]        # shard order + buffer reshuffled
    crops0 = {k: p for b in e0 for k, p in zip(b["keys"], b["pixel_values"])}
    crops1 = {k: p for b in e1 for k, p in zip(b["keys"], b["pixel_values"])}
    assert any(not torch.equal(crops0[k], crops1[k]) for k in crops0)
    assert [b["keys"] for b in epoch(reader, 1, start=1)] == [b["keys"] for b in e1[1:]]
    with pytest.raises(ValueError, match="checkpoint resumed had taken 5"):
        epoch(reader, 1, start=5)
    workers = StreamEpochs(stream, 2, num_workers=2, shuffle_buffer=100, seed=3)
    w1, w2 = epoch(workers, 0), epoch(workers, 0)
    assert [b["keys"] for b in w1] == [b["keys"] for b in w2]
    assert sorted(k for b in w1 for k in b["keys"]) == sorted(keys)


def test_epoch_ends_together_when_one_ranks_stream_runs_out(tmp_path):
    """Two ranks (threads, with ``agree`` an all-reduce over them as ``any_rank`` is) over shards of 5 and 2
    images at batch 2: rank 1 runs out after 1 batch, rank 0 holds 3; both end the epoch after 1 batch."""
    write_shards(tmp_path / "a", 1, 5)
    write_shards(tmp_path / "b", 1, 2)
    (tmp_path / "b" / "train-000000.tar").rename(tmp_path / "a" / "train-000001.tar")
    stream = StreamData(load_image_dataset(tmp_path / "a"), NaturalImageTransform(8, train=False))
    barrier, flags, taken = threading.Barrier(2, timeout=60), [False, False], [0, 0]

    def run(rank: int) -> None:
        def agree(flag: bool) -> bool:
            flags[rank] = flag
            barrier.wait()
            anywhere = any(flags)
            barrier.wait()
            return anywhere

        reader = StreamEpochs(stream, 2, rank=rank, world_size=2, num_workers=0, seed=0, agree=agree)
        reader.set_position(0, 0)
        taken[rank] = sum(1 for _ in reader.stream())

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert taken == [1, 1] and not barrier.broken


RANK_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[3])
import torch.distributed as dist
from test_stream_training import argv
from adatok_vlm.training import train_tokenizer
summary = train_tokenizer.main(argv(sys.argv[1], sys.argv[2], 4, "--data.shuffle_buffer", "0"))
print(json.dumps({"rank": dist.get_rank(), "steps": summary["steps"]}), flush=True)
"""


def run_two_ranks(tmp_path, text: str, *args) -> list[dict]:
    """The script ``text`` in two real processes (gloo on the CPU), as ``accelerate launch`` would start them,
    with ``args`` as its arguments; each must exit 0 and print one JSON line last, returned per rank."""
    script = tmp_path / "rank.py"
    script.write_text(text)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2")
    procs = [subprocess.Popen([sys.executable, str(script), *map(str, args)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE="2")) for r in (0, 1)]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=280)
        assert proc.returncode == 0, stderr[-3000:]
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return results


@pytest.mark.timeout(300)
def test_two_processes_with_unequal_streams_end_each_epoch_together(tmp_path):
    """Two real processes (gloo) over shards of 5 and 2 images at batch 4: rank 1 holds 1 batch an epoch,
    rank 0 holds 2; both end every epoch after 1 batch, so 4 steps are 4 epochs on both ranks."""
    write_shards(tmp_path / "a", 1, 5)
    write_shards(tmp_path / "b", 1, 2)
    (tmp_path / "b" / "train-000000.tar").rename(tmp_path / "a" / "train-000001.tar")
    for rank in run_two_ranks(tmp_path, RANK_SCRIPT, tmp_path / "a", tmp_path / "run", Path(__file__).parent):
        assert rank["steps"] == 4
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert (state["epoch"], state["batch"], state["images"]) == (3, 1, 4 * 8)


def test_unreadable_stream_images_are_counted_as_skipped(shards, tmp_path):
    """8 images (numbers 1 and 6 truncated) in stream order (no shuffle) at batch 4: epoch 0 is 2 batches
    with one broken image each, epoch 1's first batch holds image 1 again: 3 skipped in 3 steps."""
    summary = train_tokenizer.main(argv(shards / "broken", tmp_path / "run", 3, "--data.shuffle_buffer", "0"))
    assert summary["steps"] == 3
    assert summary["skipped_images"] == 3


def test_what_a_stream_cannot_do_is_a_clear_error(shards, tmp_path):
    with pytest.raises(ValueError, match="data.preload: true.*stream"):
        train_tokenizer.main(argv(shards / "good", tmp_path / "run", 1, "--data.preload", "true"))
    with pytest.raises(ValueError, match="data.preload: true with data.streaming: true"):
        DataConfig(streaming=True, preload=True)
    with pytest.raises(ValueError, match="data.shuffle_buffer"):
        DataConfig(shuffle_buffer=-1)
    with pytest.raises(TypeError, match="data.streaming"):
        DataConfig(streaming="yes")
    cfg = DataConfig(dataset=str(shards / "good"))
    with pytest.raises(ValueError, match=r"data.dataset '.*good' is read as a stream.*stage 2's reward table"):
        require_map_style(load_image_dataset(cfg.dataset), cfg, "stage 2's reward table")
    copied = load_image_dataset(cfg.dataset, streaming=False)   # data.streaming false: a map-style copy
    assert require_map_style(copied, cfg, "x") is copied and len(copied) == 10
