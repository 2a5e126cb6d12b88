"""Hugging Face interop: lmforge and transformers agree on logits both ways.

Every model is built in-process from random init (no downloads). Parity means max abs logit
difference <= 1e-4 in fp32, eval mode, on random ids (batch 2, length 16).
"""

from __future__ import annotations

import json

import pytest
import torch

from parity_helpers import perturb

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from lmforge.config import ModelConfig  # noqa: E402
from lmforge.errors import CheckpointError, ConfigError  # noqa: E402
from lmforge.model.decoder import DecoderLM  # noqa: E402
from lmforge.model.hf import config_from_hf, config_to_hf, export_hf, is_hf_dir, load_hf  # noqa: E402
from lmforge.tokenizer import train_tokenizer  # noqa: E402

ATOL = 1e-4
VOCAB, T = 300, 16


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)



def _gpt2(**kw) -> GPT2LMHeadModel:
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=32,
                     bos_token_id=None, eos_token_id=None, **kw)
    return GPT2LMHeadModel(cfg)


def _llama(**kw) -> LlamaForCausalLM:
    kw.setdefault("num_key_value_heads", 4)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=32, **kw)
    return LlamaForCausalLM(cfg)


def _hf_dir(hf_model, tmp_path, **save_kw):
    perturb(hf_model)
    hf_model.eval().save_pretrained(tmp_path, safe_serialization=True, **save_kw)
    return tmp_path


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(2))


def _assert_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    diff = (ours - theirs).abs().max().item()
    assert diff <= ATOL, f"max abs logit diff {diff:.2e} > {ATOL}"


IMPORT_CASES = {
    "gpt2-tied": lambda: _gpt2(),
    "gpt2-untied": lambda: _gpt2(tie_word_embeddings=False),
    "gpt2-gelu": lambda: _gpt2(activation_function="gelu"),
    "llama-mha": lambda: _llama(),
    "llama-gqa": lambda: _llama(num_key_value_heads=2),
    "llama-mqa": lambda: _llama(num_key_value_heads=1),
    "llama-bias": lambda: _llama(attention_bias=True, mlp_bias=True),
    "llama-untied": lambda: _llama(tie_word_embeddings=False),
    "llama-tied": lambda: _llama(tie_word_embeddings=True),
    "llama-theta": lambda: _llama(rope_theta=500000.0),
}


@pytest.mark.parametrize("case", list(IMPORT_CASES))
def test_import_matches_transformers(case, tmp_path):
    """load_hf of a save_pretrained dir: logits within 1e-4 (fp32) of the HF model's."""
    hf_model = IMPORT_CASES[case]()
    path = _hf_dir(hf_model, tmp_path)
    assert is_hf_dir(path)
    model, tokenizer = load_hf(path)
    assert tokenizer is None and not model.training
    assert model.cfg.tie_embeddings == hf_model.config.tie_word_embeddings
    if case == "llama-theta":
        assert model.cfg.rope_theta == 500000.0
    ids = _ids()
    with torch.no_grad():
        _assert_close(model(ids), hf_model(ids).logits)


