"""The image modality for causal LMs: scatter, losses, stopping at [EOI], discrete mode, LoRA, save/load.

Tiny LMs (Llama and GPT-2 configs, hidden 32, 2 layers), a tiny AdaTok and an in-process WordLevel
tokenizer: no downloads, CPU only.
"""

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    LogitsProcessor,
    PreTrainedTokenizerFast,
)

from adatok_vlm import AdaTokConfig, AdaTokEncoding, AdaTokModel
from adatok_vlm.configuration_vlm import AdaTokVLMConfig
from adatok_vlm.flow_head import FlowHead
from adatok_vlm.tokenizer.image_processing_adatok import AdaTokImageProcessor
from adatok_vlm.modeling_vlm import (
    AdaTokVLMForCausalLM,
    ExactImageTokensLogitsProcessor,
    ImageLengthLogitsProcessor,
    ImageVocabularyLogitsProcessor,
    MaxImageTokensLogitsProcessor,
    MinImageTokensLogitsProcessor,
)
from adatok_vlm.peft_vlm import apply_lora, load_lora
from adatok_vlm.processing_vlm import AdaTokVLMProcessor
from adatok_vlm.registration import register
from adatok_vlm.tokenizer import pack_image_tokens, unpack_image_tokens

register()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine two spinning threads make
    each small op ~100x slower; restore the session's setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# ============================================================================================
# builders (also used by test_vlm_processor.py)
# ============================================================================================
WORDS = ["<pad>", "<s>", "</s>", "<unk>", "n", "=", "a", "cat", "draw", "shoe", "the", "is", "red",
         *[str(i) for i in range(10)]]
M = 12  # the tiny AdaTok's num_latent_tokens


def text_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer built in-process (digits split one by one)."""
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                pre_tokenizers.Digits(individual_digits=True)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def lm_config(arch: str, vocab_size: int):
    if arch == "llama":
        return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=128,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=128, vocab_size=vocab_size,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny_adatok(fsq: bool = False, seed: int = 0) -> AdaTokModel:
    torch.manual_seed(seed)
    extra = dict(bottleneck="fsq", fsq_levels=[8, 5, 5, 5], token_dim=4) if fsq else {}
    config = AdaTokConfig.from_preset("adatok-tiny", hidden_size=32, decoder_hidden_size=32, num_attention_heads=2,
                                      decoder_num_attention_heads=2, num_encoder_layers=1, num_decoder_layers=1,
                                      num_latent_tokens=M, **extra)
    return AdaTokModel(config).eval()


def tiny_vlm(arch: str = "llama", image_mode: str = "continuous", seed: int = 0, **config_kwargs):
    """(vlm, tokenizer): a tiny LM given the image modality; the tokenizer now holds [BOI] [IMG] [EOI]."""
    tok = text_tokenizer()
    adatok = tiny_adatok(fsq=image_mode == "discrete", seed=seed)
    torch.manual_seed(seed)
    lm = AutoModelForCausalLM.from_config(lm_config(arch, len(tok)))
    config_kwargs = {"flow_head_depth": 2, "num_flow_steps": 4, **config_kwargs}
    vlm = AdaTokVLMForCausalLM.from_text_model(lm, adatok, tok, image_mode=image_mode, **config_kwargs)
    return vlm.eval(), tok


def processor_for(vlm, tok) -> AdaTokVLMProcessor:
    return AdaTokVLMProcessor(AdaTokImageProcessor(size=32), tok, vlm.adatok)


def image_batch(vlm, tok, texts, lengths, seed: int = 0):
    """Processor output for ``texts`` with one random image per ``<image>`` and the given lengths."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(len(lengths), 3, 32, 32, generator=g)
    return processor_for(vlm, tok)(text=texts, images=images, num_image_tokens=torch.tensor(lengths))


def prompts(tok, texts):
    tok.padding_side = "left"
    return tok(texts, return_tensors="pt", padding=True)


def perturb_stop_rows(vlm, scale: float = 2.0, seed: int = 0) -> None:
    """Make the [IMG]/[EOI] head rows differ (mean-resizing gives new rows identical values)."""
    g = torch.Generator().manual_seed(seed)
    head = vlm.get_output_embeddings().weight
    rows = [vlm.config.img_token_id, vlm.config.eoi_token_id]
    with torch.no_grad():
        head[rows] += scale * torch.randn(2, head.shape[1], generator=g)


class StopAt(LogitsProcessor):
    """Test processor: inside an image, prefer [EOI] once the image has ``k[b]`` tokens, else [IMG]."""

    def __init__(self, vlm, k):
        self.c, self.k = vlm.config, k

    def __call__(self, input_ids, scores):
        from adatok_vlm.modeling_vlm import image_span_state

        inside, count = image_span_state(input_ids, self.c.boi_token_id, self.c.eoi_token_id)
        stop = inside & (count >= self.k)
        scores = scores.clone()
        scores[:, self.c.eoi_token_id] = torch.where(stop, 10.0, -10.0)
        scores[:, self.c.img_token_id] = 0.0
        return scores


