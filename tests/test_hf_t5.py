"""T5 interop: lmforge's EncDecLM and transformers' T5ForConditionalGeneration agree both ways.

Every model is built in-process from random init (no downloads), every parameter perturbed. Parity
means max abs difference <= 1e-4 in fp32, eval mode, for decoder logits (teacher-forced targets, padded
encoder inputs) and encoder hidden states; greedy generation gives the same ids.
"""

from __future__ import annotations

import json

import pytest
import torch

from near_ties import assert_clear_greedy_encdec
from parity_helpers import perturb

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import Tokenizer as HFTokenizer  # noqa: E402
from tokenizers import models, pre_tokenizers  # noqa: E402
from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration  # noqa: E402
from transformers.models.t5.modeling_t5 import T5Attention  # noqa: E402

from lmforge.config import EncDecConfig  # noqa: E402
from lmforge.data.task_data import read_text2text  # noqa: E402
from lmforge.errors import CheckpointError, ConfigError  # noqa: E402
from lmforge.infer.generate import SamplingConfig  # noqa: E402
from lmforge.infer.generate_encdec import generate_encdec  # noqa: E402
from lmforge.model.encdec import EncDecLM, relative_position_bucket  # noqa: E402
from lmforge.model.hf_t5 import config_from_hf_t5, export_hf_t5, load_hf_t5  # noqa: E402
from lmforge.tokenizer import EOS, PAD, SENTINELS, Tokenizer  # noqa: E402

ATOL = 1e-4
VOCAB = 300


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)



def _t5(**kw) -> T5ForConditionalGeneration:
    cfg = T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **kw)
    return T5ForConditionalGeneration(cfg)


def _hf_dir(hf_model, tmp_path):
    perturb(hf_model)
    hf_model.eval().save_pretrained(tmp_path)
    return tmp_path


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encoder ids [2, 40] (second row padded after 27 tokens) and decoder ids [2, 30]."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(2, VOCAB, (2, 40), generator=g)
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 27:] = 0
    ids[1, 27:] = 0
    return ids, mask, torch.randint(2, VOCAB, (2, 30), generator=g)