def test_import_sharded_checkpoint(tmp_path):
    """A sharded save (model.safetensors.index.json) loads with logits within 1e-4."""
    hf_model = _gpt2(tie_word_embeddings=False)
    path = _hf_dir(hf_model, tmp_path, max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").is_file()
    model, _ = load_hf(path)
    ids = _ids()
    with torch.no_grad():
        _assert_close(model(ids), hf_model(ids).logits)


def test_import_unprefixed_gpt2_with_legacy_buffers(tmp_path):
    """Original GPT-2 checkpoints: no "transformer." prefix, causal-mask buffers saved as weights."""
    hf_model = _gpt2()
    path = _hf_dir(hf_model, tmp_path)
    weights = {k.removeprefix("transformer."): v for k, v in load_file(path / "model.safetensors").items()}
    for i in range(2):
        weights[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
        weights[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    model, _ = load_hf(path)
    ids = _ids()
    with torch.no_grad():
        _assert_close(model(ids), hf_model(ids).logits)


def test_kv_cache_decoding_matches_hf_full_forward(tmp_path):
    """Imported Llama GQA: prefill + chunked + token-by-token decoding with the KV cache gives
    each position's logits within 1e-4 of HF's full forward."""
    hf_model = _llama(num_key_value_heads=2)
    model, _ = load_hf(_hf_dir(hf_model, tmp_path))
    ids = _ids()
    with torch.no_grad():
        full = hf_model(ids).logits
        cache = model.new_cache(batch_size=2, max_len=T)
        _assert_close(model(ids[:, :8], cache=cache), full[:, :8])
        _assert_close(model(ids[:, 8:11], cache=cache), full[:, 8:11])
        for t in range(11, T):
            last = model(ids[:, t:t + 1], cache=cache)
            _assert_close(last, full[:, t:t + 1])
    assert cache.length == T


EXPORT_CASES = {
    "gpt2": dict(family="gpt2"),
    "gpt2-untied-relu": dict(family="gpt2", tie_embeddings=False, activation="relu"),
    "llama-gqa": dict(family="llama", n_kv_head=2),
    "llama-tied-bias": dict(family="llama", tie_embeddings=True, attn_bias=True, mlp_bias=True,
                            rope_theta=500000.0),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_loads_in_transformers(case, tmp_path):
    """DecoderLM -> export_hf -> AutoModelForCausalLM: every weight loaded, logits within 1e-4;
    load_hf of the same dir gives the lmforge logits back."""
    cfg = ModelConfig(vocab_size=VOCAB, max_seq_len=32, n_layer=2, n_head=4, d_model=64, **EXPORT_CASES[case])
    model = DecoderLM(cfg).eval()
    perturb(model)
    export_hf(model, None, tmp_path)
    hf_model, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    back, tokenizer = load_hf(tmp_path)
    assert tokenizer is None
    ids = _ids()
    with torch.no_grad():
        ours = model(ids)
        _assert_close(ours, hf_model.eval()(ids).logits)
        _assert_close(back(ids), ours)
    resolved = dict(d_ff=cfg.ff_dim, n_kv_head=cfg.kv_heads, family=None)
    assert config_from_hf(config_to_hf(cfg)).model_copy(update=resolved) == cfg.model_copy(update=resolved)


def test_export_with_tokenizer(tmp_path):
    """The exported tokenizer loads in AutoTokenizer and encodes the same ids; config.json carries
    its bos/eos ids; the model still matches within 1e-4."""
    texts = ["the quick brown fox jumps over the lazy dog", "hello world, hello lmforge"] * 20
    tok = train_tokenizer(texts, vocab_size=400, show_progress=False)
    cfg = ModelConfig(family="llama", vocab_size=tok.vocab_size, max_seq_len=32, n_layer=1, n_head=4,
                      n_kv_head=1, d_model=64)
    model = DecoderLM(cfg).eval()
    export_hf(model, tok, tmp_path)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path)
    text = "hello quick fox, the lazy world"
    assert hf_tok.encode(text) == tok.encode(text)
    assert hf_tok.bos_token_id == tok.bos_id and hf_tok.eos_token_id == tok.eos_id
    hf_config = json.loads((tmp_path / "config.json").read_text())
    assert (hf_config["bos_token_id"], hf_config["eos_token_id"]) == (tok.bos_id, tok.eos_id)
    _, tok_back = load_hf(tmp_path)
    assert tok_back is not None and tok_back.encode(text) == tok.encode(text)
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        _assert_close(model(ids), AutoModelForCausalLM.from_pretrained(tmp_path).eval()(ids).logits)


def test_config_from_hf_legacy_rope_fields():
    """transformers 4.x configs: top-level rope_theta, rope_scaling None."""
    hf = LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4).to_dict()
    hf.pop("rope_parameters")
    hf.update(rope_theta=123.0, rope_scaling=None)
    assert config_from_hf(hf).rope_theta == 123.0


@pytest.mark.parametrize(("change", "field"), [
    ({"model_type": "bert"}, "model_type"),
    ({"hidden_act": "quick_gelu"}, "hidden_act"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}},
     "rope_type='yarn' is not supported; supported: default, linear, dynamic, llama3"),
    ({"model_type": "qwen2", "use_sliding_window": True, "max_window_layers": 1, "num_hidden_layers": 2},
     "only some layers"),
])
def test_config_from_hf_refuses_what_lmforge_cannot_honour(change, field):
    hf = {**LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4).to_dict(), **change}
    with pytest.raises(ConfigError, match=field):
        config_from_hf(hf)


