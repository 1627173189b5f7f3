"""The hand-written Qwen2 against transformers' Qwen2ForCausalLM: logits, generation, chat format, loading errors.

    python -m pytest tests/test_model.py
"""
import json
import re

import pytest
import torch
from conftest import copy_checkpoint, gsm8k_records, make_checkpoint

import data
import load
import loop
import weights
import generate as generate_module
from generate import KVCache, generate, left_pad, prefill, sample
from load import resolve_checkpoint
import tinyreason
from tinyreason import Decoder, Config
from tokenizer import Tokenizer


def logits(model, ids, mask=None, cache=None):
    return model.lm_head(model(ids, mask, cache))


def greedy(model, tok, prompts, n, **kw):
    return generate(model, tok, prompts, n, **kw)[0]


def hf_model(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def questions(tok, n=4):
    return [tok.apply_chat([{"role": "user", "content": r["question"]}]) for r in gsm8k_records(n)]


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return Decoder.from_pretrained(tiny_checkpoint, dtype=torch.float32, device="cpu"), Tokenizer.from_pretrained(tiny_checkpoint)


EVERY_ARCHITECTURE = ["tiny_checkpoint", "tiny_tied_checkpoint", "tiny_llama_checkpoint", "tiny_phi_checkpoint"]


@pytest.mark.parametrize("which", EVERY_ARCHITECTURE)
def test_logits_match_transformers(which, request):
    path = request.getfixturevalue(which)
    ours, ref = Decoder.from_pretrained(path, dtype=torch.float32, device="cpu"), hf_model(path)
    ids = torch.randint(0, ours.config.vocab_size, (2, 33))
    with torch.no_grad():
        assert (logits(ours, ids) - ref(ids).logits).abs().max() < 1e-4


def test_tied_checkpoint_shares_embedding_and_lm_head(tiny_tied_checkpoint, tiny_checkpoint):
    tied = Decoder.from_pretrained(tiny_tied_checkpoint, dtype=torch.float32, device="cpu")
    untied = Decoder.from_pretrained(tiny_checkpoint, dtype=torch.float32, device="cpu")
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


def right_padded(prompts, pad_id):
    return data.collate([{"input_ids": p, "labels": p} for p in prompts], pad_id)


@pytest.mark.parametrize("with_mask", [True, False], ids=["with the mask", "without a mask"])
def test_right_padded_rows_get_the_logits_of_each_row_alone(tiny, with_mask):
    """Right padding (training, RL) needs no attention mask: causal attention keeps real tokens off the padding."""
    model, tok = tiny
    prompt = questions(tok, 1)[0]
    prompts = [prompt, prompt[:9]]
    batch = right_padded(prompts, tok.pad_id)
    with torch.no_grad():
        padded = logits(model, batch["input_ids"], batch["attention_mask"] if with_mask else None)
        for row, p in enumerate(prompts):
            assert (padded[row, :len(p)] - logits(model, torch.tensor([p]))[0]).abs().max() < 1e-4


def test_left_padded_rows_without_a_cache_match_transformers(tiny, tiny_checkpoint):
    model, tok = tiny
    ids, mask = left_pad(questions(tok, 3), tok.pad_id)
    with torch.no_grad():
        diff = logits(model, ids, mask) - hf_model(tiny_checkpoint)(ids, attention_mask=mask.long()).logits
    assert diff[mask].abs().max() < 1e-4


def test_left_padded_prefill_in_the_cache_matches_transformers(tiny, tiny_checkpoint):
    model, tok = tiny
    ids, mask = left_pad(questions(tok, 3), tok.pad_id)
    cache = KVCache(model.config, len(ids), ids.shape[1], torch.float32, "cpu")
    with torch.no_grad():
        ours = logits(model, ids, mask, cache)
        diff = ours - hf_model(tiny_checkpoint)(ids, attention_mask=mask.long()).logits
    assert diff[mask].abs().max() < 1e-4


def test_gradient_checkpointing_gives_the_same_gradients(tiny_checkpoint):
    model = Decoder.from_pretrained(tiny_checkpoint, dtype=torch.float32, device="cpu").train()
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    grads = []
    for ckpt in (False, True):
        model.gradient_checkpointing = ckpt
        model.model.layers[0].mlp.up_proj.weight.requires_grad_(True).grad = None
        logits(model, ids).logsumexp(-1).mean().backward()
        grads.append(model.model.layers[0].mlp.up_proj.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.parametrize("has_bf16, auto", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_precision_on_cpu_is_bf16_only_where_the_cpu_computes_in_it(monkeypatch, has_bf16, auto):
    monkeypatch.setattr(load, "cpu_has_bf16", lambda: has_bf16)
    assert load.resolve_precision("cpu", "auto") == (torch.device("cpu"), auto)


@pytest.mark.parametrize("capability, auto", [((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                                              ((9, 0), torch.bfloat16)])
def test_auto_precision_on_cuda_is_bf16_from_compute_capability_8_else_fp16(monkeypatch, capability, auto):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert load.resolve_precision("cuda", "auto") == (torch.device("cuda"), auto)


def test_fp16_on_cuda_trains_with_an_enabled_grad_scaler(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # a T4
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # else the scaler disables itself here
    _, scaler = loop.amp(*load.resolve_precision("cuda", "auto"))
    assert scaler.is_enabled()


def test_asking_for_bf16_on_a_cpu_without_it_warns_and_is_obeyed(monkeypatch):
    monkeypatch.setattr(load, "cpu_has_bf16", lambda: False)
    with pytest.warns(UserWarning, match="--dtype bf16 on a CPU without bf16 instructions"):
        assert load.resolve_precision("cpu", "bf16")[1] == torch.bfloat16


def test_device_cuda_without_a_cuda_device_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device cuda: torch sees no CUDA device here"):
        load.resolve_precision("cuda", "auto")


def naive_greedy(model, prompt, n, stop):
    """The oracle: re-run the whole sequence every step, no cache, no padding."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(logits(model, torch.tensor([ids]))[0, -1].argmax().item())
        if ids[-1] in stop:
            break
    return ids[len(prompt):]


@pytest.fixture(scope="module")
def sharp_checkpoint(tmp_path_factory, tokenizer_dir):
    """Init std 0.1 instead of 0.02: with 0.02 attention is nearly uniform, so even wrong positions change nothing,
    and the top two logits are close enough for rounding to swap them."""
    return make_checkpoint(tmp_path_factory.mktemp("sharp"), tokenizer_dir, tie=False, initializer_range=0.1)


@pytest.fixture(scope="module")
def sharp(sharp_checkpoint):
    return Decoder.from_pretrained(sharp_checkpoint, dtype=torch.float32), Tokenizer.from_pretrained(sharp_checkpoint)


def test_left_padded_greedy_equals_each_prompt_alone(sharp):
    """A short prompt beside a long one sits behind many pads: were they counted in its positions, its prompt and
    its new tokens would disagree on where they are, and it would continue differently."""
    model, tok = sharp
    long = questions(tok, 1)[0]
    prompts = [long, long[:6], long[:40]]
    assert greedy(model, tok, prompts, 20) == [greedy(model, tok, [p], 20)[0] for p in prompts]


@pytest.mark.cuda
def test_fp32_greedy_on_cuda_equals_greedy_on_the_cpu(sharp, sharp_checkpoint):
    model, tok = sharp
    prompts = questions(tok, 3)
    gpu = Decoder.from_pretrained(sharp_checkpoint, dtype=torch.float32, device="cuda")
    assert greedy(gpu, tok, prompts, 24) == greedy(model, tok, prompts, 24)


@pytest.mark.cuda
def test_the_static_decode_step_captured_in_cuda_graphs_gives_the_eager_tokens(sharp, sharp_checkpoint):
    _, tok = sharp
    prompts = questions(tok, 6)
    gpu = Decoder.from_pretrained(sharp_checkpoint, dtype=torch.float32, device="cuda")
    eager = greedy(gpu, tok, prompts, 24, batch_size=4)  # refills
    assert greedy(gpu, tok, prompts, 24, batch_size=4, compile=True) == eager


@pytest.mark.cuda
def test_right_padded_rows_on_cuda_get_the_logits_of_each_row_alone(sharp, sharp_checkpoint):
    _, tok = sharp
    model = Decoder.from_pretrained(sharp_checkpoint, dtype=torch.float32, device="cuda")
    prompt = questions(tok, 1)[0]
    prompts = [prompt, prompt[:9]]
    batch = {k: v.cuda() for k, v in right_padded(prompts, tok.pad_id).items()}
    with torch.no_grad():
        padded = logits(model, batch["input_ids"], batch["attention_mask"])
        for row, p in enumerate(prompts):
            alone = logits(model, torch.tensor([p], device="cuda"))[0]
            torch.testing.assert_close(padded[row, :len(p)], alone, atol=1e-4, rtol=1e-4)


def test_cached_greedy_equals_naive_greedy(tiny):
    model, tok = tiny
    prompts = questions(tok, 2)
    with torch.no_grad():
        assert greedy(model, tok, prompts, 12) == [naive_greedy(model, p, 12, tok.stop_ids) for p in prompts]


def test_batched_greedy_equals_one_by_one_even_when_rows_stop_early(tiny):
    model, tok = tiny
    prompts = questions(tok, 4)
    # A random model seldom emits <|im_end|>: also stop at a token that some rows emit and others never do,
    # so rows leave the batch mid-way.
    first = greedy(model, tok, prompts, 30)
    stop = [tok.eot_id, min(t for row in first for t in row if any(t not in other for other in first))]
    batched = greedy(model, tok, prompts, 30, stop_ids=stop)
    assert len({len(o) for o in batched}) > 1, "rows should stop at different steps"
    assert batched == [greedy(model, tok, [p], 30, stop_ids=stop)[0] for p in prompts]


def early_stop(model, tok, prompts, n):
    """Stop tokens that make rows of these prompts end at different steps (a random model seldom emits its own)."""
    first = greedy(model, tok, prompts, n)
    return [tok.eot_id, min(t for row in first for t in row if any(t not in other for other in first))]


def test_a_batch_smaller_than_the_prompts_refills_its_free_slots_and_gives_the_same_tokens(tiny, monkeypatch):
    model, tok = tiny
    prompts = [q[-12:] for q in questions(tok, 8)]  # short prompts: their 30 new tokens fill the cache
    stop = early_stop(model, tok, prompts, 30)
    compactions = []
    monkeypatch.setattr(KVCache, "compact", lambda self, f=KVCache.compact: (compactions.append(self.len), f(self)))
    alone = [greedy(model, tok, [p], 30, stop_ids=stop)[0] for p in prompts]
    assert greedy(model, tok, prompts, 30, stop_ids=stop, batch_size=3) == alone
    assert compactions, "rows joining later should have filled the cache and made it drop finished rows' columns"


def test_the_samples_of_a_prompt_join_the_batch_together(tiny):
    model, tok = tiny
    prompts = questions(tok, 3)
    out = greedy(model, tok, prompts, 12, num_samples=2, batch_size=3)  # room for one prompt's 2 samples at a time
    assert out == [row for p in prompts for row in greedy(model, tok, [p], 12) * 2]


def test_on_done_sees_each_row_once_when_it_ends_with_all_its_tokens(tiny):
    model, tok = tiny
    prompts = questions(tok, 4)
    stop = early_stop(model, tok, prompts, 20)
    ended, lengths = [], {}
    out = greedy(model, tok, prompts, 20, stop_ids=stop, batch_size=2,
                 on_token=lambda row, t: lengths.__setitem__(row, lengths.get(row, 0) + 1),
                 on_done=lambda row, ids: ended.append((row, lengths.get(row, 0), list(ids))))
    assert sorted(ended) == [(row, len(o) - (o[-1] in stop), o) for row, o in enumerate(out)]


def compiled_by(monkeypatch, backend):
    """torch.compile with `backend` and fullgraph: a graph break in the static step fails the test."""
    compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile(fn, backend=backend, fullgraph=True, dynamic=False))


def test_the_static_decode_step_gives_the_eager_step_s_tokens(tiny_checkpoint, monkeypatch):
    model, tok = Decoder.from_pretrained(tiny_checkpoint, dtype=torch.float32), Tokenizer.from_pretrained(tiny_checkpoint)
    compiled_by(monkeypatch, "eager")
    prompts = [q[-12:] for q in questions(tok, 6)]
    stop = early_stop(model, tok, prompts, 30)
    eager = greedy(model, tok, prompts, 30, stop_ids=stop, batch_size=4)  # refills and compactions
    assert greedy(model, tok, prompts, 30, stop_ids=stop, batch_size=4, compile=True) == eager

    def sampled(**kw):
        return generate(model, tok, prompts[:2], 12, temperature=1.0, num_samples=3,
                        generator=torch.Generator().manual_seed(0), **kw)
    assert sampled(compile=True) == sampled()


def test_the_static_decode_step_compiles_once_for_generations_of_other_prompts(tiny_checkpoint, monkeypatch):
    from torch._dynamo.testing import CompileCounter
    model, tok = Decoder.from_pretrained(tiny_checkpoint, dtype=torch.float32), Tokenizer.from_pretrained(tiny_checkpoint)
    counter = CompileCounter()
    compiled_by(monkeypatch, counter)
    prompts = questions(tok, 5)
    greedy(model, tok, prompts[:3], 8, batch_size=3, compile=True)
    greedy(model, tok, prompts[2:], 16, batch_size=3, compile=True)
    assert counter.frame_count == 1


def test_one_unpadded_prompt_is_prefilled_without_a_t_by_t_mask(tiny, monkeypatch):
    model, tok = tiny
    queries = []
    monkeypatch.setattr(generate_module, "causal_mask", lambda real, T, offset, f=tinyreason.causal_mask: (
        queries.append(T), f(real, T, offset))[1])
    greedy(model, tok, questions(tok, 1), 3)
    assert queries == [1, 1]  # the two decoding steps; the prefill used SDPA's causal kernels


def test_compacting_and_appending_keep_every_row_s_own_keys_in_order(tiny):
    model, tok = tiny
    prompts = questions(tok, 3)

    def cached(cache, row):  # a row's real keys of layer 0, in column order
        return cache.k[0, row, :, :cache.len][:, cache.mask[row, :cache.len]]

    _, a = prefill(model, prompts[:2], 1, tok.pad_id)
    _, b = prefill(model, prompts[2:], 1, tok.pad_id)
    cache = KVCache(model.config, 3, 2 * a.len + b.len, torch.float32, "cpu")
    cache.batch = 0
    cache.append(a)
    cache.keep(torch.tensor([1]))  # the first row finished
    cache.shift(b.len)  # as if it had decoded on
    cache.compact()
    cache.append(b)
    for row, (src, i) in enumerate([(a, 1), (b, 0)]):
        torch.testing.assert_close(cached(cache, row), cached(src, i), rtol=0, atol=0)
    assert cache.mask[:2, :cache.len].any(0)[0], "compact leaves no leading column unused by every row"


def test_keep_gives_each_slot_the_row_it_names(tiny):
    model, tok = tiny
    _, cache = prefill(model, questions(tok, 4), 1, tok.pad_id)
    before = {name: getattr(cache, name).clone() for name in ("k", "v", "ids", "mask", "next_pos")}
    cache.keep(torch.tensor([0, 3, 2]))  # row 1 finished; the others in any order
    assert cache.batch == 3
    for slot, row in enumerate([0, 3, 2]):
        for name, t in before.items():
            dim = 1 if name in ("k", "v") else 0  # k, v: (L, slots, ...); the rest (slots, ...)
            torch.testing.assert_close(getattr(cache, name).select(dim, slot), t.select(dim, row), rtol=0, atol=0)


@pytest.mark.parametrize("which", EVERY_ARCHITECTURE)
def test_greedy_matches_transformers_generate(which, request):
    path = request.getfixturevalue(which)
    model, tok = Decoder.from_pretrained(path, dtype=torch.float32), Tokenizer.from_pretrained(path)
    prompts = questions(tok, 3)
    ids, mask = left_pad(prompts, tok.pad_id)
    out = hf_model(path).generate(ids, attention_mask=mask.long(), max_new_tokens=16, do_sample=False,
                                  eos_token_id=tok.stop_ids, pad_token_id=tok.pad_id)
    ref = [[t for t in row[ids.shape[1]:].tolist()] for row in out]
    ref = [r[:next((i + 1 for i, t in enumerate(r) if t in tok.stop_ids), len(r))] for r in ref]
    assert greedy(model, tok, prompts, 16) == ref  # a row that stopped ends with its stop token


def test_on_token_streams_every_new_token_in_order(tiny):
    model, tok = tiny
    prompts = questions(tok, 2)
    seen = [[], []]
    out = greedy(model, tok, prompts, 10, on_token=lambda row, t: seen[row].append(t))
    assert seen == [row[:-1] if row[-1] in tok.stop_ids else row for row in out]  # not the stop


def test_sampling_is_seeded_and_top_p_near_zero_is_greedy(tiny):
    model, tok = tiny
    prompts = questions(tok, 2)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(greedy(model, tok, prompts, 10, temperature=1.0))
    assert runs[0] == runs[1]
    assert greedy(model, tok, prompts, 10, temperature=1.0, top_p=1e-6) == greedy(model, tok, prompts, 10)
    logits = torch.tensor([[0.0, 3.0, 1.0]])
    assert sample(logits, 0.0, 1.0).item() == 1


def test_sampling_at_temperature_half_draws_from_softmax_of_twice_the_logits():
    torch.manual_seed(0)
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0])
    draws = sample(logits.expand(20_000, 4), temperature=0.5, top_p=1.0)
    freq = torch.bincount(draws, minlength=4) / len(draws)
    # softmax(z / 0.5) is [0.002, 0.016, 0.117, 0.865]; at T = 1 it would be [0.032, 0.087, 0.237, 0.644].
    torch.testing.assert_close(freq, torch.softmax(logits / 0.5, -1), atol=0.01, rtol=0)


def test_sampling_never_draws_a_token_of_zero_probability():
    torch.manual_seed(0)
    logits = torch.tensor([-float("inf"), 0.0, -float("inf"), 0.0, -1e4])  # exp(-1e4) underflows to exactly 0
    draws = sample(logits.expand(50_000, 5), temperature=1.0, top_p=1.0)
    assert set(draws.tolist()) == {1, 3}
    nucleus = set(sample(logits.expand(5_000, 5), temperature=1.0, top_p=0.4).tolist())  # one of the two halves
    assert nucleus in ({1}, {3})


@pytest.mark.parametrize("messages", [
    [{"role": "system", "content": "You are a helpful assistant that solves math problems step-by-step."},
     {"role": "user", "content": "What is 6 × 7?"}],
    [{"role": "user", "content": "No system turn: Qwen adds its own."}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
     {"role": "assistant", "content": "<think>\n1+1=2\n</think>\n\n**Final Answer:** 2"}, {"role": "user", "content": "Q2"}],
])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_format_equals_the_qwen25_template(tiny_checkpoint, messages, add_generation_prompt):
    from transformers import AutoTokenizer
    ref = AutoTokenizer.from_pretrained(tiny_checkpoint).apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    ref = ref["input_ids"] if hasattr(ref, "keys") else ref
    assert Tokenizer.from_pretrained(tiny_checkpoint).apply_chat(messages, add_generation_prompt) == list(ref)


def test_decode_inverts_encode_for_non_ascii(tiny):
    _, tok = tiny
    text = "It costs €5 – that’s 数学 ✓"
    assert tok.decode(tok.encode(text)) == text


def test_sharded_checkpoint_loads(tmp_path, tokenizer_dir, tiny_checkpoint):
    hf_model(tiny_checkpoint).save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = Decoder.from_pretrained(tmp_path, dtype=torch.float32, device="cpu")
    ref = Decoder.from_pretrained(tiny_checkpoint, dtype=torch.float32, device="cpu")
    ids = torch.randint(0, ref.config.vocab_size, (1, 9))
    assert torch.equal(ours(ids), ref(ids))


def edit_tensors(folder, fn):
    from safetensors.torch import load_file, save_file
    tensors = load_file(folder / "model.safetensors")
    fn(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def config_with(tmp_path, tiny_checkpoint, **changes):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**json.loads((tiny_checkpoint / "config.json").read_text()), **changes}))
    return path


@pytest.mark.parametrize("changes, message", [
    ({"model_type": "mistral"}, "model_type 'mistral' is not supported, TinyReason implements qwen2, llama, phi"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling 'yarn' is not supported"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope scaling 'linear' is not supported"),  # older key
    ({"use_sliding_window": True, "sliding_window": 32}, "use_sliding_window: true is not supported"),
    ({"model_type": "llama", "rope_scaling": {"rope_type": "yarn"}}, "rope scaling 'yarn' is not supported by TinyReason's llama"),
    ({"model_type": "llama", "attention_bias": True}, "attention_bias: true is not supported"),
    ({"model_type": "llama", "hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"model_type": "phi", "hidden_act": "gelu_new", "qk_layernorm": True}, "qk_layernorm: true is not supported by TinyReason's phi"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope scaling 'llama3' is not supported by TinyReason's qwen2"),
])
def test_configs_this_decoder_does_not_implement_are_refused_by_name(tmp_path, tiny_checkpoint, changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Config.from_json(config_with(tmp_path, tiny_checkpoint, **changes))


def test_a_sliding_window_size_that_is_not_used_and_default_rope_load(tmp_path, tiny_checkpoint):
    """Qwen2 configs carry sliding_window with use_sliding_window false; rope_scaling may name the default."""
    path = config_with(tmp_path, tiny_checkpoint, use_sliding_window=False, sliding_window=4096,
                       rope_scaling={"rope_type": "default"})
    assert Config.from_json(path) == Config.from_json(tiny_checkpoint / "config.json")


PHI = {"model_type": "phi", "hidden_act": "gelu_new"}  # 4 heads of 16 dims


@pytest.mark.parametrize("changes, message", [
    ({"num_attention_heads": 0}, "num_attention_heads is 0, expected a positive integer"),
    ({"hidden_size": 64.0}, "hidden_size is 64.0, expected a positive integer"),
    ({"hidden_size": "64"}, "hidden_size is '64', expected a positive integer"),
    ({"num_hidden_layers": True}, "num_hidden_layers is True, expected a positive integer"),
    ({"vocab_size": None}, "missing vocab_size"),  # null is unset
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps is nan, expected a positive number"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": "1e6"}}, "rope_theta is '1e6', expected a positive number"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings is 'false', expected true or false"),
    ({"rope_scaling": []}, "rope_scaling is [], expected a JSON object"),
    ({"model_type": ["qwen2"]}, "model_type ['qwen2'] is not supported"),
    ({"num_key_value_heads": 3}, "num_key_value_heads 3 does not divide num_attention_heads 4"),
    ({**PHI, "partial_rotary_factor": 1.5}, "partial_rotary_factor is 1.5, expected a number in (0, 1]"),
    ({**PHI, "partial_rotary_factor": 0.3125}, "5 dims of each head to rotate, expected a positive even number"),
    ({"model_type": "llama", "rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
     "missing low_freq_factor, high_freq_factor, original_max_position_embeddings"),
])
def test_a_config_field_of_a_wrong_type_or_range_is_refused_by_name(tmp_path, tiny_checkpoint, changes, message):
    path = config_with(tmp_path, tiny_checkpoint, **changes)
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: {re.escape(message)}"):
        Config.from_json(path)


@pytest.mark.parametrize("text, message", [("[]", "not a JSON object"), ('{"model_type": ', "not JSON")])
def test_a_config_that_is_not_a_json_object_is_refused_by_name(tmp_path, text, message):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match=f"config.json: {message}"):
        Config.from_json(tmp_path / "config.json")


@pytest.mark.parametrize("changes", [{"num_hidden_layers": 3}, {"num_hidden_layers": 100_000}, {"vocab_size": 2 ** 60}],
                         ids=["one layer more", "100,000 layers: minutes to build", "too big to build on meta"])
def test_a_config_implying_more_than_the_checkpoint_holds_is_refused_before_the_model_is_built(
        tmp_path, tiny_checkpoint, changes):
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "bigger")
    config_with(folder, tiny_checkpoint, **changes)
    with pytest.raises(ValueError, match=r"bigger: config.json implies [\d,]+ parameters, its tensors hold [\d,]+$"):
        Decoder.from_pretrained(folder)


@pytest.mark.parametrize("which", EVERY_ARCHITECTURE)
def test_the_parameter_count_checked_before_building_is_the_built_models(which, request):
    config = Config.from_json(request.getfixturevalue(which) / "config.json")
    with torch.device("meta"):
        assert weights.parameter_count(config) == sum(p.numel() for p in Decoder(config).parameters())


@pytest.mark.parametrize("damage, message", [
    (lambda t: t.update({"model.layers.1.mlp.extra.weight": t.pop("model.layers.1.mlp.up_proj.weight")}),
     r"missing \['model.layers.1.mlp.up_proj.weight'\], unexpected \['model.layers.1.mlp.extra.weight'\]"),
    (lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(2)}), r"unexpected \['model.layers.0.extra.weight'\]"),
    (lambda t: t.update({"model.norm.weight": torch.zeros(8, 8)}), r"model.norm.weight has shape \(8, 8\)"),
    (lambda t: t.update({"model.norm.weight": torch.zeros(64, dtype=torch.int8)}), r"model.norm.weight is I8"),
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), r"config.json implies [\d,]+ parameters, its tensors hold"),
])
def test_bad_tensors_are_named(tmp_path, tiny_checkpoint, damage, message):
    bad = copy_checkpoint(tiny_checkpoint, tmp_path / "bad")
    edit_tensors(bad, damage)
    with pytest.raises(ValueError, match=message):
        Decoder.from_pretrained(bad, dtype=torch.float32, device="cpu")


def test_missing_folder_and_files_are_named(tmp_path, tiny_checkpoint):
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        load.load_base(tmp_path / "nowhere")
    bad = copy_checkpoint(tiny_checkpoint, tmp_path / "noweights")
    (bad / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load.load_base(bad)
    (bad / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load.load_base(bad)


def offline(*args, **kwargs):
    raise ConnectionError("no network")


def test_hub_download_failure_tells_the_user_to_pass_a_local_folder(monkeypatch):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(OSError, match="--model /path/to/folder"):
        resolve_checkpoint("Qwen/Qwen2.5-1.5B-Instruct")


@pytest.mark.parametrize("name", ["outputs/mdl", "./mdl", "/nowhere/mdl", "~/mdl-nowhere"])
def test_a_path_that_looks_local_is_not_sent_to_the_hub(tmp_path, monkeypatch, name):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        resolve_checkpoint(name)


@pytest.mark.real
def test_real_checkpoint_matches_transformers(real_model_dir):
    """bf16, as it runs: logits equal transformers' and greedy continuations are identical for 3 GSM8K prompts."""
    model = Decoder.from_pretrained(real_model_dir, dtype=torch.bfloat16, device="cpu")
    tok = Tokenizer.from_pretrained(real_model_dir)
    ref = hf_model(real_model_dir, torch.bfloat16)
    prompts = questions(tok, 3)
    with torch.no_grad():
        for p in prompts:
            ours, theirs = logits(model, torch.tensor([p])).float(), ref(torch.tensor([p])).logits.float()
            assert (ours - theirs).abs().max() < 1e-2
            assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    for p, ours in zip(prompts, [greedy(model, tok, [p], 32)[0] for p in prompts]):
        out = ref.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False)[0, len(p):].tolist()
        assert ours == out[:len(ours)] and (len(ours) == 32 or ours[-1] in tok.stop_ids)