# ============================================================================================
# the flow head
# ============================================================================================
def test_flow_head_learns_a_conditional_map():
    """Velocity sign and Euler direction: after training, samples land on each condition's target."""
    torch.manual_seed(0)
    head = FlowHead(token_dim=2, cond_dim=4, width=64, depth=2)
    head.zero_init_()
    cond = torch.eye(4)
    target = 2.0 * torch.tensor([[1.0, 1.0], [-1.0, 1.0], [1.0, -1.0], [-1.0, -1.0]])
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    first = None
    for _ in range(300):
        loss = head.loss(target, cond, batch_mul=16)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first
    samples = head.sample(cond.repeat(20, 1), num_steps=20).view(20, 4, 2)
    assert (samples.mean(0) - target).abs().max() < 0.35
    # guidance with identical conditions changes nothing
    g1, g2 = (torch.Generator().manual_seed(1) for _ in range(2))
    plain = head.sample(cond, num_steps=5, generator=g1)
    guided = head.sample(cond, num_steps=5, cfg_scale=3.0, uncond=cond, generator=g2)
    assert torch.allclose(plain, guided, atol=1e-5)


def test_flow_head_uses_the_generators_time_convention():
    """t = 1 is noise: a head whose velocity is the generator's target for a fixed x0 (v = noise - x0 at
    every t, i.e. the straight path) carries noise to x0 when integrated from t = 1 down to t = 0."""
    from adatok_vlm.generator.flow_matching import interpolate, velocity_target

    head = FlowHead(token_dim=2, cond_dim=3, width=8, depth=1)
    x0 = torch.tensor([[3.0, -1.0]])
    calls = []

    def straight(x_t, t, cond):                         # the exact velocity towards x0 along x_t = (1-t) x0 + t eps
        calls.append(float(t[0]))
        return (x_t - x0) / t[:, None]

    head.forward = straight
    out = head.sample(torch.zeros(1, 3), num_steps=4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x0)
    assert calls == [1.0, 0.75, 0.5, 0.25]              # from noise (t = 1) towards data
    noise = torch.randn(1, 2)
    x_half = interpolate(x0, noise, torch.tensor([0.5]))
    torch.testing.assert_close(straight(x_half, torch.tensor([0.5]), None), velocity_target(x0, noise))


def test_flow_head_converts_heads_saved_with_the_old_time_convention():
    """Weights trained with t = 0 noise and target x - eps give, after adopt_noise_to_data_time_, the
    velocity v_new(x, t) = -v_old(x, 1 - t) with unchanged state-dict keys; an old config.json (no
    flow_time_convention) is marked for that conversion, a new one is not."""
    import copy

    from adatok_vlm.configuration_vlm import DATA_TO_NOISE, NOISE_TO_DATA

    torch.manual_seed(0)
    head = FlowHead(token_dim=3, cond_dim=5, width=16, depth=2)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.3)
    old = copy.deepcopy(head)
    head.adopt_noise_to_data_time_()
    assert list(head.state_dict()) == list(old.state_dict())
    x, t, c = torch.randn(64, 3), torch.rand(64), torch.randn(64, 5)
    with torch.no_grad():
        new_v, old_v = head(x, t, c), old(x, 1 - t, c)
    torch.testing.assert_close(new_v, -old_v, atol=2e-3, rtol=1e-3)
    assert (new_v - old(x, t, c)).abs().max() > 0.1    # the conversion is not a no-op

    config = AdaTokVLMConfig(tokenizer_config=tiny_adatok().config)
    assert config.flow_time_convention == DATA_TO_NOISE
    saved = config.to_dict()
    assert AdaTokVLMConfig.from_dict(saved).flow_time_convention == DATA_TO_NOISE
    saved.pop("flow_time_convention")
    assert AdaTokVLMConfig.from_dict(saved).flow_time_convention == NOISE_TO_DATA
    with pytest.raises(ValueError, match="flow_time_convention"):
        AdaTokVLMConfig(tokenizer_config=tiny_adatok().config, flow_time_convention="backwards")


# ============================================================================================
# understanding: scatter and forward
# ============================================================================================
def test_pack_unpack_roundtrip():
    tokens = torch.randn(3, 5, 4)
    lengths = torch.tensor([2, 5, 1])
    packed = pack_image_tokens(tokens, lengths)
    assert packed.shape == (8, 4)
    unpacked = unpack_image_tokens(packed, lengths)
    mask = torch.arange(5)[None] < lengths[:, None]
    assert torch.equal(unpacked[mask], tokens[mask]) and (unpacked[~mask] == 0).all()


def test_scatter_puts_each_image_token_at_its_position():
    vlm, tok = tiny_vlm("llama")
    batch = image_batch(vlm, tok, ["n=3 <image> cat", "draw <image> a <image>"], [3, 5, 2])
    ids, tokens = batch["input_ids"], batch["image_tokens"]
    embeds = vlm.embed_inputs(ids, tokens)
    img = ids == vlm.config.img_token_id
    assert int(img.sum()) == tokens.shape[0] == 10
    # Read back at the [IMG] positions (row-major) == projector(tokens), in packing order.
    assert torch.allclose(embeds[img], vlm.projector(tokens), atol=1e-6)
    assert torch.equal(embeds[~img], vlm.get_input_embeddings()(ids)[~img])
    # forward() feeds exactly these embeddings to the LM.
    from adatok_vlm.modeling_vlm import position_ids_from_mask

    mask = batch["attention_mask"]
    with torch.no_grad():
        got = vlm(**batch).logits
        want = vlm.language_model(inputs_embeds=embeds, attention_mask=mask,
                                  position_ids=position_ids_from_mask(mask)).logits
    assert torch.allclose(got, want, atol=1e-5)


