"""GGUF export: a decoder as the single file llama.cpp (and Ollama, which runs on it) loads.

GPT-2, Llama (with linear or llama3 RoPE scaling), Mistral (run by llama.cpp as llama), Qwen2, Qwen3 and GPT-NeoX.
The tensors are the ones `export_hf` writes, renamed by the `gguf` package's own map (`gguf.get_tensor_name_map`,
the table llama.cpp's convert_hf_to_gguf.py uses) with that converter's layout changes: GPT-2's Conv1D weights go
back to [out, in]; GPT-NeoX's fused q/k/v rows, interleaved per head, become all q, all k, all v; and the llama
architecture's q/k rows are permuted per head from Hugging Face's half-split rotary layout (pairs i, i + D/2, as
lmforge rotates) to llama.cpp's interleaved one (pairs 2i, 2i + 1); Qwen2/3 and GPT-NeoX rotate half-split in
llama.cpp too. Llama 3 scaling becomes llama.cpp's `rope_freqs` tensor (each frequency's divisor); a Mistral sliding
window caps the context length (within its window a sliding window attends to every position, and llama.cpp's llama
has none). The metadata holds the hyperparameters, the byte-level BPE tokenizer (tokens, token types, merges,
bos/eos/pad ids) and the chat template as Jinja. Everything that can be refused (architecture, tokenizer, a `--type`
the tensor sizes do not allow) is checked before the file is written; the file itself is written atomically.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lmforge.data.chat import ChatTemplate, ending_ids
from lmforge.errors import ConfigError
from lmforge.io import atomic_write
from lmforge.model.decoder import DecoderLM
from lmforge.tokenizer import Tokenizer

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")
# HF model_type -> the llama.cpp architecture that runs it (llama.cpp runs Mistral as llama)
GGUF_ARCHS = {"gpt2": "gpt2", "llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
              "gpt_neox": "gptneox"}
_PERMUTED_QK = ("llama", "mistral")  # the model types llama.cpp rotates in interleaved pairs (the others: NeoX-style)
_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
# tokenizer.ggml.pre: how llama.cpp splits text before BPE. GPT-2's is ByteLevel's own regex; Llama 3's and Qwen2's
# tokenizer.json split with these regexes first (Split, then ByteLevel without its regex). They differ in digits.
_SPLIT_BEFORE, _SPLIT_AFTER = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|", \
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
PRE_TOKENIZER_SPLITS = {"llama-bpe": _SPLIT_BEFORE + r"\p{N}{1,3}" + _SPLIT_AFTER,  # runs of up to 3 digits
                        "qwen2": _SPLIT_BEFORE + r"\p{N}" + _SPLIT_AFTER}  # one digit at a time


@dataclass(frozen=True)
class _Tensor:
    name: str  # llama.cpp's name
    data: np.ndarray  # as written: float32, float16 or the quantised bytes
    raw_dtype: Any  # gguf.GGMLQuantizationType


def gguf_model_type(cfg: Any) -> str:
    """The HF model type `cfg` exports as, if llama.cpp runs it; ConfigError (naming what does not fit) if not."""
    from lmforge.model.hf import hf_model_type_of

    try:
        model_type = hf_model_type_of(cfg)
    except ConfigError as err:
        raise ConfigError(f"GGUF export: {err}; llama.cpp runs {', '.join(GGUF_ARCHS)}") from None
    biases = {"llama": ("attn_bias", "mlp_bias"), "mistral": ("attn_bias", "mlp_bias"), "qwen3": ("attn_bias",)}
    for key in biases.get(model_type, ()):
        if getattr(cfg, key):
            raise ConfigError(f"GGUF export: a {model_type} model with {key}=true does not load in llama.cpp (its "
                              f"{GGUF_ARCHS[model_type]} has no such biases); llama.cpp runs {', '.join(GGUF_ARCHS)}")
    scaling = getattr(cfg, "rope_scaling", None)
    if scaling is not None and (scaling.type == "dynamic" or scaling.type == "llama3" and model_type not in
                                _PERMUTED_QK):
        raise ConfigError(f"GGUF export: rope_scaling type {scaling.type} of a {model_type} model has no llama.cpp "
                          "equivalent (it runs linear scaling, and llama3 scaling in llama models)")
    return model_type


def permute_rotary(weight: Tensor, n_head: int) -> Tensor:
    """q or k rows (or bias) from the half-split rotary layout to llama.cpp's interleaved one, per head."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).transpose(1, 2).reshape(
        weight.shape)