def test_unsupported_model_type_and_activation(tmp_path):
    """Unsupported model_type lists the supported ones; a GPT-2 activation lmforge lacks names the field."""
    with pytest.raises(ConfigError, match=r"model_type='bert'.*gpt2, llama, mistral, qwen2, qwen3, gpt_neox"):
        config_from_hf({"model_type": "bert"})
    path = _hf_dir(_gpt2(activation_function="quick_gelu"), tmp_path)
    with pytest.raises(ConfigError, match="activation_function='quick_gelu'"):
        load_hf(path)


@pytest.mark.parametrize(("fields", "field"), [
    (dict(position="alibi"), "position"),
    (dict(norm_placement="post"), "norm_placement"),
    (dict(attn_bias=False), "attn_bias"),
    (dict(family="llama", norm="layernorm"), "norm"),
])
def test_export_refuses_what_hf_cannot_express(fields, field, tmp_path):
    cfg = ModelConfig(vocab_size=VOCAB, n_layer=1, n_head=4, d_model=64, **fields)
    with pytest.raises(ConfigError, match=field):
        export_hf(DecoderLM(cfg), None, tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_missing_and_unexpected_weights_are_named(tmp_path):
    """Strict loading: a dropped tensor and a stray one are both named in the CheckpointError."""
    path = _hf_dir(_llama(), tmp_path)
    weights = load_file(path / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    weights["model.layers.0.self_attn.extra.weight"] = torch.zeros(1)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    match = r"blocks\.1\.mlp\.up\.weight.*model\.layers\.0\.self_attn\.extra"
    with pytest.raises(CheckpointError, match=match):
        load_hf(path)


# ---- a sharded dir's index: read strictly, and only files inside the dir ---------------------------------------

INDEX_FILE = "model.safetensors.index.json"


def _sharded_gpt2(path):
    return _hf_dir(_gpt2(tie_word_embeddings=False), path, max_shard_size="40KB")


@pytest.mark.parametrize(("content", "problem"), [
    (b"not json", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    (b'{"metadata": {}}', "no 'weight_map'"),
    (b'{"weight_map": ["model-00001-of-00002.safetensors"]}', "'weight_map' is a list"),
    (b'{"weight_map": {"lm_head.weight": 5}}', "weight_map['lm_head.weight'] is 5"),
])
def test_broken_shard_index_is_one_line_naming_it(tmp_path, content, problem):
    path = _sharded_gpt2(tmp_path / "model")
    (path / INDEX_FILE).write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        load_hf(path)
    message = str(info.value)
    assert str(path / INDEX_FILE) in message and problem in message and "\n" not in message


@pytest.mark.parametrize("how", ["../", "absolute", "symlinked folder"])
def test_shard_index_naming_files_outside_the_dir_is_refused(tmp_path, how):
    """Another model's shards (same shapes) must not load through this dir's index."""
    path, other = _sharded_gpt2(tmp_path / "model"), _sharded_gpt2(tmp_path / "other")
    index = json.loads((path / INDEX_FILE).read_text())
    if how == "symlinked folder":
        (path / "linked").symlink_to(other, target_is_directory=True)
    prefix = {"../": "../other/", "absolute": f"{other}/", "symlinked folder": "linked/"}[how]
    index["weight_map"] = {k: prefix + v for k, v in index["weight_map"].items()}
    (path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"lies outside") as info:
        load_hf(path)
    assert str(path / INDEX_FILE) in str(info.value) and prefix in str(info.value)


def test_shard_files_that_are_symlinks_load(tmp_path):
    """The Hugging Face hub cache keeps each file as a symlink into its blobs folder: that layout loads."""
    hf_model = _gpt2(tie_word_embeddings=False)
    path = _hf_dir(hf_model, tmp_path / "snapshot", max_shard_size="40KB")
    (tmp_path / "blobs").mkdir()
    for shard in path.glob("*.safetensors"):
        shard.rename(tmp_path / "blobs" / shard.name)
        shard.symlink_to(f"../blobs/{shard.name}")
    model, _ = load_hf(path)
    with torch.no_grad():
        _assert_close(model(_ids()), hf_model(_ids()).logits)