def test_image_count_must_match_img_positions():
    vlm, tok = tiny_vlm("llama")
    batch = image_batch(vlm, tok, ["n=3 <image> cat"], [4])
    with pytest.raises(ValueError, match=r"4 \[IMG\] positions but image_tokens has 3 rows"):
        vlm(input_ids=batch["input_ids"], image_tokens=batch["image_tokens"][:3])
    with pytest.raises(ValueError, match="no image_tokens"):
        vlm(input_ids=batch["input_ids"])
    with pytest.raises(ValueError, match="packed"):
        vlm(input_ids=batch["input_ids"], image_tokens=batch["image_tokens"][None])


# ============================================================================================
# training
# ============================================================================================
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_train_step_has_finite_loss_and_grads_everywhere_it_should(arch):
    vlm, tok = tiny_vlm(arch, text_loss_weight=0.5, image_loss_weight=2.0, stop_loss_weight=3.0)
    batch = image_batch(vlm, tok, ["n=3 <image> cat", "draw <image> a <image>"], [3, 5, 2])
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    vlm.train()
    assert not vlm.adatok.training
    out = vlm(**batch, labels=labels)
    for part in (out.loss, out.text_loss, out.image_loss, out.stop_loss):
        assert part is not None and torch.isfinite(part)
    assert torch.allclose(out.loss, 0.5 * out.text_loss + 2.0 * out.image_loss + 3.0 * out.stop_loss)
    out.loss.backward()
    grad = lambda params: sum(p.grad.abs().sum() for p in params if p.grad is not None)  # noqa: E731
    assert grad(vlm.language_model.parameters()) > 0
    assert grad(vlm.projector.parameters()) > 0
    assert grad(vlm.image_head.parameters()) > 0
    assert all(p.grad is None for p in vlm.adatok.parameters())


def test_images_read_not_written_have_no_image_or_stop_loss():
    vlm, tok = tiny_vlm("llama")
    batch = image_batch(vlm, tok, ["<image> the cat is red"], [4])
    ids = batch["input_ids"]
    labels = ids.clone()
    in_image = (ids == vlm.config.img_token_id) | (ids == vlm.config.boi_token_id) | (ids == vlm.config.eoi_token_id)
    labels[in_image] = -100
    out = vlm(**batch, labels=labels)
    assert out.text_loss is not None and out.image_loss is None and out.stop_loss is None
    assert torch.allclose(out.loss, out.text_loss)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_learns_to_stop_at_the_length_the_prompt_asks_for(arch):
    """Synthetic task: "n=K" is followed by an image of K tokens; the model must learn to emit [EOI] there.

    The image tokens are fresh noise at every step, so only the position can tell when to stop.
    """
    vlm, tok = tiny_vlm(arch)
    ks, steps = [2, 3, 5, 7, 9], 300
    processor = processor_for(vlm, tok)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW([p for p in vlm.parameters() if p.requires_grad], lr=5e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps)
    vlm.train()
    for _ in range(steps):
        enc = AdaTokEncoding(tokens=torch.randn(len(ks), M, 16, generator=g), lengths=torch.tensor(ks))
        batch = processor(text=[f"n={k} <image>" for k in ks], image_encoding=enc)
        labels = batch["input_ids"].clone()
        labels[:, :3] = -100  # the prompt
        out = vlm(**batch, labels=labels)
        assert torch.isfinite(out.loss)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        schedule.step()
    assert out.stop_loss < 0.1
    vlm.eval()
    p = prompts(tok, [f"n={k}" for k in ks])
    lengths = vlm.generate_images(p.input_ids, p.attention_mask, seed=0).lengths
    assert (lengths == torch.tensor(ks)).sum() >= 4, lengths.tolist()


# ============================================================================================
# continuous generation: stopping, bounds, exact lengths, cache
# ============================================================================================
def test_generation_halts_exactly_when_eoi_is_emitted(monkeypatch):
    vlm, tok = tiny_vlm("llama")
    p = prompts(tok, ["n=3", "draw a red cat", "a"])  # left padding
    k = torch.tensor([2, 6, 4])
    calls = []
    sample = vlm.image_head.sample
    monkeypatch.setattr(vlm.image_head, "sample", lambda *a, **kw: calls.append(1) or sample(*a, **kw))
    enc = vlm.generate_images(p.input_ids, p.attention_mask, logits_processor=[StopAt(vlm, k)], seed=0)
    assert enc.lengths.tolist() == [2, 6, 4]
    assert len(calls) == 6  # nothing is sampled once every row emitted [EOI]
    assert enc.tokens.shape == (3, 6, 16)
    assert (enc.tokens[~enc.token_mask] == 0).all() and (enc.tokens[enc.token_mask] != 0).any()


def test_never_before_min_or_after_max():
    vlm, tok = tiny_vlm("llama")
    p = prompts(tok, ["n=3", "a cat"])
    eager = [StopAt(vlm, torch.tensor([1, 1]))]   # the LM wants to stop at once
    lazy = [StopAt(vlm, torch.tensor([99, 99]))]  # the LM never wants to stop
    enc = vlm.generate_images(p.input_ids, p.attention_mask, min_image_tokens=torch.tensor([3, 5]),
                              logits_processor=eager, seed=0)
    assert enc.lengths.tolist() == [3, 5]
    enc = vlm.generate_images(p.input_ids, p.attention_mask, max_image_tokens=torch.tensor([4, 7]),
                              logits_processor=lazy, seed=0)
    assert enc.lengths.tolist() == [4, 7]
    enc = vlm.generate_images(p.input_ids, p.attention_mask, logits_processor=lazy, seed=0)
    assert enc.lengths.tolist() == [M, M]  # the default maximum is AdaTok's m
    enc = vlm.generate_images(p.input_ids, p.attention_mask, min_image_tokens=2, max_image_tokens=5,
                              logits_processor=[StopAt(vlm, torch.tensor([1, 8]))], seed=0)
    assert enc.lengths.tolist() == [2, 5]


