"""Llama and Phi on the decoder Qwen2 runs on: what each switch computes, each checkpoint's chat format, and every
recipe's loop on each. Logits, generation, NF4, PEFT and merging are tested for every architecture beside Qwen2's
own tests (test_model.py, test_quant.py, test_lora.py).

    python -m pytest tests/test_architectures.py -q
"""
import json
import subprocess
import sys

import pytest
import torch
from conftest import LLAMA3_SPECIALS, ROOT, _train_tokenizer, gsm8k_records, make_checkpoint, write_jsonl

import data
import lora
import rl
import train
from tinyreason import ARCHITECTURES, Config, Decoder, apply_rope, inv_freq
from tokenizer import Tokenizer

INFUSED_SYSTEM = data.ANSWER_TAGS_SYSTEM


def test_llama3_rope_scaling_gives_the_frequencies_transformers_computes(tiny_llama_checkpoint):
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    config = Config.from_json(tiny_llama_checkpoint / "config.json")
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](AutoConfig.from_pretrained(tiny_llama_checkpoint), "cpu")
    unscaled = inv_freq(Config(**{**vars(config), "llama3_rope": ()}))
    assert torch.equal(inv_freq(config), theirs)
    kept, divided = inv_freq(config) == unscaled, torch.isclose(inv_freq(config), unscaled / 8)
    assert kept.any() and divided.any() and (~kept & ~divided).any()  # short, long and blended wavelengths


def test_phi_rotates_only_the_leading_partial_rotary_factor_of_each_head(tiny_phi_checkpoint):
    config = Config.from_json(tiny_phi_checkpoint / "config.json")
    assert (config.head_dim, config.rotary_dim) == (16, 6)  # int(16 * 0.4)
    x, positions = torch.randn(1, 2, 5, 16), torch.arange(5)[None]
    cos, sin = (torch.cat([f, f], -1)[:, None] for f in (positions[..., None] * inv_freq(config),) * 2)
    y = apply_rope(x, cos.cos(), sin.sin())
    assert torch.equal(y[..., 6:], x[..., 6:]) and not torch.allclose(y[..., :6], x[..., :6])


def test_phi_checkpoints_keep_their_own_names():
    config = Config(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=2, head_dim=4, rotary_dim=2, **ARCHITECTURES["phi"])
    with torch.device("meta"):
        names = set(dict(Decoder(config).named_parameters()))
    assert {"model.layers.0.self_attn.dense.bias", "model.layers.0.mlp.fc1.weight", "model.final_layernorm.bias",
            "lm_head.bias"} <= names
    assert not any("post_attention_layernorm" in n or "o_proj" in n for n in names)


def hf_chat(folder, messages, add_generation_prompt):
    from transformers import AutoTokenizer
    ids = AutoTokenizer.from_pretrained(folder).apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