def _llama_cpp_layout(name: str, tensor: Tensor, model_type: str, cfg: Any) -> Tensor:
    from lmforge.model.hf import split_fused_qkv

    if model_type == "gpt2" and name.endswith(_CONV1D):
        return tensor.t()
    if model_type == "gpt_neox" and ".attention.query_key_value." in name:  # per-head q|k|v rows -> all q|all k|all v
        return torch.cat(split_fused_qkv(model_type, tensor, name.endswith(".weight"), cfg.n_head))
    if model_type in _PERMUTED_QK and ".self_attn.q_proj." in name:
        return permute_rotary(tensor, cfg.n_head)
    if model_type in _PERMUTED_QK and ".self_attn.k_proj." in name:
        return permute_rotary(tensor, cfg.kv_heads)
    return tensor


def _encode(name: str, hf_name: str, tensor: Tensor, qtype: str) -> _Tensor:
    """A tensor as written: vectors stay float32 (as llama.cpp's converter keeps them); matrices take `qtype`."""
    import gguf

    data = tensor.contiguous().numpy()
    if data.ndim == 1 or qtype == "f32":
        return _Tensor(name, data.astype(np.float32), gguf.GGMLQuantizationType.F32)
    if qtype == "f16":
        return _Tensor(name, data.astype(np.float16), gguf.GGMLQuantizationType.F16)
    kind = gguf.GGMLQuantizationType[qtype.upper()]
    block = gguf.GGML_QUANT_SIZES[kind][0]
    if data.shape[-1] % block:
        raise ConfigError(f"GGUF export --type {qtype}: tensor {name} ({hf_name}) has rows of {data.shape[-1]} values, "
                          f"not a multiple of {qtype}'s block of {block}; use --type f16 or f32")
    return _Tensor(name, gguf.quants.quantize(data, kind), kind)


def gguf_tensors(model: DecoderLM, qtype: str) -> list[_Tensor]:
    """`model`'s weights under llama.cpp's names and layouts, encoded as `qtype`."""
    import gguf

    from lmforge.model.hf import to_hf_names
    from lmforge.model.layers import rope_inv_freq

    if qtype not in GGUF_TYPES:
        raise ConfigError(f"GGUF export --type {qtype!r} is not one of {', '.join(GGUF_TYPES)}")
    cfg = model.cfg
    model_type = gguf_model_type(cfg)
    arch = GGUF_ARCHS[model_type]
    weights = to_hf_names(model, model_type)
    if arch == "gpt2" and "lm_head.weight" not in weights:  # llama.cpp's gpt2 reads its head as its own tensor
        weights["lm_head.weight"] = weights["transformer.wte.weight"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.n_layer)
    out = []
    for hf_name, tensor in weights.items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ConfigError(f"GGUF export: llama.cpp's {arch} has no tensor for {hf_name}")
        out.append(_encode(name, hf_name, _llama_cpp_layout(hf_name, tensor, model_type, cfg), qtype))
    scaling = getattr(cfg, "rope_scaling", None)
    if scaling is not None and scaling.type == "llama3":  # llama.cpp divides each frequency by its factor
        factors = rope_inv_freq(cfg.rotary_dim, cfg.rope_theta) / rope_inv_freq(cfg.rotary_dim, cfg.rope_theta, scaling)
        rope_freqs = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        out.append(_Tensor(rope_freqs, factors.numpy().astype(np.float32), gguf.GGMLQuantizationType.F32))
    return out


def _tokenizer_metadata(tokenizer: Tokenizer, vocab_size: int) -> dict[str, Any]:
    """The tokenizer as llama.cpp's "gpt2" (byte-level BPE) model: tokens by id, types, merges, pre-tokenizer."""
    import gguf

    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model") or {}
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer") or {})
    if model.get("type") != "BPE" or pre is None:
        raise ConfigError(f"GGUF export: the tokenizer is {model.get('type')} with pre-tokenizer "
                          f"{json.dumps(spec.get('pre_tokenizer'))[:200]}; llama.cpp's BPE is exported from byte-level "
                          f"BPE split as GPT-2, {' or '.join(PRE_TOKENIZER_SPLITS)} split")
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]  # rows no token uses, as llama.cpp's converter pads
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, tid in tokenizer.backend.get_vocab(with_added_tokens=True).items():
        tokens[tid], types[tid] = token, gguf.TokenType.NORMAL
    for added in spec.get("added_tokens", []):
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    bos, sample = tokenizer.bos_id, tokenizer.backend.encode("a")  # does the post-processor put BOS first?
    add_bos = bos is not None and sample.ids[:1] == [bos] and tokenizer.encode("a")[:1] != [bos]
    return dict(pre=pre, tokens=tokens, types=types, merges=merges, add_bos=add_bos)