@pytest.mark.parametrize("num", [5, torch.tensor([1, 7, 3])])
def test_exact_forced_lengths(num):
    vlm, tok = tiny_vlm("gpt2")
    perturb_stop_rows(vlm)
    p = prompts(tok, ["n=3", "a cat", "draw the shoe"])
    enc = vlm.generate_images(p.input_ids, p.attention_mask, num_image_tokens=num, do_sample=True, seed=0)
    want = [num] * 3 if isinstance(num, int) else num.tolist()
    assert enc.lengths.tolist() == want
    assert enc.tokens.shape[1] == max(want)


def test_kv_cache_generation_equals_no_cache_generation():
    vlm, tok = tiny_vlm("llama")
    perturb_stop_rows(vlm, scale=0.5)
    p = prompts(tok, ["n=3", "draw a red cat", "a"])
    with_cache = vlm.generate_images(p.input_ids, p.attention_mask, do_sample=True, seed=3, use_cache=True)
    without = vlm.generate_images(p.input_ids, p.attention_mask, do_sample=True, seed=3, use_cache=False)
    assert torch.equal(with_cache.lengths, without.lengths)
    assert len(set(with_cache.lengths.tolist())) > 1  # the stop decisions were exercised
    assert torch.allclose(with_cache.tokens, without.tokens, atol=1e-5)


def test_guidance_with_the_prompt_as_negative_is_unguided():
    vlm, tok = tiny_vlm("llama")
    p = prompts(tok, ["n=3", "a cat"])
    plain = vlm.generate_images(p.input_ids, p.attention_mask, num_image_tokens=4, seed=0)
    same = vlm.generate_images(p.input_ids, p.attention_mask, num_image_tokens=4, seed=0, cfg_scale=3.0,
                               negative_input_ids=p.input_ids, negative_attention_mask=p.attention_mask)
    assert torch.allclose(plain.tokens, same.tokens, atol=1e-4)
    other = vlm.generate_images(p.input_ids, p.attention_mask, num_image_tokens=4, seed=0, cfg_scale=3.0)
    assert other.tokens.shape == plain.tokens.shape and torch.isfinite(other.tokens).all()


def test_plain_generate_reads_prompt_images_once_and_matches_no_cache():
    vlm, tok = tiny_vlm("llama")
    batch = image_batch(vlm, tok, ["<image> the cat"], [3])
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    a = vlm.generate(**batch, use_cache=True, **kwargs)
    b = vlm.generate(**batch, use_cache=False, **kwargs)
    assert a.shape == (1, batch["input_ids"].shape[1] + 4) and torch.equal(a, b)


# ============================================================================================
# logits processors on their own
# ============================================================================================
def test_logits_processors_bound_the_open_image_only():
    boi, img, eoi, v = 5, 6, 7, 10
    ids = torch.tensor([[1, boi, img, img],      # inside, 2 tokens
                        [boi, img, eoi, 2],      # image closed
                        [1, 2, 3, boi]])         # inside, 0 tokens
    scores = torch.zeros(3, v)
    out = MinImageTokensLogitsProcessor(boi, eoi, 3)(ids, scores)
    assert out[0, eoi] == -float("inf") and out[1, eoi] == 0 and out[2, eoi] == -float("inf")
    out = MaxImageTokensLogitsProcessor(boi, eoi, torch.tensor([2, 1, 1]))(ids, scores)
    assert torch.isfinite(out[0]).sum() == 1 and out[0, eoi] == 0
    assert torch.isfinite(out[1]).all() and torch.isfinite(out[2]).all()
    out = ExactImageTokensLogitsProcessor(boi, eoi, 2)(ids, scores)
    assert torch.isfinite(out[0]).sum() == 1 and out[2, eoi] == -float("inf")
    out = ImageVocabularyLogitsProcessor(boi, eoi, range(8, 10))(ids, scores)
    assert set(torch.isfinite(out[0]).nonzero().flatten().tolist()) == {eoi, 8, 9}
    assert torch.isfinite(out[1]).all()
    with pytest.raises(ValueError, match="exact_tokens"):
        ImageLengthLogitsProcessor(boi, eoi, min_tokens=2, exact_tokens=3)


