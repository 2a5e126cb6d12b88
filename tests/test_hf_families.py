"""The checkpoints users bring: Llama 3.x (RoPE scaling), Qwen2, Qwen3, Mistral (sliding window) and GPT-NeoX (Pythia)
in and out of Hugging Face format.

Each family is built in-process from random init with small odd shapes (6 query heads over 2 or 3 key/value heads,
tied and untied heads) and compared with transformers: logits within 1e-4 (fp32) both ways, greedy generation equal
where every choice is clear (near_ties.py), sharded safetensors both ways and bf16 loading.
"""

from __future__ import annotations

import json

import pytest
import torch

from near_ties import assert_clear_greedy
from parity_helpers import perturb

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402

from lmforge.infer.batched import generate_batch  # noqa: E402
from lmforge.infer.generate import SamplingConfig, generate_ids  # noqa: E402
from lmforge.model.decoder import DecoderLM  # noqa: E402
from lmforge.model.hf import export_hf, load_hf  # noqa: E402

ATOL = 1e-4
VOCAB, T = 301, 24
LLAMA_SHAPE = dict(vocab_size=VOCAB, hidden_size=96, intermediate_size=72, num_hidden_layers=2, num_attention_heads=6,
                   num_key_value_heads=2, max_position_embeddings=32)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}  # head dim 16: kept, blended, scaled

# case -> (transformers config class, its kwargs, the ModelConfig fields the import must give)
CASES = {
    "llama3": ("LlamaConfig", dict(LLAMA_SHAPE, rope_parameters=LLAMA3_ROPE),
               dict(family="llama", tie_embeddings=False)),
    "llama-dynamic": ("LlamaConfig", dict(LLAMA_SHAPE, max_position_embeddings=16,
                                          rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                           "rope_theta": 10000.0}), {}),
    "qwen2-tied-linear": ("Qwen2Config", dict(LLAMA_SHAPE, tie_word_embeddings=True,
                                              rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                               "rope_theta": 500000.0}),
                          dict(family="qwen2", qkv_bias=True, attn_bias=False, tie_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(LLAMA_SHAPE, num_key_value_heads=3, head_dim=12),
              dict(family="qwen3", qk_norm=True, head_size=12)),
    "mistral-window": ("MistralConfig", dict(LLAMA_SHAPE, sliding_window=5), dict(family="mistral", sliding_window=5)),
    "neox": ("GPTNeoXConfig", dict(vocab_size=VOCAB, hidden_size=96, intermediate_size=72, num_hidden_layers=2,
                                   num_attention_heads=6, max_position_embeddings=32, rotary_pct=0.25),
             dict(family="gpt_neox", parallel_residual=True, rope_fraction=0.25)),
    "neox-sequential-tied": ("GPTNeoXConfig", dict(vocab_size=VOCAB, hidden_size=96, intermediate_size=72,
                                                   num_hidden_layers=2, num_attention_heads=6,
                                                   max_position_embeddings=32, use_parallel_residual=False,
                                                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                    "partial_rotary_factor": 0.5},
                                                   tie_word_embeddings=True),
                             dict(parallel_residual=False, rope_fraction=0.5, tie_embeddings=True)),
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _hf_model(case: str):
    config_class, kwargs, _ = CASES[case]
    config = getattr(transformers, config_class)(**kwargs)
    model = AutoModelForCausalLM.from_config(config).eval()
    perturb(model, 0.2)
    return model


def _ids(batch: int = 2, length: int = T) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(2))


def _assert_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    diff = (ours - theirs).abs().max().item()
    assert diff <= ATOL, f"max abs logit diff {diff:.2e} > {ATOL}"


