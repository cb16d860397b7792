"""Streams in the last two places that refused them: stage 2 without a reward table (online REINFORCE) trains
from webdataset shards as stage 1 does, and ``data.limit`` on a stream means the stream's first ``limit``
items on any number of ranks and workers."""

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from test_stream_stages import TESTS, write_png_shards
from test_stream_training import run_two_ranks
from test_stream_training import final_tensors, losses, write_shards

from adatok_vlm.training.config import fill_dataclass
from adatok_vlm.training.data_setup import StreamData, StreamEpochs, build_train_data
from adatok_vlm.training.train_policy import PolicyTrainingConfig
from adatok_vlm.training.train_policy import train as train_policy

from conftest import tiny_model


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Preloaded sets are cached by fingerprint under $ADATOK_CACHE: a private one per test."""
    monkeypatch.setenv("ADATOK_CACHE", str(tmp_path / "adatok_cache"))


def policy_config(tokenizer: Path, data: dict, out: Path, **train) -> PolicyTrainingConfig:
    """Online stage 2 (no reward table) at batch 4, constant LR, a log row per step, no export."""
    return fill_dataclass(PolicyTrainingConfig, {
        "tokenizer": str(tokenizer), "data": {"num_workers": 0, **data},
        "train": {"output_dir": str(out), "batch_size": 4, "log_every": 1, "save_every": 0, "num_threads": 1,
                  "lr_schedule": "constant", "warmup_steps": 0, "seed": 0, "export": False, **train}})


# =============================================================================================
# data.limit on a stream: its first `limit` items, split disjointly over ranks and workers
# =============================================================================================
def epoch_keys(data: StreamData, world_size: int, num_workers: int, shuffle_buffer: int, epoch: int) -> list[list]:
    """The keys each rank of ``world_size`` reads in ``epoch`` (every rank built in this one process, as each
    process builds its own; ``agree`` is each rank's own end, which a single-process reader is)."""
    ranks = []
    for rank in range(world_size):
        reader = StreamEpochs(data, 2, rank=rank, world_size=world_size, num_workers=num_workers,
                              shuffle_buffer=shuffle_buffer, seed=0)
        reader.set_position(epoch, 0)
        ranks.append([key for batch in reader.stream() for key in batch["keys"]])
    return ranks


@pytest.mark.parametrize("world_size, num_workers, shuffle_buffer",
                         [(1, 0, 0), (1, 2, 0), (2, 0, 0), (2, 2, 0), (3, 0, 0), (3, 2, 0), (2, 2, 100)])
def test_a_limited_stream_is_its_first_items_on_any_number_of_ranks_and_workers(
        tmp_path, world_size, num_workers, shuffle_buffer):
    """3 shards of 4 images, data.limit 5: on every (ranks, workers) the ranks together read exactly the
    stream's first 5 images, each once, every epoch (the shards split among ranks or workers used to give each
    part its own first items: world 3 read images 0, 1, 4, 5, 8). Without a shuffle buffer one process reads
    them in stream order."""
    keys = write_shards(tmp_path / "shards", num_shards=3, per_shard=4)
    cfg = policy_config(tmp_path / "unused", {"dataset": str(tmp_path / "shards"), "limit": 5}, tmp_path / "run")
    data, _ = build_train_data(cfg, tiny_model().config, allow_stream=True, train=False)
    assert isinstance(data, StreamData) and data.limit == 5 and "first 5 items" in data.describe()
    for epoch in (0, 1):
        ranks = epoch_keys(data, world_size, num_workers, shuffle_buffer, epoch)
        read = [key for rank in ranks for key in rank]
        assert sorted(read) == keys[:5], (epoch, ranks)            # none twice, none missing, none beyond
        assert all(ranks), ranks                                      # every rank gets a share
        if world_size == 1 and num_workers == 0 and shuffle_buffer == 0:
            assert read == keys[:5]


def test_a_limited_stream_is_shuffled_among_its_first_items_only(tmp_path):
    """A shuffle buffer reorders the first 5 items (another order each epoch, the same for the same epoch) but
    never brings in a later one, on one rank as on two."""
    keys = write_shards(tmp_path / "shards", num_shards=3, per_shard=4)
    cfg = policy_config(tmp_path / "unused", {"dataset": str(tmp_path / "shards"), "limit": 5}, tmp_path / "run")
    data, _ = build_train_data(cfg, tiny_model().config, allow_stream=True, train=False)
    orders = {epoch: epoch_keys(data, 1, 0, 100, epoch)[0] for epoch in range(4)}
    assert all(sorted(order) == keys[:5] for order in orders.values())
    assert len({tuple(order) for order in orders.values()}) > 1
    assert epoch_keys(data, 1, 0, 100, 2)[0] == orders[2]


# =============================================================================================
# stage 2 online from a stream
# =============================================================================================
def repack_shards(source: Path, target: Path, order: list[int], per_shard: int) -> None:
    """The samples of the shards in ``source`` (``key.png`` + ``key.cls``, numbered in stream order) rewritten
    into shards under ``target`` in the order ``order``, ``per_shard`` to a shard."""
    samples = []
    for shard in sorted(source.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = tar.getmembers()
            for image, label in zip(members[::2], members[1::2]):
                samples.append([(m, tar.extractfile(m).read()) for m in (image, label)])
    target.mkdir(parents=True)
    for s in range(0, len(order), per_shard):
        with tarfile.open(target / f"train-{s // per_shard:06d}.tar", "w") as tar:
            for index in order[s : s + per_shard]:
                for member, data in samples[index]:
                    tar.addfile(member, io.BytesIO(data))


@pytest.fixture(scope="module")
def online(tmp_path_factory):
    """8 PNG images in 2 shards, a tiny AdaTok (m = 8), and the same 8 images repacked in the order in which
    the map-style run's sampler draws them at train.seed 0 (epoch 0): a stream that gives, batch for batch,
    the images the map-style run trains on."""
    root = tmp_path_factory.mktemp("online")
    write_png_shards(root / "shards", num_shards=2, per_shard=4)
    tiny_model("continuous", num_latent_tokens=8).save_pretrained(root / "tokenizer")
    order = torch.randperm(8, generator=torch.Generator().manual_seed(0)).tolist()   # ResumableBatchSampler's
    repack_shards(root / "shards", root / "drawn", order, per_shard=4)
    return root


def test_stage2_online_from_a_stream_trains_like_the_map_style_run_on_the_same_batches(online, tmp_path):
    """2 steps at batch 4: the stream (repacked in the map-style sampler's order, no shuffle buffer) and the
    map-style copy of the same shards (data.streaming false, preloaded) train on the same images in the same
    order from the same RNG state, so every logged loss and reward and the trained heads agree."""
    streamed = train_policy(policy_config(online / "tokenizer", {"dataset": str(online / "drawn"), "shuffle_buffer": 0},
                                          tmp_path / "stream", max_steps=2))
    mapped = train_policy(policy_config(online / "tokenizer", {"dataset": str(online / "shards"), "streaming": False},
                                        tmp_path / "map", max_steps=2))
    assert streamed["steps"] == mapped["steps"] == 2 and streamed["skipped_images"] == 0
    rows = {name: [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
            for name in ("stream", "map")}
    for ours, theirs in zip(rows["stream"], rows["map"], strict=True):
        for key in ("loss", "reward", "length_mean", "curve_loss"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-7), (ours["step"], key)
    assert len({round(r["loss"], 6) for r in rows["stream"]}) == 2          # two different batches
    ours, theirs = final_tensors(streamed), final_tensors(mapped)              # the heads and their AdamW state
    assert ours.keys() == theirs.keys() and ours
    for file in ours:
        assert ours[file].keys() == theirs[file].keys()
        for key in ours[file]:
            torch.testing.assert_close(ours[file][key], theirs[file][key], rtol=1e-4, atol=1e-6)


def test_stage2_online_from_a_stream_resumes_at_the_same_batch(online, tmp_path):
    """3 steps over 2 batches an epoch (an epoch end between), straight and as 1 step + --resume auto: the
    resumed run continues the step count and its losses are the straight run's."""
    data = {"dataset": str(online / "shards"), "shuffle_buffer": 100}
    straight = train_policy(policy_config(online / "tokenizer", data, tmp_path / "straight", max_steps=3))
    first = train_policy(policy_config(online / "tokenizer", data, tmp_path / "resumed", max_steps=1))
    assert first["steps"] == 1
    resumed = train_policy(policy_config(online / "tokenizer", data, tmp_path / "resumed", max_steps=3,
                                         resume="auto"))
    assert resumed["steps"] == straight["steps"] == 3
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    assert len({loss for _, loss in losses(tmp_path / "straight")}) == 3      # a batch read twice would show
    state = json.loads((Path(resumed["checkpoint"]) / "trainer_state.json").read_text())
    assert [h["step"] for h in state["history"]] == [1, 2, 3]
    assert (state["epoch"], state["batch"]) == (1, 1)


RANK_SCRIPT = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import torch.distributed as dist
from test_stream_policy import policy_config
from adatok_vlm.training.train_policy import train
root = Path(sys.argv[2])
summary = train(policy_config(root / "tokenizer", {"dataset": str(root / "shards"), "limit": 6, "shuffle_buffer": 0},
                              Path(sys.argv[3]), max_steps=3, batch_size=2))
print(json.dumps({"rank": dist.get_rank(), "steps": summary["steps"]}), flush=True)
"""


@pytest.mark.timeout(600)
def test_stage2_online_from_a_limited_stream_on_2_ranks(online, tmp_path):
    """Two processes (gloo), data.limit 6 of the 8 streamed images at batch 2: each rank reads 3 of the first 6
    (2 batches an epoch), so 3 steps end in epoch 1 after 1 batch on both ranks: the per-batch collectives of
    the stream's epoch end and of the skipped-batch check line up."""
    ranks = run_two_ranks(tmp_path, RANK_SCRIPT, TESTS, online, tmp_path / "two")
    assert sorted(r["rank"] for r in ranks) == [0, 1] and all(r["steps"] == 3 for r in ranks)
    state = json.loads((tmp_path / "two" / "checkpoints" / "step-00000003" / "trainer_state.json").read_text())
    assert (state["epoch"], state["batch"]) == (1, 1) and [h["step"] for h in state["history"]] == [1, 2, 3]