CONVERSATIONS = [
    [{"role": "system", "content": "  Solve it.\n"}, {"role": "user", "content": "What is 6 × 7? "}],
    [{"role": "user", "content": "No system turn."}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
     {"role": "assistant", "content": "<think>\n1+1=2\n</think>\n\n**Final Answer:** 2"}, {"role": "user", "content": "Q2"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_llama3_chat_format_equals_the_llama32_template_with_todays_date(llama3_tokenizer_dir, messages,
                                                                       add_generation_prompt):
    ours = Tokenizer.from_pretrained(llama3_tokenizer_dir).apply_chat(messages, add_generation_prompt)
    assert ours == hf_chat(llama3_tokenizer_dir, messages, add_generation_prompt)


LLAMA30_TEMPLATE = (  # Llama-3.0: no system turn of its own, no dates
    "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
SMOLLM2_TEMPLATE = (  # ChatML with its own default system turn, newlines written as they are
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.mark.parametrize("template, specials", [(LLAMA30_TEMPLATE, LLAMA3_SPECIALS),
                                                (SMOLLM2_TEMPLATE, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])],
                         ids=["llama-3.0", "smollm2"])
def test_other_templates_of_the_two_formats_are_followed_token_for_token(tmp_path, template, specials):
    _train_tokenizer(tmp_path, specials, {"bos_token": specials[0], "eos_token": specials[-1],
                                          "chat_template": template})
    for messages in CONVERSATIONS:
        assert Tokenizer.from_pretrained(tmp_path).apply_chat(messages) == hf_chat(tmp_path, messages, True)


def test_phi2_without_a_template_gets_the_infused_cards_plain_lines(plain_tokenizer_dir):
    tok = Tokenizer.from_pretrained(plain_tokenizer_dir)
    card = f"<|system|>\n{INFUSED_SYSTEM}\n<|user|>\nWhat is 6 × 7?\n<|assistant|>\n"
    assert tok.apply_chat(data.prompt_messages("What is 6 × 7?", INFUSED_SYSTEM)) == tok.encode(card)


def test_an_unknown_chat_template_is_refused_by_name(tmp_path):
    _train_tokenizer(tmp_path, ["</s>"], {"chat_template": "{% for m in messages %}[INST] {{ m['content'] }}{% endfor %}"})
    with pytest.raises(ValueError, match="chat template is neither ChatML nor Llama-3's"):
        Tokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize("fixture, end_of_turn", [("tiny_checkpoint", "<|im_end|>"),
                                                  ("tiny_llama_checkpoint", "<|eot_id|>"),
                                                  ("tiny_phi_checkpoint", "<|endoftext|>")])
def test_the_loss_ends_on_the_token_that_closes_the_formats_assistant_turn(request, fixture, end_of_turn):
    tok = Tokenizer.from_pretrained(request.getfixturevalue(fixture))
    example = data.build_example(tok, gsm8k_records(1)[0])
    assert example["labels"][-1] == tok.eot_id == tok.tok.token_to_id(end_of_turn)
    assert tok.eot_id in tok.stop_ids


def test_stop_tokens_come_from_the_checkpoints_configs(tmp_path, llama3_tokenizer_dir):
    checkpoint = make_checkpoint(tmp_path, llama3_tokenizer_dir, tie=True, model_type="llama")
    end_of_text = Tokenizer.from_pretrained(checkpoint).tok.token_to_id("<|end_of_text|>")
    (checkpoint / "generation_config.json").write_text(json.dumps({"eos_token_id": [end_of_text]}))
    tok = Tokenizer.from_pretrained(checkpoint)
    assert tok.stop_ids == [tok.eot_id, end_of_text]


@pytest.fixture(scope="module")
def gsm8k_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "gsm8k.jsonl"
    write_jsonl(path, gsm8k_records(24))
    return path


@pytest.mark.parametrize("fixture, targets", [("tiny_llama_checkpoint", ()),
                                              ("tiny_phi_checkpoint", ("q_proj", "k_proj", "v_proj", "dense"))])
def test_one_sft_step_and_one_rl_step_run_and_save_the_architectures_adapter(request, gsm8k_file, tmp_path, fixture,
                                                                            targets):
    checkpoint = request.getfixturevalue(fixture)
    flags = ["--model", str(checkpoint), "--data", str(gsm8k_file), "--quantize", "none", "--dtype", "fp32",
             "--lora_r", "4", "--lora_alpha", "8", "--max_steps", "1", "--warmup_steps", "0"]
    flags += ["--target_modules", *targets] if targets else []
    sft = train.main([*flags, "--output_dir", str(tmp_path / "sft"), "--adapter_path", str(tmp_path / "sft_adapter"),
                      "--num_samples", "8", "--validation_split", "0.25", "--batch_size", "2",
                      "--gradient_accumulation_steps", "1"])
    assert torch.isfinite(torch.tensor(sft["loss"][1]))
    saved = lora.read_adapter_config(tmp_path / "sft_adapter")["target_modules"]
    assert sorted(saved) == sorted(targets or Config.from_json(checkpoint / "config.json").projections)
    state = rl.main([*flags, "--adapter", str(tmp_path / "sft_adapter"), "--output_dir", str(tmp_path / "rl"),
                     "--adapter_path", str(tmp_path / "rl_adapter"), "--prompts_per_step", "2", "--group_size", "2",
                     "--max_new_tokens", "6", "--eval_samples", "2"])
    assert 1 in state["reward"] and (tmp_path / "rl_adapter" / "adapter_model.safetensors").is_file()


def test_target_modules_the_architecture_lacks_are_refused_before_any_weight_loads(tiny_phi_checkpoint, gsm8k_file,
                                                                                   tmp_path, monkeypatch):
    monkeypatch.setattr(Decoder, "from_pretrained", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(ValueError, match=r"target modules \['o_proj'\] not found in the model \(its projections: "
                                         r"\['q_proj', 'k_proj', 'v_proj', 'dense', 'fc1', 'fc2'\]\)"):
        train.main(["--model", str(tiny_phi_checkpoint), "--data", str(gsm8k_file), "--output_dir", str(tmp_path),
                    "--target_modules", "q_proj", "o_proj"])


@pytest.mark.real
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_real_checkpoints_prompts_equal_its_own_chat_template(real_model_dir, add_generation_prompt):
    tok = Tokenizer.from_pretrained(real_model_dir)
    for messages in CONVERSATIONS:
        assert tok.apply_chat(messages, add_generation_prompt) == hf_chat(real_model_dir, messages,
                                                                          add_generation_prompt)


@pytest.mark.real
def test_real_checkpoint_trains_two_steps_then_evaluates(real_model_dir, gsm8k_file, tmp_path):
    train.main(["--model", str(real_model_dir), "--data", str(gsm8k_file), "--output_dir", str(tmp_path / "run"),
                "--adapter_path", str(tmp_path / "adapter"), "--max_steps", "2", "--warmup_steps", "1",
                "--num_samples", "8", "--validation_split", "0.25", "--batch_size", "2",
                "--gradient_accumulation_steps", "1"])
    out = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--adapter", str(tmp_path / "adapter"), "--data",
                          str(gsm8k_file), "--limit", "2", "--max_new_tokens", "16", "--out", str(tmp_path / "p.jsonl")],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 2