# ============================================================================================
# discrete mode (FSQ codes in the vocabulary)
# ============================================================================================
def test_discrete_mode_trains_with_ce_and_generates_through_plain_generate():
    vlm, tok = tiny_vlm("llama", image_mode="discrete")
    c = vlm.config
    assert c.codebook_size == 1000 and c.image_code_offset == len(tok)
    assert vlm.get_input_embeddings().weight.shape[0] == c.image_code_offset + c.codebook_size
    assert vlm.image_head is None
    batch = image_batch(vlm, tok, ["n=3 <image> cat", "a <image>"], [3, 5])
    vlm.train()
    out = vlm(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100))
    assert torch.isfinite(out.loss) and out.image_loss is not None and out.stop_loss is not None
    out.loss.backward()
    assert vlm.get_input_embeddings().weight.grad[c.image_code_offset:].abs().sum() > 0
    vlm.eval()

    p = prompts(tok, ["n=3", "draw a cat"])
    boi = torch.full((2, 1), c.boi_token_id)
    ids = torch.cat([p.input_ids, boi], dim=1)
    mask = torch.cat([p.attention_mask, torch.ones_like(boi)], dim=1)
    torch.manual_seed(0)
    out = vlm.generate(ids, attention_mask=mask, do_sample=True, max_new_tokens=8, pad_token_id=0,
                       eos_token_id=c.eoi_token_id,
                       logits_processor=vlm.image_logits_processors(min_image_tokens=2, max_image_tokens=5))
    new = out[:, ids.shape[1]:]
    enc = vlm.image_ids_to_encoding(new)
    assert ((enc.lengths >= 2) & (enc.lengths <= 5)).all()
    for row, length in zip(new, enc.lengths.tolist()):
        assert all(c.image_code_offset <= t < c.image_code_offset + c.codebook_size for t in row[:length].tolist())
        assert row[length] == c.eoi_token_id
    assert torch.equal(enc.tokens[enc.token_mask],
                       vlm.adatok.bottleneck.codes_to_tokens(enc.codes[enc.token_mask]))
    assert vlm.adatok.decode(enc.tokens, enc.lengths).shape == (2, 3, 32, 32)
    exact = vlm.generate_images(p.input_ids, p.attention_mask, num_image_tokens=torch.tensor([2, 4]))
    assert exact.lengths.tolist() == [2, 4] and exact.codes is not None


# ============================================================================================
# PEFT, save / load
# ============================================================================================
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_adapter_save_load_gives_identical_logits(arch, tmp_path):
    vlm, tok = tiny_vlm(arch)
    batch = image_batch(vlm, tok, ["n=3 <image> cat"], [4])
    vlm.save_pretrained(tmp_path / "base")
    peft_model = apply_lora(vlm, r=4, alpha=8)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable)
    assert any("projector" in n for n in trainable) and any("image_head" in n for n in trainable)
    assert not any(".adatok." in n for n in trainable)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for _ in range(2):
        loss = peft_model(**batch, labels=batch["input_ids"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    peft_model.eval()
    with torch.no_grad():
        trained = peft_model(**batch).logits
    peft_model.save_pretrained(tmp_path / "lora")

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    with torch.no_grad():
        untrained = base(**batch).logits
    reloaded = load_lora(base, tmp_path / "lora").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, trained)
    assert not torch.allclose(untrained, trained)
    p = prompts(tok, ["n=3"])
    assert reloaded.generate_images(p.input_ids, num_image_tokens=3, seed=0).lengths.tolist() == [3]
    merged = reloaded.merge_and_unload()
    assert isinstance(merged, AdaTokVLMForCausalLM)
    with torch.no_grad():
        assert torch.allclose(merged(**batch).logits, trained, atol=1e-5)


@pytest.mark.parametrize("arch,mode", [("llama", "continuous"), ("gpt2", "continuous"), ("llama", "discrete")])
def test_auto_model_reloads_a_saved_folder_identically(arch, mode, tmp_path):
    vlm, tok = tiny_vlm(arch, image_mode=mode)
    batch = image_batch(vlm, tok, ["n=3 <image> cat"], [4])
    vlm.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is AdaTokVLMForCausalLM
    assert loaded.config.image_token_ids == vlm.config.image_token_ids
    assert not any(p.requires_grad for p in loaded.adatok.parameters())
    if arch == "gpt2":  # tied embeddings stay tied
        lm = loaded.language_model
        assert lm.get_output_embeddings().weight.data_ptr() == lm.get_input_embeddings().weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, vlm(**batch).logits)
    p = prompts(tok, ["n=3", "a cat"])
    a = vlm.generate_images(p.input_ids, p.attention_mask, max_image_tokens=5, seed=0)
    b = loaded.generate_images(p.input_ids, p.attention_mask, max_image_tokens=5, seed=0)
    assert torch.equal(a.lengths, b.lengths) and torch.equal(a.tokens, b.tokens)


# ============================================================================================
# bad input
# ============================================================================================
def test_a_model_without_the_image_tokens_says_how_to_get_them():
    tok = text_tokenizer()
    config = AdaTokVLMConfig(text_config=lm_config("llama", len(tok)), tokenizer_config=tiny_adatok().config)
    vlm = AdaTokVLMForCausalLM(config).eval()
    tokens = torch.randn(3, 16)
    ids = torch.tensor([[4, 5, 13]])
    with pytest.raises(ValueError, match="from_text_model"):
        vlm(input_ids=ids, image_tokens=tokens)
    with pytest.raises(ValueError, match="from_text_model"):
        vlm.generate_images(ids)
    assert vlm(input_ids=ids).logits.shape == (1, 3, len(tok))  # plain text still works
    config = AdaTokVLMConfig(text_config=lm_config("llama", len(tok)), tokenizer_config=tiny_adatok().config,
                             boi_token_id=40, img_token_id=41, eoi_token_id=42)
    with pytest.raises(ValueError, match="outside the LM's vocabulary"):
        AdaTokVLMForCausalLM(config).generate_images(ids)