def _hf_greedy(hf_model, prompt: list[int], n: int) -> list[int]:
    out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                            eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_dynamic_rope_in_a_padded_batch_follows_the_furthest_real_position(tmp_path):
    """Past the original context, dynamic NTK's base depends on the furthest position a forward reaches: in a
    left-padded batch that is the longest row's real length (transformers reads it off position_ids), not the
    padded width."""
    hf_model = _hf_model("llama-dynamic")
    hf_model.save_pretrained(tmp_path)
    model, _ = load_hf(tmp_path)
    mask = torch.ones(2, T, dtype=torch.long)
    mask[0, :4], mask[1, :2] = 0, 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    ids = _ids()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
        theirs = hf_model(ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    _assert_close(ours[real], theirs[real])


@pytest.mark.parametrize("case", list(CASES))
def test_family_round_trip_matches_transformers(case, tmp_path):
    """HF -> lmforge: logits within 1e-4 and greedy tokens equal; lmforge -> HF (another perturbation): the family's
    own class loads every weight and gives the same logits; the exported config reads back to the same ModelConfig."""
    hf_model = _hf_model(case)
    hf_model.save_pretrained(tmp_path / "hf")
    model, _ = load_hf(tmp_path / "hf")
    for key, value in CASES[case][2].items():
        assert getattr(model.cfg, key) == value, key
    ids = _ids()
    with torch.no_grad():
        _assert_close(model(ids), hf_model(ids).logits)
    prompt = _ids(1, 9)[0].tolist()
    n = min(10, model.cfg.max_seq_len - len(prompt))  # lmforge generates within max_seq_len (16 for llama-dynamic)
    new = generate_ids(model, prompt, SamplingConfig(max_new_tokens=n, temperature=0.0))
    assert_clear_greedy(model, prompt, new)
    assert new == _hf_greedy(hf_model, prompt, n)

    perturb(model, 0.1)
    export_hf(model, None, tmp_path / "out")
    back, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert type(back).__name__ == type(hf_model).__name__
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        _assert_close(back.eval()(ids).logits, model(ids))
    assert load_hf(tmp_path / "out")[0].cfg == model.cfg


def test_llama3_config_as_transformers_4_wrote_it(tmp_path):
    """A hand-written 4.x config.json (top-level rope_theta, rope_scaling with `type`) loads with transformers' logits;
    the export writes rope_parameters, which the installed transformers reads."""
    hf_model = _hf_model("llama3")
    hf_model.save_pretrained(tmp_path)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB, "hidden_size": 96,
              "intermediate_size": 72, "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 2,
              "max_position_embeddings": 32, "rms_norm_eps": 1e-6, "hidden_act": "silu", "rope_theta": 10000.0,
              "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 32},
              "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.45.0"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    model, _ = load_hf(tmp_path)
    assert model.cfg.rope_scaling.type == "llama3" and model.cfg.rope_scaling.original_max_len == 32
    ids = _ids()
    with torch.no_grad():
        _assert_close(model(ids), hf_model(ids).logits)
    export_hf(model, None, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["rope_parameters"] == {**LLAMA3_ROPE}


def test_sliding_window_holds_in_cache_and_batched_generation(tmp_path):
    """Mistral with a window of 5 on sequences of 24: token-by-token decoding with the KV cache gives the full
    forward's logits, and batched generation (left-padded prompts of different lengths in one KV cache) gives each
    prompt's greedy tokens as transformers does alone."""
    hf_model = _hf_model("mistral-window")
    hf_model.save_pretrained(tmp_path)
    model, _ = load_hf(tmp_path)
    ids = _ids()
    with torch.no_grad():
        full = hf_model(ids).logits
        cache = model.new_cache(batch_size=2, max_len=T)
        _assert_close(model(ids[:, :7], cache=cache), full[:, :7])
        for t in range(7, T):
            _assert_close(model(ids[:, t:t + 1], cache=cache), full[:, t:t + 1])
    prompts = [_ids(1, n)[0].tolist() for n in (3, 11, 7)]
    batch = generate_batch(model, prompts, SamplingConfig(max_new_tokens=12, temperature=0.0))
    for prompt, new in zip(prompts, batch, strict=True):
        assert_clear_greedy(model, prompt, new)
        assert new == _hf_greedy(hf_model, prompt, 12)


def test_sharded_safetensors_both_ways(tmp_path):
    """save_pretrained's shards load; export_hf writes shards with an index that transformers reads."""
    import lmforge

    hf_model = _hf_model("neox")
    hf_model.save_pretrained(tmp_path / "hf", max_shard_size="60KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    model, _ = load_hf(tmp_path / "hf")
    ids = _ids()
    with torch.no_grad():
        _assert_close(model(ids), hf_model(ids).logits)
    lmforge.export_hf(model, None, tmp_path / "out", max_shard_bytes=60_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (tmp_path / "out" / "model.safetensors").exists()
    with torch.no_grad():
        _assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()(ids).logits, model(ids))


def test_bf16_checkpoint_loads_as_bf16_without_a_float32_copy(tmp_path):
    """lmforge.load(dtype=bfloat16) of a bf16 checkpoint: every parameter is bf16 (the tensors read, held as they are:
    test_decoder_holding_keeps_the_given_tensors), the tie kept, and the logits are transformers' bf16 logits up to
    bf16 rounding."""
    import lmforge

    hf_model = _hf_model("qwen2-tied-linear").to(torch.bfloat16)
    hf_model.save_pretrained(tmp_path)
    model, _ = lmforge.load(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.lm_head.weight is model.tok_emb.weight
    ids = _ids()
    with torch.no_grad():
        ours, theirs = model(ids).float(), hf_model(ids).logits.float()
    assert (ours - theirs).abs().max() <= 0.05 * theirs.abs().max()


def _refused_by_cli(path, capsys) -> str:
    """`lmforge generate` on `path`: exit 2 and one line on stderr, which is returned."""
    from lmforge.cli import main

    capsys.readouterr()  # what save_pretrained printed
    assert main(["generate", str(path), "--prompt", "x", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmforge: error: ") and err.count("\n") == 1, err
    return err


def test_unsupported_architecture_is_one_line_naming_the_supported(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "falcon", "hidden_size": 64}))
    err = _refused_by_cli(tmp_path, capsys)
    assert "'falcon'" in err and "gpt2, llama, mistral, qwen2, qwen3, gpt_neox" in err


def test_unsupported_rope_type_is_one_line_naming_the_supported(tmp_path, capsys):
    _hf_model("llama3").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 1e4, "factor": 2.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert "rope_type='longrope' is not supported; supported: default, linear, dynamic, llama3" in \
        _refused_by_cli(tmp_path, capsys)


def test_sliding_window_larger_than_the_context_is_refused(tmp_path, capsys):
    _hf_model("mistral-window").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "sliding_window": 64}))
    assert "sliding_window=64 is larger than the context max_seq_len=32" in _refused_by_cli(tmp_path, capsys)
    with pytest.raises(ValueError, match="sliding_window=33 is larger than the context max_seq_len=32"):
        type(_small_cfg()).model_validate({**_small_cfg().model_dump(), "sliding_window": 33})


@pytest.mark.parametrize(("case", "tensor", "shape"), [
    ("qwen3", "model.layers.1.self_attn.q_norm.weight", (16,)),
    ("neox", "gpt_neox.layers.0.attention.query_key_value.weight", (280, 96)),
    ("neox", "gpt_neox.layers.1.attention.query_key_value.bias", (144,)),
])
def test_weights_disagreeing_with_config_name_the_tensor(case, tensor, shape, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    _hf_model(case).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights[tensor] = torch.zeros(shape)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert tensor in _refused_by_cli(tmp_path, capsys)


def test_decoder_holding_keeps_the_given_tensors():
    """DecoderLM.holding builds no weights of its own: its parameters are the state dict's tensors."""
    cfg = _small_cfg()
    source = DecoderLM(cfg)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    model = DecoderLM.holding(cfg, state)
    assert model.blocks[0].attn.q.weight.data_ptr() == state["blocks.0.attn.q.weight"].data_ptr()
    with torch.no_grad():
        _assert_close(model(_ids()), source(_ids()))


def _small_cfg():
    from lmforge.config import ModelConfig

    return ModelConfig(family="qwen3", vocab_size=VOCAB, max_seq_len=32, n_layer=1, n_head=6, n_kv_head=2,
                       d_model=96, head_size=12)


@pytest.mark.parametrize(("case", "method"), [("neox", "lora"), ("neox", "dora"), ("qwen2-tied-linear", "lora")])
def test_lora_matches_peft_both_ways(case, method, tmp_path):
    """lmforge's LoRA on q, k, v (and the rest) exports as peft's: on GPT-NeoX one exact rank-3r LoRA on the fused
    query_key_value, B's rows interleaved per head; peft's own rank-r adapter on query_key_value (and dense) loads onto
    lmforge's separate q, k, v (the same A, each its rows of B) with peft's logits. Qwen2 (q/k/v biases, tied head)
    stands for the Llama-like families, which name their projections as Llama does."""
    peft = pytest.importorskip("peft")
    import lmforge
    from lmforge.config import PeftConfig
    from lmforge.peft.export import export_peft
    from lmforge.peft.lora import apply_lora, lora_layers

    _hf_model(case).save_pretrained(tmp_path / "hf")
    model, _ = load_hf(tmp_path / "hf")
    cfg = PeftConfig(r=4, alpha=8, method=method, targets=["attn", "mlp"])
    apply_lora(model, cfg)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B["default"].normal_(0, 0.1)
        ids = _ids()
        ours = model(ids)
    export_peft(model, None, tmp_path / "ours", cfg, base_name=str(tmp_path / "hf"))
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        _assert_close(peft.PeftModel.from_pretrained(base, tmp_path / "ours").eval()(ids).logits, ours)

    targets = ["query_key_value", "dense"] if case == "neox" else ["q_proj", "k_proj", "v_proj", "down_proj"]
    theirs = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "hf"),
                                 peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=method == "dora"))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                p.add_(torch.randn_like(p) * 0.1)
    theirs.save_pretrained(tmp_path / "theirs")
    back, _ = lmforge.load(tmp_path / "theirs", base=tmp_path / "hf")
    with torch.no_grad():
        _assert_close(back(ids), theirs.eval()(ids).logits)


