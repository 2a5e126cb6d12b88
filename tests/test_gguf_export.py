"""GGUF export: read back by gguf's reader, loaded by transformers' GGUF loader with lmforge's logits, and (where
llama-cpp-python is installed) run by llama.cpp with lmforge's greedy tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from parity_helpers import perturb

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from lmforge.cli import main  # noqa: E402
from lmforge.config import ModelConfig  # noqa: E402
from lmforge.data.chat import get_chat_template  # noqa: E402
from lmforge.errors import ConfigError  # noqa: E402
from lmforge.gguf_export import export_gguf  # noqa: E402
from lmforge.model.decoder import DecoderLM  # noqa: E402
from lmforge.tokenizer import train_tokenizer  # noqa: E402

ATOL = 1e-4
TEXTS = ["the quick brown fox jumps over the lazy dog", "hello world, hello GGUF", "llama.cpp reads gguf files",
         "12345 apples and 67890 pears cost 12345"] * 20
# Odd shapes: GQA 4:2 and an untied head for llama; a tied head for GPT-2. Rows are 64 wide (q4_0/q8_0 blocks fit).
# transformers' GGUF loader builds GPT-2 with its default n_positions (1024) and n_inner (4 * n_embd), so ours match.
CONFIGS = {
    "llama": dict(family="llama", n_head=4, n_kv_head=2, d_model=64, d_ff=96, rope_theta=5e5, tie_embeddings=False,
                  max_seq_len=64),
    "gpt2": dict(family="gpt2", n_head=4, d_model=64, d_ff=256, max_seq_len=1024),
}
# The other families llama.cpp runs (and transformers' GGUF loader reads, but for GPT-NeoX). Its Qwen3 takes the
# default head_dim (128), as transformers' GGUF loader does not read key_length; ours must match it.
CONFIGS |= {
    "mistral": {**CONFIGS["llama"], "family": "mistral", "sliding_window": 16},
    "qwen2": {**CONFIGS["llama"], "family": "qwen2", "tie_embeddings": True},
    "qwen3": {**CONFIGS["llama"], "family": "qwen3", "head_size": 128},
    "gpt_neox": dict(family="gpt_neox", n_head=4, d_model=64, d_ff=128, max_seq_len=64),
}


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=420, show_progress=False)


def _model(family: str, tokenizer, **kw) -> DecoderLM:
    torch.manual_seed(0)
    cfg = ModelConfig(**{**CONFIGS[family], **kw}, vocab_size=tokenizer.vocab_size + 3, n_layer=2)
    model = DecoderLM(cfg)
    perturb(model)
    return model.eval()


def _fields(reader: gguf.GGUFReader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_reader_sees_llama_cpp_names_shapes_types_and_metadata(family, tokenizer, tmp_path):
    model = _model(family, tokenizer)
    template = get_chat_template("lmforge", tokenizer)
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf", qtype="f16", chat_template=template)
    reader = gguf.GGUFReader(path)
    fields = _fields(reader)
    cfg = model.cfg
    assert fields["general.architecture"] == family
    assert fields[f"{family}.context_length"] == cfg.max_seq_len
    assert fields[f"{family}.embedding_length"] == cfg.d_model
    assert fields[f"{family}.block_count"] == cfg.n_layer
    assert fields[f"{family}.attention.head_count"] == cfg.n_head
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    if family == "llama":
        assert fields["llama.attention.head_count_kv"] == 2
        assert fields["llama.rope.freq_base"] == pytest.approx(5e5)
        assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.norm_eps)
    assert fields["tokenizer.ggml.model"] == "gpt2"
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == cfg.vocab_size and tokens[tokenizer.eos_id] == "<|eos|>"
    assert tokens[-1] == f"[PAD{cfg.vocab_size - 1}]"
    types = fields["tokenizer.ggml.token_type"]
    assert types[tokenizer.eos_id] == gguf.TokenType.CONTROL and types[-1] == gguf.TokenType.UNUSED
    assert types[tokenizer.encode("the")[0]] == gguf.TokenType.NORMAL
    assert fields["tokenizer.ggml.merges"][0].count(" ") == 1
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_id
    assert fields["tokenizer.ggml.eot_token_id"] == tokenizer.token_id("<|end_of_turn|>")
    assert "<|assistant|>" in fields["tokenizer.chat_template"]
    tensors = {t.name: t for t in reader.tensors}
    assert {"token_embd.weight", "output_norm.weight", "output.weight", "blk.1.attn_norm.weight"} <= tensors.keys()
    if family == "llama":
        assert tuple(tensors["blk.0.attn_k.weight"].shape) == (cfg.d_model, 2 * cfg.head_dim)  # ggml order: in, out
        assert tensors["blk.0.ffn_gate.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    else:
        assert tuple(tensors["blk.0.attn_qkv.weight"].shape) == (cfg.d_model, 3 * cfg.d_model)
        assert "position_embd.weight" in tensors
    assert tensors["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32


@pytest.mark.parametrize(("family", "change"), [("llama", {}), ("llama", dict(n_kv_head=1, tie_embeddings=True)),
                                               ("mistral", {}), ("qwen2", {}), ("qwen3", {}), ("gpt2", {})])
def test_transformers_gguf_loader_gives_lmforge_logits_and_ids(family, change, tokenizer, tmp_path):
    model = _model(family, tokenizer, **change)
    export_gguf(model, tokenizer, tmp_path / "m.gguf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf").eval()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 16))  # Mistral: as long as its window
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert (ours - theirs).abs().max().item() <= ATOL
    if family == "mistral":  # llama.cpp's llama has no sliding window: the context stops where the window does
        assert gguf.GGUFReader(tmp_path / "m.gguf").fields["llama.context_length"].contents() == 16
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    text = "the quick brown fox, hello GGUF!  <|eos|> café"
    assert hf_tokenizer(text, add_special_tokens=False).input_ids == tokenizer.encode(text)
    assert hf_tokenizer.eos_token_id == tokenizer.eos_id


def test_gpt_neox_qkv_rows_are_all_q_then_all_k_then_all_v(tokenizer, tmp_path):
    model = _model("gpt_neox", tokenizer)
    reader = gguf.GGUFReader(export_gguf(model, tokenizer, tmp_path / "m.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    attn = model.blocks[1].attn
    for kind in ("weight", "bias"):
        expected = torch.cat([getattr(attn, p).get_parameter(kind).detach() for p in "qkv"]).numpy()
        assert np.array_equal(tensors[f"blk.1.attn_qkv.{kind}"].data, expected)
    fields = _fields(reader)
    assert fields["gptneox.rope.dimension_count"] == model.cfg.rotary_dim
    assert fields["gptneox.use_parallel_residual"] is True


def test_llama3_rope_scaling_becomes_rope_freqs_and_linear_a_factor(tokenizer, tmp_path):
    from lmforge.model.layers import rope_inv_freq

    llama3 = dict(type="llama3", factor=8.0, original_max_len=64, low_freq_factor=1.0, high_freq_factor=4.0)
    model = _model("llama", tokenizer, rope_scaling=llama3)
    tensors = {t.name: t for t in gguf.GGUFReader(export_gguf(model, tokenizer, tmp_path / "a.gguf")).tensors}
    cfg = model.cfg
    divisors = rope_inv_freq(cfg.rotary_dim, cfg.rope_theta) / rope_inv_freq(cfg.rotary_dim, cfg.rope_theta,
                                                                                cfg.rope_scaling)
    assert np.allclose(tensors["rope_freqs.weight"].data, divisors.numpy())
    assert divisors.max() == pytest.approx(8.0) and divisors.min() == pytest.approx(1.0)  # both ends are used
    model = _model("llama", tokenizer, rope_scaling=dict(type="linear", factor=4.0))
    fields = _fields(gguf.GGUFReader(export_gguf(model, tokenizer, tmp_path / "b.gguf")))
    assert fields["llama.rope.scaling.type"] == "linear" and fields["llama.rope.scaling.factor"] == 4.0


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2"])
def test_llama3_and_qwen2_pre_tokenizers_are_named_and_read_back_with_their_ids(pre, tokenizer, tmp_path):
    from tokenizers import Regex, pre_tokenizers, processors

    from lmforge.gguf_export import PRE_TOKENIZER_SPLITS
    from lmforge.tokenizer import Tokenizer

    family = Tokenizer(type(tokenizer.backend).from_str(tokenizer.backend.to_str()))  # a copy, split as `pre` splits
    family.backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRE_TOKENIZER_SPLITS[pre]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre == "llama-bpe":  # Llama 3's post-processor puts BOS first
        family.backend.post_processor = processors.TemplateProcessing(
            single="<|bos|> $A", special_tokens=[("<|bos|>", tokenizer.bos_id)])
    model = _model("llama", family)
    path = export_gguf(model, family, tmp_path / "m.gguf")
    fields = _fields(gguf.GGUFReader(path))
    assert fields["tokenizer.ggml.pre"] == pre
    assert fields["tokenizer.ggml.add_bos_token"] is (pre == "llama-bpe")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    text = "the 12345 quick foxes' hello!\n\n  world"
    assert family.encode(text) != tokenizer.encode(text)  # the split matters for this text
    assert hf_tokenizer(text, add_special_tokens=False).input_ids == family.encode(text)


def test_tokenizer_llama_cpp_cannot_split_is_refused(tokenizer, tmp_path):
    from tokenizers import pre_tokenizers

    from lmforge.tokenizer import Tokenizer

    odd = Tokenizer(type(tokenizer.backend).from_str(tokenizer.backend.to_str()))
    odd.backend.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ConfigError, match="pre-tokenizer .*Whitespace.*llama-bpe or qwen2"):
        export_gguf(_model("llama", tokenizer), odd, tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_quantised_tensors_dequantise_to_the_weights(qtype, tokenizer, tmp_path):
    model = _model("llama", tokenizer)
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf", qtype=qtype)
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    down = tensors["blk.0.ffn_down.weight"]
    assert down.tensor_type == gguf.GGMLQuantizationType[qtype.upper()]
    restored = gguf.quants.dequantize(down.data, down.tensor_type)
    weight = model.blocks[0].mlp.down.weight.detach().numpy()
    step = np.abs(weight).max() / (127 if qtype == "q8_0" else 7)
    assert np.abs(restored - weight).max() <= step  # within one quantisation step of the largest block scale


def test_type_the_tensor_sizes_do_not_allow_is_refused_naming_the_tensor(tokenizer, tmp_path):
    model = _model("llama", tokenizer, d_model=48, n_head=4, n_kv_head=2)  # rows of 48: not a multiple of 32
    with pytest.raises(ConfigError, match="token_embd.weight .*rows of 48.*block of 32"):
        export_gguf(model, tokenizer, tmp_path / "m.gguf", qtype="q4_0")
    assert not list(tmp_path.iterdir())  # refused before writing


@pytest.mark.parametrize("change", [dict(position="alibi"), dict(norm_placement="post"), dict(attn_bias=True),
                                    dict(rope_scaling=dict(type="dynamic", factor=2.0))])
def test_architecture_llama_cpp_does_not_run_is_refused_before_writing(change, tokenizer, tmp_path):
    model = _model("llama", tokenizer, **change)
    with pytest.raises(ConfigError, match="GGUF export: .*llama.cpp"):
        export_gguf(model, tokenizer, tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())


def test_cli_export_gguf_of_a_run_and_bad_type(tokenizer, tmp_path, capsys):
    import lmforge

    model = _model("llama", tokenizer, d_model=48, n_head=4, n_kv_head=2)
    run = lmforge.save(model, tokenizer, tmp_path / "run")
    out = tmp_path / "m.gguf"
    assert main(["export", str(run), "--format", "gguf", "--type", "q4_0", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "token_embd.weight" in err and "--type f16" in err
    assert not out.exists()
    assert main(["export", str(run), "--format", "gguf", "--out", str(out)]) == 0
    assert "GGUF" in capsys.readouterr().out
    assert gguf.GGUFReader(out).fields["general.file_type"].contents() == gguf.LlamaFileType.ALL_F32
    assert main(["export", str(run), "--type", "q8_0", "--out", str(tmp_path / "hf")]) == 2
    assert "--type" in capsys.readouterr().err


def test_cli_export_gguf_of_a_hugging_face_dir_carries_its_own_chat_template(tmp_path, capsys):
    import lmforge
    from lmforge.data.chat import HFChatTemplate
    from lmforge.tokenizer import Tokenizer
    from test_family_tokenizers import QWEN2_TEMPLATE, _family_dir

    (tmp_path / "tok").mkdir()
    family = Tokenizer.from_file(_family_dir("qwen2", tmp_path / "tok"))
    hf_dir = lmforge.export_hf(_model("qwen2", family), family, tmp_path / "hf",
                               chat_template=HFChatTemplate(QWEN2_TEMPLATE, family))
    out = tmp_path / "m.gguf"
    assert main(["export", str(hf_dir), "--format", "gguf", "--type", "f16", "--out", str(out)]) == 0
    assert "chat template" in capsys.readouterr().out
    fields = _fields(gguf.GGUFReader(out))
    assert fields["general.architecture"] == "qwen2" and fields["tokenizer.ggml.pre"] == "qwen2"
    assert fields["tokenizer.chat_template"] == QWEN2_TEMPLATE
    assert fields["tokenizer.ggml.eot_token_id"] == family.token_id("<|im_end|>")


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_llama_cpp_greedy_tokens_equal_lmforge(family, tokenizer, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp not installed: pip install llama-cpp-python")
    from lmforge.infer.generate import SamplingConfig, generate_ids

    model = _model(family, tokenizer)
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf")
    prompt = tokenizer.encode("the quick brown fox")
    ours = generate_ids(model, prompt, SamplingConfig(max_new_tokens=12, stop_at_eos=False))
    llm = llama_cpp.Llama(str(path), n_ctx=64, verbose=False)
    theirs = []
    for tid in llm.generate(prompt, temp=0.0, top_k=1):
        theirs.append(tid)
        if len(theirs) == 12:
            break
    assert theirs == ours