def _assert_close(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    diff = (ours - theirs).abs().max().item()
    assert diff <= ATOL, f"max abs {what} diff {diff:.2e} > {ATOL}"


def _compare(model: EncDecLM, hf_model: T5ForConditionalGeneration) -> None:
    ids, mask, dec = _batch()
    with torch.no_grad():
        ref = hf_model.eval()(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
        _assert_close(model.encode(ids, mask), ref.encoder_last_hidden_state, "encoder hidden")
        _assert_close(model(ids, dec, mask), ref.logits, "logit")


IMPORT_CASES = {
    # short bucket ranges so 40 tokens reach the log-spaced and the clamped buckets
    "relu-tied": dict(feed_forward_proj="relu", relative_attention_num_buckets=8, relative_attention_max_distance=20),
    "gated-gelu-untied": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),  # T5 v1.1 / Flan-T5
    "more-decoder-layers": dict(num_decoder_layers=3, relative_attention_num_buckets=16,
                                relative_attention_max_distance=32),
}


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("buckets,max_distance", [(32, 128), (8, 20), (16, 32)])
def test_buckets_match_transformers(bidirectional, buckets, max_distance):
    rel = torch.arange(-300, 301)
    ours = relative_position_bucket(rel, bidirectional, buckets, max_distance)
    theirs = T5Attention._relative_position_bucket(rel, bidirectional, buckets, max_distance)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("case", list(IMPORT_CASES))
def test_import_matches_transformers(case, tmp_path):
    hf_model = _t5(**IMPORT_CASES[case])
    model, tok = load_hf_t5(_hf_dir(hf_model, tmp_path))
    assert tok is None and not model.training
    _compare(model, hf_model)


def test_config_fields():
    hf = _t5(feed_forward_proj="gated-gelu", num_decoder_layers=3, tie_word_embeddings=False,
             relative_attention_num_buckets=16, relative_attention_max_distance=64, layer_norm_epsilon=1e-5)
    cfg = config_from_hf_t5(hf.config.to_dict())
    assert (cfg.gated, cfg.activation, cfg.tie_embeddings) == (True, "gelu_tanh", False)
    assert (cfg.n_layer, cfg.decoder_layers, cfg.n_head, cfg.head_dim, cfg.d_model, cfg.d_ff) == (2, 3, 4, 16, 64, 128)
    assert (cfg.relative_buckets, cfg.relative_max_distance, cfg.norm_eps, cfg.decoder_start_id) == (16, 64, 1e-5, 0)
    relu = config_from_hf_t5(_t5().config.to_dict())
    assert (relu.gated, relu.activation, relu.tie_embeddings) == (False, "relu", True)


def test_import_old_style_untied_head(tmp_path):
    """A transformers-4 style T5 v1.1 checkpoint: tie_word_embeddings=false and its own lm_head.weight."""
    hf_dir = _hf_dir(_t5(feed_forward_proj="gated-gelu", tie_word_embeddings=False), tmp_path)
    config = json.loads((hf_dir / "config.json").read_text())
    config.pop("scale_decoder_outputs", None)
    (hf_dir / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    weights = load_file(hf_dir / "model.safetensors")
    weights["lm_head.weight"] = torch.randn(VOCAB, 64) * 0.1
    save_file(weights, hf_dir / "model.safetensors", metadata={"format": "pt"})
    model, _ = load_hf_t5(hf_dir)
    assert torch.equal(model.lm_head.weight, weights["lm_head.weight"])
    _compare(model, T5ForConditionalGeneration.from_pretrained(hf_dir))


@pytest.mark.parametrize("kw", [
    {},
    dict(gated=True, activation="gelu_tanh", tie_embeddings=False, n_decoder_layer=3),
    dict(gated=True, activation="silu", relative_buckets=8, relative_max_distance=16),
])
def test_export_roundtrip(kw, tmp_path):
    torch.manual_seed(1)
    model = EncDecLM(EncDecConfig(vocab_size=VOCAB, max_seq_len=64, n_layer=2, n_head=4, head_dim=16, d_model=64,
                                  d_ff=128, decoder_start_id=0, **kw)).eval()
    perturb(model)
    path = export_hf_t5(model, None, tmp_path / "hf")
    config = json.loads((path / "config.json").read_text())
    assert config["decoder_start_token_id"] == 0 and config["pad_token_id"] == 0
    _compare(model, T5ForConditionalGeneration.from_pretrained(path))
    again, _ = load_hf_t5(path)
    assert again.cfg == model.cfg
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def _word_tokenizer() -> Tokenizer:
    words = [PAD, EOS, "<|bos|>", *SENTINELS[:3], *(f"w{i}" for i in range(50))]
    backend = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return Tokenizer(backend)


def test_export_writes_token_ids_and_tokenizer(tmp_path):
    tok = _word_tokenizer()
    model = EncDecLM(EncDecConfig(vocab_size=64, n_layer=1, n_head=2, head_dim=8, d_model=16, d_ff=32,
                                  decoder_start_id=tok.pad_id))
    path = export_hf_t5(model, tok, tmp_path)
    config = json.loads((path / "config.json").read_text())
    assert (config["pad_token_id"], config["eos_token_id"], config["decoder_start_token_id"]) == (0, 1, 0)
    assert json.loads((path / "tokenizer_config.json").read_text())["eos_token"] == EOS
    _, loaded = load_hf_t5(path)
    assert loaded is not None and loaded.encode("w3 w4") == tok.encode("w3 w4")
    data = tmp_path / "t2t.jsonl"  # transformers' tokenizer lays inputs out as lmforge trained on them: text EOS
    data.write_text(json.dumps({"input": "w3 w4", "target": "w5"}) + "\n")
    (example,) = read_text2text(data, tok, 16)
    assert AutoTokenizer.from_pretrained(path)("w3 w4")["input_ids"] == example["input_ids"]
    with pytest.raises(ConfigError, match="vocab_size"):
        export_hf_t5(EncDecLM(EncDecConfig(vocab_size=8, n_layer=1, d_model=16, d_ff=32)), tok, tmp_path / "x")


def test_generate_greedy_matches_transformers(tmp_path):
    """Same ids as HF generate(do_sample=False, num_beams=1), the encoder run once, with and without padding."""
    hf_model = _t5(feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    model, _ = load_hf_t5(_hf_dir(hf_model, tmp_path))
    calls = []
    model.encoder.register_forward_hook(lambda *_: calls.append(1))
    ids, mask, _ = _batch()
    for row in (0, 1):
        want = hf_model.generate(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1], do_sample=False,
                                 num_beams=1, max_new_tokens=20, eos_token_id=None)[0, 1:].tolist()
        calls.clear()
        got = generate_encdec(model, ids[row].tolist(), SamplingConfig(max_new_tokens=20, temperature=0),
                              attention_mask=mask[row].tolist())
        assert len(calls) == 1
        assert_clear_greedy_encdec(model, ids[row].tolist(), want, mask[row].tolist())
        assert got == want
        stop = want[5]  # as EOS: HF emits it and stops, lmforge stops before it
        want_eos = hf_model.generate(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1], do_sample=False,
                                     num_beams=1, max_new_tokens=20, eos_token_id=stop)[0, 1:].tolist()
        got_eos = generate_encdec(model, ids[row].tolist(), SamplingConfig(max_new_tokens=20, temperature=0),
                                  eos_id=stop, attention_mask=mask[row].tolist())
        assert got_eos + [stop] == want_eos


# ---- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("proj", ["gated-foo", "tanh", "relu-gelu", "gated-gelu-x"])
def test_unsupported_feed_forward_proj(proj):
    config = _t5().config.to_dict()
    with pytest.raises(ConfigError, match=f"feed_forward_proj='{proj}'"):
        config_from_hf_t5({**config, "feed_forward_proj": proj})


def test_config_errors_name_the_field():
    config = _t5().config.to_dict()
    with pytest.raises(ConfigError, match="model_type='bart'"):
        config_from_hf_t5({**config, "model_type": "bart"})
    with pytest.raises(ConfigError, match="is_gated_act"):
        config_from_hf_t5({**config, "is_gated_act": True})
    with pytest.raises(ConfigError, match="'d_kv'"):
        config_from_hf_t5({k: v for k, v in config.items() if k != "d_kv"})
    assert config_from_hf_t5({**config, "decoder_start_token_id": None, "pad_token_id": 5}).decoder_start_id == 5
    with pytest.raises(ConfigError, match="decoder_start_token_id"):
        config_from_hf_t5({**config, "decoder_start_token_id": None, "pad_token_id": None})


def test_checkpoint_errors(tmp_path):
    hf_dir = _hf_dir(_t5(), tmp_path)
    weights = load_file(hf_dir / "model.safetensors")
    bad = dict(weights)
    del bad["decoder.block.1.layer.1.EncDecAttention.q.weight"]
    bad["decoder.block.1.layer.9.Mystery.weight"] = torch.zeros(3)
    save_file(bad, hf_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"decoder\.blocks\.1\.cross_attn\.q\.weight.*Mystery"):
        load_hf_t5(hf_dir)
    save_file({**weights, "lm_head.weight": torch.randn(VOCAB, 64)}, hf_dir / "model.safetensors")
    with pytest.raises(ConfigError, match="lm_head.weight differs"):
        load_hf_t5(hf_dir)
    save_file({**weights, "shared.weight": torch.zeros(VOCAB + 1, 64)}, hf_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"shared\.weight has shape \(301, 64\)"):
        load_hf_t5(hf_dir)
    with pytest.raises(CheckpointError, match="not a Hugging Face model dir"):
        load_hf_t5(tmp_path / "nowhere")


def test_export_refuses_exact_gelu_gated():
    model = EncDecLM(EncDecConfig(gated=True, activation="gelu", n_layer=1, d_model=16, d_ff=32))
    with pytest.raises(ConfigError, match="activation='gelu'"):
        export_hf_t5(model, None, "/nonexistent/never-written")