def _pre_tokenizer_name(pre: dict[str, Any]) -> str | None:
    """llama.cpp's name for a tokenizer.json pre-tokenizer: GPT-2's ByteLevel, or a known Split then ByteLevel."""
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    parts = pre.get("pretokenizers") or []
    if pre.get("type") != "Sequence" or [p.get("type") for p in parts] != ["Split", "ByteLevel"] or \
            parts[1].get("use_regex", True):
        return None
    pattern = (parts[0].get("pattern") or {}).get("Regex")
    return next((name for name, split in PRE_TOKENIZER_SPLITS.items() if split == pattern), None)


def _write(path: Path, arch: str, cfg: Any, tensors: list[_Tensor], tok: dict[str, Any], ids: dict[str, int | None],
           chat_source: str | None, qtype: str, name: str) -> None:
    import gguf

    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType[{"f32": "ALL_F32"}.get(qtype, f"MOSTLY_{qtype.upper()}")])
    window = getattr(cfg, "sliding_window", None)  # within its window, a sliding one attends to every position
    writer.add_context_length(min(cfg.max_seq_len, window or cfg.max_seq_len))
    writer.add_embedding_length(cfg.d_model)
    writer.add_feed_forward_length(cfg.ff_dim)
    writer.add_block_count(cfg.n_layer)
    writer.add_head_count(cfg.n_head)
    writer.add_vocab_size(cfg.vocab_size)
    if cfg.norm == "layernorm":
        writer.add_layer_norm_eps(cfg.norm_eps)
    else:
        writer.add_layer_norm_rms_eps(cfg.norm_eps)
    if cfg.position == "rope":
        writer.add_head_count_kv(cfg.kv_heads)
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_rope_dimension_count(cfg.rotary_dim)
        if cfg.rope_scaling is not None and cfg.rope_scaling.type == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(cfg.rope_scaling.factor)
    if arch == "gptneox":
        writer.add_parallel_residual(cfg.parallel_residual)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tok["pre"])
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["types"])
    writer.add_token_merges(tok["merges"])
    writer.add_add_bos_token(tok["add_bos"])  # as the tokenizer.json's post-processor does
    for role, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("pad", writer.add_pad_token_id), ("eot", writer.add_eot_token_id)):
        if ids.get(role) is not None:
            add(ids[role])
    if chat_source is not None:
        writer.add_chat_template(chat_source)
    for t in tensors:
        writer.add_tensor(t.name, t.data, raw_dtype=t.raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def export_gguf(model: DecoderLM, tokenizer: Tokenizer | None, path: str | Path, qtype: str = "f32",
                chat_template: ChatTemplate | None = None, name: str = "lmforge") -> Path:
    """Write `model` and its tokenizer (and chat template, as Jinja) as the GGUF file `path`, matrices as `qtype`."""
    from lmforge.data.chat_jinja import jinja_chat_template

    path = Path(path)
    cfg = model.cfg
    if tokenizer is None:
        raise ConfigError("GGUF export needs the model's tokenizer (llama.cpp reads it from the file)")
    arch = GGUF_ARCHS[gguf_model_type(cfg)]
    tok = _tokenizer_metadata(tokenizer, cfg.vocab_size)
    chat_source = None if chat_template is None else jinja_chat_template(chat_template)
    tensors = gguf_tensors(model, qtype)
    turn_ends = [i for i in ending_ids(tokenizer, chat_template) if i != tokenizer.eos_id]  # llama.cpp stops at both
    ids = dict(bos=tokenizer.bos_id, eos=tokenizer.eos_id, pad=tokenizer.pad_id,
               eot=turn_ends[0] if turn_ends else None)
    size = sum(t.data.nbytes for t in tensors)
    return atomic_write(path, lambda tmp: _write(tmp, arch, cfg, tensors, tok, ids, chat_source, qtype, name), size)