def test_family_keys_are_validated():
    from pydantic import ValidationError

    from lmforge.config import ModelConfig

    qwen3 = ModelConfig(family="qwen3", d_model=100, n_head=4, head_size=16)  # heads need not split d_model
    assert qwen3.head_dim == 16 and qwen3.qk_norm and not qwen3.has_qkv_bias
    assert ModelConfig(family="qwen2").has_qkv_bias and not ModelConfig(family="qwen2").attn_bias
    with pytest.raises(ValidationError, match=r"even number \(>= 2\) of rotated dims"):
        ModelConfig(family="gpt_neox", d_model=32, n_head=4, rope_fraction=0.1)
    with pytest.raises(ValidationError, match="original_max_len"):
        ModelConfig(family="llama", rope_scaling={"type": "llama3", "factor": 8.0})
    with pytest.raises(ValidationError, match="divisible by n_head=3 \\(or set head_size\\)"):
        ModelConfig(family="llama", d_model=64, n_head=3)


def test_lmforge_checkpoint_keeps_the_family_keys(tmp_path):
    """An imported Llama 3 (nested rope_scaling) saved as an lmforge checkpoint loads back with the same config
    and logits: what fine-tuning from an HF base writes."""
    import lmforge

    _hf_model("llama3").save_pretrained(tmp_path / "hf")
    model, _ = load_hf(tmp_path / "hf")
    lmforge.save(model, None, tmp_path / "ckpt")
    back, _ = lmforge.load(tmp_path / "ckpt")
    assert back.cfg == model.cfg and back.cfg.rope_scaling.type == "llama3"
    with torch.no_grad():
        _assert_close(back(_ids()), model(_ids()))