def test_bad_arguments_get_clear_errors():
    vlm, tok = tiny_vlm("llama")
    p = prompts(tok, ["n=3", "draw a red cat"])
    with pytest.raises(ValueError, match="left-padded"):
        vlm.generate_images(p.input_ids.flip(1), p.attention_mask.flip(1))
    with pytest.raises(ValueError, match="min_image_tokens must be <= max_image_tokens"):
        vlm.generate_images(p.input_ids, p.attention_mask, min_image_tokens=5, max_image_tokens=3)
    with pytest.raises(ValueError, match=f"<= {M}"):
        vlm.generate_images(p.input_ids, p.attention_mask, num_image_tokens=M + 1)
    with pytest.raises(ValueError, match="not both"):
        vlm.generate_images(p.input_ids, p.attention_mask, num_image_tokens=3, max_image_tokens=4)
    with pytest.raises(ValueError, match=r"shape \[2\]"):
        vlm.generate_images(p.input_ids, p.attention_mask, num_image_tokens=torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="num_image_tokens"):
        vlm.generate_images(p.input_ids, p.attention_mask, num_image_tokens=2.5)
    with pytest.raises(ValueError, match="labels must have the shape"):
        vlm(input_ids=p.input_ids, labels=p.input_ids[:, 1:])
    with pytest.raises(ValueError, match="FSQ"):
        AdaTokVLMForCausalLM.from_text_model(AutoModelForCausalLM.from_config(lm_config("llama", len(WORDS))),
                                             tiny_adatok(), text_tokenizer(), image_mode="discrete")
    from transformers import AutoModel

    with pytest.raises(TypeError, match="LM head"):
        AdaTokVLMForCausalLM.from_text_model(AutoModel.from_config(lm_config("llama", len(WORDS))), tiny_adatok(),
                                             text_tokenizer())
    with pytest.raises(TypeError, match="AdaTokModel"):
        AdaTokVLMForCausalLM.from_text_model(vlm.language_model, object(), tok)
    with pytest.raises(ValueError, match="image_mode"):
        AdaTokVLMConfig(tokenizer_config=tiny_adatok().config, image_mode="pixels")


# ============================================================================================
# synced_gpus: a finished rank keeps stepping until every rank is done
# ============================================================================================
class FakePeers:
    """Stands in for ``torch.distributed`` inside generation_vlm: one other rank that is still generating for
    ``peer_steps`` stop checks, and whose step budget is ``peer_limit``."""

    class ReduceOp:
        SUM, MAX = "sum", "max"

    def __init__(self, peer_steps: int, peer_limit: int = 0):
        self.peer_steps, self.peer_limit, self.sum_calls = peer_steps, peer_limit, 0

    def is_available(self):
        return True

    def is_initialized(self):
        return True

    def all_reduce(self, t, op):
        if op == self.ReduceOp.MAX:
            t.fill_(max(int(t), self.peer_limit))
            return
        self.sum_calls += 1
        t.add_(1.0 if self.sum_calls <= self.peer_steps else 0.0)


def test_synced_gpus_in_one_process_is_identical(tmp_path):
    import torch.distributed as dist

    vlm, tok = tiny_vlm("llama")
    p = prompts(tok, ["n=3", "draw a red cat", "a"])
    stop = [StopAt(vlm, torch.tensor([2, 5, 3]))]
    plain = vlm.generate_images(p.input_ids, p.attention_mask, logits_processor=stop, seed=0)
    synced = vlm.generate_images(p.input_ids, p.attention_mask, logits_processor=stop, seed=0, synced_gpus=True)
    assert torch.equal(plain.lengths, synced.lengths) and torch.equal(plain.tokens, synced.tokens)
    # A real (gloo) process group of world size 1: the all_reduce runs and changes nothing.
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        grouped = vlm.generate_images(p.input_ids, p.attention_mask, logits_processor=stop, seed=0, synced_gpus=True)
    finally:
        dist.destroy_process_group()
    assert torch.equal(plain.lengths, grouped.lengths) and torch.equal(plain.tokens, grouped.tokens)


def test_synced_gpus_finished_rank_runs_dummy_steps_until_peers_finish(monkeypatch):
    import adatok_vlm.generation_vlm as generation_vlm

    vlm, tok = tiny_vlm("llama")
    p = prompts(tok, ["n=3", "a cat"])
    stop = [StopAt(vlm, torch.tensor([2, 3]))]
    calls = []
    sample = vlm.image_head.sample
    monkeypatch.setattr(vlm.image_head, "sample", lambda *a, **kw: calls.append(1) or sample(*a, **kw))
    alone = vlm.generate_images(p.input_ids, p.attention_mask, logits_processor=stop, seed=0)
    assert alone.lengths.tolist() == [2, 3] and len(calls) == 3
    calls.clear()
    peers = FakePeers(peer_steps=7)  # the other rank closes its images only at its 8th stop check
    monkeypatch.setattr(generation_vlm, "dist", peers)
    synced = vlm.generate_images(p.input_ids, p.attention_mask, logits_processor=stop, seed=0, synced_gpus=True)
    assert peers.sum_calls == 8       # one agreement per step, until the peer is done too
    assert len(calls) == 8            # this rank kept sampling (dummy steps) while the peer worked
    assert synced.lengths.tolist() == [2, 3]
    assert torch.allclose(synced.tokens, alone.tokens)  # dummy steps write nothing
    # Without synced_gpus nobody asks the peers.
    peers.sum_calls = 0
    vlm.generate_images(p.input_ids, p.attention_mask, logits_processor=stop, seed=0)
    assert peers.sum_calls == 0


