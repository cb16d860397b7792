"""The stages after stage 1 read streams (webdataset tar shards) too: stage 2's reward table and latent-stats
from the stream's first N items, extract_tokens shard by shard over ranks with a resume that neither repeats
nor loses an image."""

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from PIL import Image
from safetensors import safe_open
from test_stream_training import run_two_ranks, write_shards
from test_vae_convert import converted_folder, direct_stats, stats_argv

from adatok_vlm.training import convert_vae as cv
from adatok_vlm.training.config import fill_dataclass
from adatok_vlm.training.data import load_image_dataset
from adatok_vlm.training.data_setup import take_stream_head
from adatok_vlm.training.train_policy import PolicyTrainingConfig, _reward_tables, load_tokenizer_for_policy

from conftest import tiny_model

TESTS = Path(__file__).parent     # the rank scripts import the test modules from here


def write_png_shards(folder: Path, num_shards: int, per_shard: int, size: int = 32) -> torch.Tensor:
    """``train-00000{s}.tar`` shards of random RGB PNGs (lossless, already ``size`` square, so the processor
    leaves them as they are); returns every image in stream order as ``[N, 3, S, S]`` float64 in [0, 1]."""
    folder.mkdir(parents=True, exist_ok=True)
    rng, arrays, k = np.random.default_rng(0), [], 0
    for s in range(num_shards):
        with tarfile.open(folder / f"train-{s:06d}.tar", "w") as tar:
            for _ in range(per_shard):
                array = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                buffer = io.BytesIO()
                Image.fromarray(array).save(buffer, format="PNG")
                for name, data in ((f"img{k:05d}.png", buffer.getvalue()), (f"img{k:05d}.cls", str(k % 2).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                arrays.append(array)
                k += 1
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).double() / 255.0


def test_a_stream_head_is_its_first_items_in_order_and_keeps_unreadable_ones_for_later(tmp_path):
    keys = write_shards(tmp_path / "shards", num_shards=3, per_shard=4, broken=(2,))
    stream = load_image_dataset(tmp_path / "shards")
    head = take_stream_head(stream, 7, tmp_path / "head")
    assert head["__key__"] == keys[:7] and head["label"] == [k % 3 for k in range(7)]
    assert take_stream_head(stream, 100)["__key__"] == keys            # a short stream: all of it
    with pytest.raises(ValueError, match="count"):
        take_stream_head(stream, 0)
    shutil.rmtree(tmp_path / "shards")   # reuse (the other ranks) reads the copy, not the stream
    again = take_stream_head(stream, 7, tmp_path / "head", reuse=True)
    assert again["__key__"] == keys[:7] and again.cache_files == head.cache_files


# =============================================================================================
# stage 2: the reward table
# =============================================================================================
def _table_meta(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["meta"])


def table_config(root: Path, out: str, table_size: int = 6, **data) -> PolicyTrainingConfig:
    """Stage 2 with a reward table of ``table_size`` + 3 held-out rows over the shards under ``root``."""
    return fill_dataclass(PolicyTrainingConfig, {
        "tokenizer": str(root / "tokenizer"), "data": {"dataset": str(root / "shards"), "num_workers": 0, **data},
        "train": {"output_dir": str(root / out), "reward_table": True, "table_size": table_size,
                  "val_size": 3, "table_chunk_size": 4, "seed": 0}})


def test_stage2_table_from_a_stream_equals_the_map_style_table_of_its_first_images(tmp_path):
    """table_size 6 + val_size 3 from a 12-image stream: the table of its first 9 images, equal (rows,
    losses, features) to the one measured map-style on the same 9 images (data.streaming false, data.limit 9);
    the metadata says "the first 9 of the stream", a rerun reads it back, another table_size measures anew."""
    write_shards(tmp_path / "shards", num_shards=3, per_shard=4)
    folder = tmp_path / "tokenizer"
    tiny_model("continuous", num_latent_tokens=8).save_pretrained(folder)
    model = load_tokenizer_for_policy(str(folder), {}).eval()
    acc = Accelerator(cpu=True)

    def config(out: str, table_size=6, **data):
        return table_config(tmp_path, out, table_size, **data)

    streamed, streamed_val, seconds = _reward_tables(config("stream"), model, acc)
    assert seconds > 0 and len(streamed) == 6 and len(streamed_val) == 3
    mapped, mapped_val, _ = _reward_tables(config("map", streaming=False, limit=9), model, acc)
    for ours, theirs in ((streamed, mapped), (streamed_val, mapped_val)):
        assert ours.rows.tolist() == theirs.rows.tolist()
        assert torch.allclose(ours.rl, theirs.rl, rtol=1e-5, atol=1e-7)
        assert torch.allclose(ours.features, theirs.features, atol=1e-6)
    assert sorted(streamed.rows.tolist() + streamed_val.rows.tolist()) == list(range(9))

    meta = _table_meta(tmp_path / "stream" / "reward_table" / "train.safetensors")
    assert meta["data"]["stream_head"]["count"] == 9 and meta["data"]["stream_head"]["taken"] == 9
    assert meta["data"]["stream_head"]["rows"].startswith("the first 9 items of the stream")
    assert meta["rows"]["total"] == 9
    assert "stream_head" not in _table_meta(tmp_path / "map" / "reward_table" / "train.safetensors")["data"]

    again, _, seconds = _reward_tables(config("stream"), model, acc)
    assert seconds == 0.0 and torch.equal(again.rl, streamed.rl)
    bigger, _, seconds = _reward_tables(config("stream", table_size=8), model, acc)   # the first 11 now
    assert seconds > 0 and len(bigger) == 8
    assert _table_meta(tmp_path / "stream" / "reward_table" / "train.safetensors")["data"]["stream_head"]["count"] == 11


def test_stage2_table_from_a_stream_needs_a_bound(tmp_path):
    write_shards(tmp_path / "shards", num_shards=1, per_shard=3)
    folder = tmp_path / "tokenizer"
    tiny_model("continuous", num_latent_tokens=8).save_pretrained(folder)
    model = load_tokenizer_for_policy(str(folder), {}).eval()
    cfg = fill_dataclass(PolicyTrainingConfig, {
        "tokenizer": str(folder), "data": {"dataset": str(tmp_path / "shards"), "num_workers": 0},
        "train": {"output_dir": str(tmp_path / "run"), "reward_table": True}})
    with pytest.raises(ValueError, match=r"read as a stream.*reward table.*train.table_size"):
        _reward_tables(cfg, model, Accelerator(cpu=True))


# =============================================================================================
# latent-stats
# =============================================================================================
def test_latent_stats_from_a_stream_equal_a_direct_computation_on_its_first_images(tmp_path):
    vae_dir, source = converted_folder(tmp_path)
    pixels = write_png_shards(tmp_path / "shards", num_shards=2, per_shard=3)
    record = cv.latent_stats_main(stats_argv(vae_dir, tmp_path / "shards", "--limit", "4", "--write_config", "false"))
    mean, std = direct_stats(source, pixels[:4])
    assert record["num_images"] == 4 and record["num_latent_values_per_channel"] == 4 * 8 * 8
    torch.testing.assert_close(torch.tensor(record["latent_mean"], dtype=torch.float64), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(record["latent_std"], dtype=torch.float64), std, rtol=1e-5, atol=1e-6)
    assert record["stream_head"]["count"] == 4 and record["stream_head"]["rows"].startswith("the first 4 items")
    other = direct_stats(source, pixels[2:6])[0]   # not any other 4 of the 6
    assert not torch.allclose(torch.tensor(record["latent_mean"], dtype=torch.float64), other, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"read as a stream.*latent-stats.*--limit N"):
        cv.latent_stats_main(stats_argv(vae_dir, tmp_path / "shards", "--limit", "null", "--write_config", "false"))


# =============================================================================================
# extract_tokens: the whole stream, shard by shard, over ranks, resumable
# =============================================================================================
RANK_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from test_stream_stages import extract
summary = extract(*sys.argv[2:5], "--extract.max_shards", "2", "--extract.keep_shards", "true")
print(json.dumps({"encoded_shards": summary["encoded_shards"], "complete": summary["complete"]}), flush=True)
"""


def extract(tokenizer, shards, out, *flags):
    from adatok_vlm.training.extract_tokens import main

    return main(["--tokenizer", str(tokenizer), "--output_dir", str(out), "--data.dataset", str(shards),
                 "--num_tokens", "4", "--extract.batch_size", "2", "--extract.num_threads", "1",
                 "--data.num_workers", "0", *flags])


@pytest.fixture(scope="module")
def stream_and_tokenizer(tmp_path_factory):
    """5 tar shards of 3 images (item 4, in shard 1, a truncated JPEG) and a tiny AdaTok (m = 8)."""
    root = tmp_path_factory.mktemp("extract_stream")
    keys = write_shards(root / "shards", num_shards=5, per_shard=3, broken=(4,))
    tiny_model(num_latent_tokens=8, seed=3).save_pretrained(root / "tokenizer")
    return root / "shards", root / "tokenizer", keys


def _rows(out: Path):
    from adatok_vlm.training.extract_tokens import TokenCache

    cache = TokenCache(out)
    return cache, cache.dataset["index"], [cache[i]["tokens"] for i in range(len(cache))]


@pytest.mark.timeout(600)
def test_extract_tokens_over_a_stream_with_2_ranks_and_a_resume_covers_every_image_once(stream_and_tokenizer,
                                                                                        tmp_path):
    """Two ranks, each stopped after 2 stream shards (rank 0: shards 0, 2; rank 1: shards 1, 3), then a
    one-process resume that encodes only shard 4: every readable image exactly once, indexed by its stream
    position, with the tokens of a straight run and of the same images read map-style."""
    shards, tokenizer, keys = stream_and_tokenizer
    straight = extract(tokenizer, shards, tmp_path / "straight")
    assert straight["complete"] and straight["num_shards"] == 5 and straight["encoded_shards"] == 5
    cache, index, tokens = _rows(tmp_path / "straight")
    readable = [i for i in range(len(keys)) if i != 4]
    assert index == readable and cache.meta["skipped_images"] == 1
    assert cache.labels.tolist() == [i % 3 for i in readable] and cache.class_names == ["0", "1", "2"]

    mapped = extract(tokenizer, shards, tmp_path / "mapped", "--data.streaming", "false", "--data.preload", "false",
                     "--extract.shard_size", "4")
    assert mapped["complete"]
    _, mapped_index, mapped_tokens = _rows(tmp_path / "mapped")
    assert mapped_index == index
    for ours, theirs in zip(tokens, mapped_tokens):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)

    out = tmp_path / "resumed"
    ranks = run_two_ranks(tmp_path, RANK_SCRIPT, TESTS, tokenizer, shards, out)
    assert [r["encoded_shards"] for r in ranks] == [2, 2] and not any(r["complete"] for r in ranks)
    written = sorted(p.name for p in (out / "shards").glob("shard-*.safetensors"))
    assert written == [f"shard-{s:05d}.safetensors" for s in range(4)]
    resumed = extract(tokenizer, shards, out)
    assert resumed["complete"] and resumed["encoded_shards"] == 1            # only shard 4 was left
    cache, resumed_index, resumed_tokens = _rows(out)
    assert resumed_index == index                                             # none twice, none missing
    for ours, theirs in zip(resumed_tokens, tokens):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert extract(tokenizer, shards, out)["encoded_shards"] == 0            # a finished cache is not redone


def test_extract_tokens_over_a_limited_stream_reads_its_first_items(stream_and_tokenizer, tmp_path):
    shards, tokenizer, keys = stream_and_tokenizer
    extract(tokenizer, shards, tmp_path / "straight")
    _, index, tokens = _rows(tmp_path / "straight")
    summary = extract(tokenizer, shards, tmp_path / "limited", "--data.limit", "7", "--extract.shard_size", "3",
                      "--data.preload", "false")   # preloading would index the readable images, not the rows
    assert summary["complete"] and not (tmp_path / "limited" / "stream_head").exists()
    cache, limited_index, limited_tokens = _rows(tmp_path / "limited")
    assert limited_index == [0, 1, 2, 3, 5, 6]
    assert cache.meta["manifest"]["stream_head"]["count"] == 7
    for ours, theirs in zip(limited_tokens, tokens):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_extract_tokens_reads_several_stream_shards_at_once_in_workers(stream_and_tokenizer, tmp_path):
    shards, tokenizer, _ = stream_and_tokenizer
    extract(tokenizer, shards, tmp_path / "inline")
    extract(tokenizer, shards, tmp_path / "workers", "--data.num_workers", "2")
    _, index, tokens = _rows(tmp_path / "inline")
    _, worker_index, worker_tokens = _rows(tmp_path / "workers")
    assert worker_index == index
    for ours, theirs in zip(worker_tokens, tokens):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_cache_latents_from_a_stream_says_why_not(tmp_path):
    from test_cache_latents import cache_args, save_vae

    from adatok_vlm.training.cache_latents import main as cache_latents

    write_shards(tmp_path / "shards", num_shards=1, per_shard=2)
    vae_dir = save_vae(tmp_path / "vae", seed=0)
    with pytest.raises(ValueError, match=r"read as a stream.*refuses data.latents with a stream.*data.streaming false"):
        cache_latents(cache_args(vae_dir, tmp_path / "shards", tmp_path / "cache", "--train.device", "cpu"))


TABLE_SCRIPT = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from test_stream_stages import table_config
from adatok_vlm.training.launch import make_accelerator
from adatok_vlm.training.train_policy import _reward_tables, load_tokenizer_for_policy
cfg = table_config(Path(sys.argv[2]), "two")
acc = make_accelerator("no")
table, val, _ = _reward_tables(cfg, load_tokenizer_for_policy(cfg.tokenizer, {}).eval(), acc)
print(json.dumps({"rank": acc.process_index, "rows": table.rows.tolist(), "rl": table.rl.tolist(),
                  "val_rows": val.rows.tolist(), "val_rl": val.rl.tolist()}), flush=True)
"""


@pytest.mark.timeout(600)
def test_stage2_table_from_a_stream_on_2_ranks_equals_one_process(tmp_path):
    """Two processes: the main one copies the stream's first 9 items, the other reads that copy; both end
    with the one-process table (rows and losses), and the copy is removed once the table is measured."""
    write_shards(tmp_path / "shards", num_shards=3, per_shard=4)
    tiny_model("continuous", num_latent_tokens=8).save_pretrained(tmp_path / "tokenizer")
    model = load_tokenizer_for_policy(str(tmp_path / "tokenizer"), {}).eval()
    one, one_val, _ = _reward_tables(table_config(tmp_path, "one"), model, Accelerator(cpu=True))
    for rank in run_two_ranks(tmp_path, TABLE_SCRIPT, TESTS, tmp_path):
        assert rank["rows"] == one.rows.tolist() and rank["val_rows"] == one_val.rows.tolist()
        torch.testing.assert_close(torch.tensor(rank["rl"]), one.rl, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(torch.tensor(rank["val_rl"]), one_val.rl, rtol=1e-5, atol=1e-7)
    assert not (tmp_path / "two" / "reward_table" / "stream_head").exists()
    assert (tmp_path / "two" / "reward_table" / "train.safetensors").is_file()