def test_synced_gpus_takes_the_longest_step_budget_of_the_ranks(monkeypatch):
    import adatok_vlm.generation_vlm as generation_vlm

    vlm, tok = tiny_vlm("llama")
    p = prompts(tok, ["n=3"])
    lazy = [StopAt(vlm, torch.tensor([99]))]  # never stops on its own: the bound ends it
    peers = FakePeers(peer_steps=100, peer_limit=6)  # the peer may write 6 tokens, this rank 3
    monkeypatch.setattr(generation_vlm, "dist", peers)
    enc = vlm.generate_images(p.input_ids, max_image_tokens=3, logits_processor=lazy, seed=0, synced_gpus=True)
    assert enc.lengths.tolist() == [3]     # this rank's own bound still holds
    assert peers.sum_calls == 5            # but it took the peer's 6 steps (5 stop checks after the first)


def _synced_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One rank of a real two-process (gloo) generation: rank 0 closes its image after 2 tokens, rank 1 after 6."""
    import json

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        vlm, tok = tiny_vlm("llama")
        p = prompts(tok, ["n=3"])
        calls = []
        sample = vlm.image_head.sample
        vlm.image_head.sample = lambda *a, **kw: calls.append(1) or sample(*a, **kw)
        k = torch.tensor([2 if rank == 0 else 6])
        enc = vlm.generate_images(p.input_ids, p.attention_mask, logits_processor=[StopAt(vlm, k)], seed=0,
                                  synced_gpus=True)
        dist.barrier()
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump({"lengths": enc.lengths.tolist(), "calls": len(calls)}, f)
    finally:
        dist.destroy_process_group()


def test_synced_gpus_two_real_processes_finish_together(tmp_path):
    """Two gloo ranks that stop at different lengths: both take the same number of steps and neither hangs."""
    import json
    import time

    import torch.multiprocessing as mp

    # fork: the ranks start from this process's imports instead of re-importing torch and adatok_vlm (~10 s of
    # CPU each on the shared cores); each still builds its own process group and model.
    ctx = mp.start_processes(_synced_worker, args=(2, str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=False,
                             start_method="fork")
    deadline, started = 120.0, time.time()
    while not ctx.join(timeout=5):
        if time.time() - started > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("a rank hung in synced generation")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["lengths"] for r in ranks] == [[2], [6]]
    assert ranks[0]["calls"] == ranks[1]["calls"] == 6   # rank 0 kept stepping (dummy steps) until rank 1 was done


# ============================================================================================
# the image tokens by the names users know (issue 19 item 5)
# ============================================================================================
def test_custom_token_strings_train_generate_save_and_reload(tmp_path):
    """eoi_token="[EOS]" (the paper's name): a training step, text and image generation, save, reload."""
    from transformers import AutoProcessor

    tok = text_tokenizer()
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(lm_config("llama", len(tok)))
    vlm = AdaTokVLMForCausalLM.from_text_model(lm, tiny_adatok(), tok, eoi_token="[EOS]", flow_head_depth=2,
                                               num_flow_steps=2)
    c = vlm.config
    assert (c.boi_token, c.img_token, c.eoi_token) == ("[BOI]", "[IMG]", "[EOS]")
    assert tok.convert_tokens_to_ids("[EOS]") == c.eoi_token_id and "[EOI]" not in tok.get_vocab()
    processor = AdaTokVLMProcessor.from_model(vlm, tok)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    batch = processor(text=["n=3 <image> cat", "<image> a"], images=images, num_image_tokens=torch.tensor([3, 2]))
    text = tok.decode(batch["input_ids"][0], skip_special_tokens=False).replace(" ", "")
    assert "[BOI][IMG][IMG][IMG][EOS]" in text
    # one training step (t2i: the stop target after the last token is [EOS])
    vlm.train()
    optimizer = torch.optim.AdamW([p for p in vlm.parameters() if p.requires_grad], lr=1e-3)
    out = vlm(**batch, labels=batch["input_ids"])
    assert out.stop_loss is not None and torch.isfinite(out.loss)
    out.loss.backward()
    optimizer.step()
    vlm.eval()
    p = prompts(tok, ["n=3", "a cat"])
    enc = vlm.generate_images(p.input_ids, p.attention_mask, max_image_tokens=4, seed=0)
    assert 1 <= int(enc.lengths.min()) and int(enc.lengths.max()) <= 4
    vlm.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.image_token_strings == {"boi_token": "[BOI]", "img_token": "[IMG]", "eoi_token": "[EOS]"}
    assert loaded.config.image_token_ids == c.image_token_ids
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert reloaded.eoi_token == "[EOS]"
    kwargs = dict(text=["n=3 <image> cat", "<image> a"], images=images, num_image_tokens=torch.tensor([3, 2]),
                  padding_side="left")
    again, want = reloaded(**kwargs), processor(**kwargs)
    assert [k for k in want if not torch.equal(again[k], want[k])] == []
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, vlm(**batch).logits)
    text_out = loaded.generate(**again, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert text_out.shape[1] == again["input_ids"].shape[1] + 2


def test_existing_lm_tokens_are_reused_only_when_asked():
    tok = text_tokenizer()
    tok.add_special_tokens({"extra_special_tokens": ["<|image_start|>", "<|image_end|>"]},
                           replace_extra_special_tokens=False)
    start, end = tok.convert_tokens_to_ids("<|image_start|>"), tok.convert_tokens_to_ids("<|image_end|>")
    lm = AutoModelForCausalLM.from_config(lm_config("llama", len(tok)))
    kwargs = dict(boi_token="<|image_start|>", eoi_token="<|image_end|>")
    with pytest.raises(ValueError, match="reuse_existing_tokens=True"):
        AdaTokVLMForCausalLM.from_text_model(lm, tiny_adatok(), tok, **kwargs)
    size = len(tok)
    vlm = AdaTokVLMForCausalLM.from_text_model(lm, tiny_adatok(), tok, reuse_existing_tokens=True, **kwargs)
    assert (vlm.config.boi_token_id, vlm.config.eoi_token_id) == (start, end)
    assert len(tok) == size + 1 and vlm.config.img_token_id == size      # only [IMG] is new
    assert vlm.vocab_size == size + 1
    with pytest.raises(ValueError, match="end-of-text"):
        AdaTokVLMForCausalLM.from_text_model(AutoModelForCausalLM.from_config(lm_config("llama", len(tok))),
                                             tiny_adatok(), text_tokenizer(), eoi_token="</s>",
                                             reuse_existing_tokens=True)
    with pytest.raises(ValueError, match="three different strings"):
        AdaTokVLMForCausalLM.from_text_model(AutoModelForCausalLM.from_config(lm_config("llama", len(tok))),
                                             tiny_adatok(), text_tokenizer(), boi_token="[X]", img_token="[X]")


# ============================================================================================
# saved folders: model card, subfolder, the wrong folder (issue 19 item 4, issue 20)
# ============================================================================================
def test_model_card_and_subfolder_loading(tmp_path):
    vlm, tok = tiny_vlm("llama")
    target = tmp_path / "release" / "vlm"
    vlm.save_pretrained(target, model_card={"training": {"data": "fashion_mnist", "steps": 7},
                                            "metrics": {"accuracy_auto": 0.5}})
    card = (target / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: adatok-vlm")
    assert "model_type: `adatok_vlm`" in card and "preset: `adatok-tiny`" in card
    assert "| steps | 7 |" in card and "| accuracy_auto | 0.5 |" in card and "[EOI]" in card
    loaded = AdaTokVLMForCausalLM.from_pretrained(tmp_path / "release", subfolder="vlm").eval()
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "release", subfolder="vlm").eval()
    batch = image_batch(vlm, tok, ["n=3 <image> cat"], [4])
    with torch.no_grad():
        want = vlm(**batch).logits
        assert torch.equal(loaded(**batch).logits, want) and torch.equal(auto(**batch).logits, want)
    with pytest.raises(FileNotFoundError, match="subfolder"):
        AdaTokVLMForCausalLM.from_pretrained(tmp_path / "release", subfolder="nope")


def test_from_pretrained_refuses_other_folders_before_building_anything(tmp_path, monkeypatch):
    tiny_adatok().save_pretrained(tmp_path / "tokenizer")
    built = []

    def no_build(self, *args, **kwargs):
        built.append(1)
        raise AssertionError("a model was built")

    monkeypatch.setattr(AdaTokVLMForCausalLM, "__init__", no_build)
    with pytest.raises(ValueError, match="model_type.*'adatok'.*AdaTokModel"):
        AdaTokVLMForCausalLM.from_pretrained(tmp_path / "tokenizer")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        AdaTokVLMForCausalLM.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        AdaTokVLMForCausalLM.from_pretrained(tmp_path / "empty")
    assert not built


def test_sample_t2i_refuses_a_tokenizer_folder(tmp_path):
    from adatok_vlm import sample_t2i

    tiny_adatok().save_pretrained(tmp_path / "tokenizer")
    with pytest.raises(ValueError, match="model_type"):
        sample_t2i.main(["--model", str(tmp_path / "tokenizer"), "--prompt", "x", "--out", str(tmp_path / "o")])


def test_bad_stop_temperature_and_non_finite_image_tokens():
    vlm, tok = tiny_vlm("llama")
    p = prompts(tok, ["n=3"])
    for bad in (0, 0.0, float("nan"), -1, float("inf")):
        with pytest.raises(ValueError, match="stop_temperature"):
            vlm.generate_images(p.input_ids, p.attention_mask, do_sample=True, stop_temperature=bad)
    enc = vlm.generate_images(p.input_ids, p.attention_mask, do_sample=True, stop_temperature=0.5, seed=0,
                              max_image_tokens=3)
    assert 1 <= int(enc.lengths[0]) <= 3
    batch = image_batch(vlm, tok, ["n=3 <image> cat"], [4])
    for bad in (float("nan"), float("inf")):
        tokens = batch["image_tokens"].clone()
        tokens[2, 1] = bad
        with pytest.raises(ValueError, match="image_tokens"):
            vlm(**{**batch, "image_tokens": tokens}, labels=batch["input_ids"])


def test_model_card_reads_the_loops_training_info_and_the_prompt_layout(tmp_path):
    """The card merges what the training loop recorded (``training_info.json``) with the VLM's own prompt
    layout (``vlm_training.json``); the loop's value wins where both give one."""
    vlm, _ = tiny_vlm("llama")
    (tmp_path / "training_info.json").write_text(json.dumps({"training": {"data": "fm", "steps": 5, "lr": 0.001}}))
    (tmp_path / "vlm_training.json").write_text(json.dumps({"direction": "t2i", "steps": 4}))
    vlm.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "| steps | 5 |" in card and "| lr | 0.001 |" in card and "| direction | t2i |" in card
    with pytest.raises(ValueError, match="model_card"):
        vlm.save_pretrained(tmp_path / "bad", model_card={"metric": {}})
