"""Hugging Face interop: import GPT-2, Llama, Mistral, Qwen2, Qwen3 and GPT-NeoX checkpoints into `DecoderLM`,
export back (the RoPE families' configs: `hf_families.py`).

`load_hf(dir)` reads a `save_pretrained` directory (config.json + safetensors, sharded or not)
and returns a model whose fp32 logits match transformers'; `export_hf(model, tok, dir)` writes
one that `AutoModelForCausalLM.from_pretrained` loads with the same logits. Any HF setting lmforge
cannot honour (or any lmforge setting HF cannot express) is a `ConfigError` naming the field.
Weights are loaded as float32. Dropout is a training choice: it is exported, never imported.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors
from torch import Tensor

from lmforge.config import ModelConfig
from lmforge.config_loading import validation_summary
from lmforge.data.chat import ChatTemplate, ending_ids
from lmforge.data.chat_jinja import jinja_chat_template
from lmforge.errors import CheckpointError, ConfigError
from lmforge.io import atomic_write_text
from lmforge.model.decoder import DecoderLM
from lmforge.model.hf_families import (
    LLAMA_LIKE,
    hf_field,
    llama_like_fields,
    neox_fields,
    rope_config_to_hf,
    rope_model_type,
)
from lmforge.model.hf_weight_files import read_hf_weights, write_hf_weights
from lmforge.tokenizer import TOKENIZER_FILE, Tokenizer

SUPPORTED_MODEL_TYPES = ("gpt2", *LLAMA_LIKE, "gpt_neox")
CONFIG_FILE = "config.json"
TOKENIZER_CONFIG_FILE, GENERATION_CONFIG_FILE = "tokenizer_config.json", "generation_config.json"

# HF activation name -> lmforge activation ("gelu_new" is the tanh approximation, as GPT-2 uses).
ACT_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                "silu": "silu", "swish": "silu", "relu": "relu"}
ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "silu": "silu", "relu": "relu"}

# Weight names: HF (without its "transformer."/"model."/"gpt_neox." prefix) <-> lmforge. GPT-2's fused c_attn and
# GPT-NeoX's fused query_key_value are split/joined separately.
_LLAMA_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm",
                "self_attn.q_proj": "attn.q", "self_attn.k_proj": "attn.k", "self_attn.v_proj": "attn.v",
                "self_attn.o_proj": "attn.o", "mlp.gate_proj": "mlp.gate", "mlp.up_proj": "mlp.up",
                "mlp.down_proj": "mlp.down"}
_PREFIX = {"gpt2": "transformer.", **dict.fromkeys(LLAMA_LIKE, "model."), "gpt_neox": "gpt_neox."}
_GLOBAL = {
    "gpt2": {"wte.weight": "tok_emb.weight", "wpe.weight": "pos_emb.weight",
             "ln_f.weight": "final_norm.weight", "ln_f.bias": "final_norm.bias"},
    **dict.fromkeys(LLAMA_LIKE, {"embed_tokens.weight": "tok_emb.weight", "norm.weight": "final_norm.weight"}),
    "gpt_neox": {"embed_in.weight": "tok_emb.weight", "final_layer_norm.weight": "final_norm.weight",
                 "final_layer_norm.bias": "final_norm.bias"},
}
_HEAD = dict.fromkeys(_PREFIX, "lm_head.weight") | {"gpt_neox": "embed_out.weight"}  # the untied head, unprefixed
_LAYER = {  # per-layer module renames
    "gpt2": {"ln_1": "attn_norm", "ln_2": "mlp_norm", "attn.c_proj": "attn.o",
             "mlp.c_fc": "mlp.up", "mlp.c_proj": "mlp.down"},
    **dict.fromkeys(("llama", "mistral", "qwen2"), _LLAMA_LAYER),
    "qwen3": {**_LLAMA_LAYER, "self_attn.q_norm": "attn.q_norm", "self_attn.k_norm": "attn.k_norm"},
    "gpt_neox": {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm",
                 "attention.dense": "attn.o", "mlp.dense_h_to_4h": "mlp.up", "mlp.dense_4h_to_h": "mlp.down"},
}
_FUSED_QKV = {"gpt2": "attn.c_attn", "gpt_neox": "attention.query_key_value"}
_HF_LAYER_RE = re.compile(r"(?:h|layers)\.(\d+)\.(.+)\.(weight|bias)")
_LM_LAYER_RE = re.compile(r"blocks\.(\d+)\.(.+)\.(weight|bias)")
# Buffers older checkpoints saved (GPT-2's and GPT-NeoX's causal masks, rotary inv_freq): not weights.
_IGNORED_RE = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)|layers\.\d+\.self_attn\.rotary_emb\.inv_freq"
                         r"|layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)")


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------


def hf_model_type(path: str | Path) -> str | None:
    """The `model_type` in a `save_pretrained` dir's config.json, or None if it is not one."""
    config = Path(path) / CONFIG_FILE
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    return data.get("model_type") if isinstance(data, dict) else None


def check_hf_weights(path: Path, state: dict[str, Tensor], source: dict[str, str], expected: Iterable[str],
                     optional: Iterable[Iterable[str]] = ()) -> None:
    """CheckpointError naming what is missing (lmforge names) or unexpected (checkpoint names), or a tensor
    whose shape config.json does not imply. A whole `optional` group (e.g. a BERT head) may be missing."""
    shapes = {k: tuple(v.shape) for k, v in expected.items()} if isinstance(expected, dict) else None
    missing = set(expected) - state.keys()
    for group in optional:
        if missing.issuperset(group):
            missing -= set(group)
    unexpected = sorted({source[k] for k in state.keys() - set(expected)})
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match config.json; missing (lmforge names): "
                              f"{sorted(missing)}; unexpected (checkpoint names): {unexpected}")
    for key, tensor in state.items():
        if shapes is not None and tuple(tensor.shape) != shapes[key]:
            raise CheckpointError(f"{path}: {source[key]} has shape {tuple(tensor.shape)}, "
                                  f"config.json implies {shapes[key]} for {key}")


def is_hf_dir(path: str | Path) -> bool:
    """True for a directory whose config.json names a `model_type` (a `save_pretrained` dir)."""
    return hf_model_type(path) is not None


def require_hf_value(hf: dict[str, Any], key: str, expected: Any, default: Any) -> None:
    value = hf.get(key, default)
    if value != expected:
        raise ConfigError(f"HF config {key}={value!r} is not supported by lmforge (needs {key}={expected!r})")


def hf_activation(hf: dict[str, Any], key: str, default: str) -> str:
    name = hf.get(key) or default
    if name not in ACT_FROM_HF:
        raise ConfigError(f"HF config {key}={name!r} is not supported; supported: {sorted(ACT_FROM_HF)}")
    return ACT_FROM_HF[name]


def _gpt2_fields(hf: dict[str, Any]) -> dict[str, Any]:
    require_hf_value(hf, "scale_attn_weights", True, True)
    require_hf_value(hf, "scale_attn_by_inverse_layer_idx", False, False)
    require_hf_value(hf, "add_cross_attention", False, False)
    d_model = hf_field(hf, "n_embd")
    return dict(
        family="gpt2", vocab_size=hf_field(hf, "vocab_size"), max_seq_len=hf_field(hf, "n_positions"),
        n_layer=hf_field(hf, "n_layer"), n_head=hf_field(hf, "n_head"), d_model=d_model,
        d_ff=hf.get("n_inner") or 4 * d_model, position="learned", norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), norm_placement="pre", mlp="gelu",
        activation=hf_activation(hf, "activation_function", "gelu_new"), attn_bias=True, mlp_bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True), init_std=hf.get("initializer_range", 0.02),
    )


def config_from_hf(hf_config: dict[str, Any]) -> ModelConfig:
    """The `ModelConfig` equivalent to an HF config.json dict of one of SUPPORTED_MODEL_TYPES."""
    model_type = hf_config.get("model_type")
    if model_type == "gpt2":
        fields = _gpt2_fields(hf_config)
    elif model_type in LLAMA_LIKE:
        fields = llama_like_fields(hf_config, model_type, hf_activation(hf_config, "hidden_act", "silu"))
    elif model_type == "gpt_neox":
        fields = neox_fields(hf_config, hf_activation(hf_config, "hidden_act", "gelu"))
    else:
        raise ConfigError(f"HF model_type={model_type!r} unsupported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    try:
        return ModelConfig(**fields)
    except ValidationError as err:
        raise ConfigError(f"HF {model_type} config is not a valid lmforge model: {validation_summary(err)}") from None


def hf_model_type_of(cfg: ModelConfig) -> str:
    """gpt2 for learned positions; for RoPE the family's (llama, mistral, qwen2, qwen3, gpt_neox), else llama;
    raise if any other field does not fit."""
    if cfg.norm_placement != "pre":
        raise ConfigError(f"norm_placement={cfg.norm_placement!r} cannot be exported: HF models are pre-norm")
    if cfg.position == "rope":
        return rope_model_type(cfg)
    if cfg.position == "learned":
        model_type = "gpt2"
        needs = dict(norm="layernorm", mlp="gelu", attn_bias=True, has_qkv_bias=True, mlp_bias=True, qk_norm=False,
                     parallel_residual=False, sliding_window=None, head_dim=cfg.d_model / cfg.n_head)
    else:
        raise ConfigError(f"position={cfg.position!r} cannot be exported (gpt2 is 'learned', the others 'rope')")
    for key, expected in needs.items():
        if getattr(cfg, key) != expected:
            raise ConfigError(f"{key}={getattr(cfg, key)!r} cannot be exported as HF {model_type} "
                              f"(which needs {key}={expected!r})")
    if cfg.kv_heads != cfg.n_head:
        raise ConfigError(f"n_kv_head={cfg.n_kv_head} cannot be exported as HF gpt2 (it has no GQA/MQA)")
    return model_type


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The HF config.json dict for `cfg` (model fields only; export_hf adds dtype and token ids)."""
    model_type = hf_model_type_of(cfg)
    common = dict(model_type=model_type, vocab_size=cfg.vocab_size, initializer_range=cfg.init_std,
                  tie_word_embeddings=cfg.tie_embeddings)
    if model_type == "gpt2":
        return dict(
            architectures=["GPT2LMHeadModel"], **common, n_positions=cfg.max_seq_len, n_embd=cfg.d_model,
            n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.ff_dim,
            activation_function=ACT_TO_HF[cfg.activation], layer_norm_epsilon=cfg.norm_eps,
            resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
            scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, add_cross_attention=False,
        )
    return rope_config_to_hf(cfg, model_type, common, ACT_TO_HF[cfg.activation])


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------


def split_fused_qkv(model_type: str, tensor: Tensor, weight: bool, n_head: int) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v weights [out, in] (or biases) of a fused projection: GPT-2's Conv1D [in, 3*out] holds q|k|v,
    GPT-NeoX's Linear [3*out, in] holds each head's q|k|v in turn (rows interleaved per head)."""
    if model_type == "gpt2":
        return (tensor.t() if weight else tensor).chunk(3, dim=0)
    per_head = tensor.unflatten(0, (n_head, 3, -1))  # [H, 3, head_dim, ...]
    return tuple(t.flatten(0, 1) for t in per_head.unbind(1))


def join_fused_qkv(model_type: str, parts: list[Tensor], weight: bool, n_head: int) -> Tensor:
    """The inverse of `split_fused_qkv`."""
    if model_type == "gpt2":
        packed = torch.cat(parts, dim=0)
        return packed.t() if weight else packed
    return torch.stack([t.unflatten(0, (n_head, -1)) for t in parts], dim=1).flatten(0, 2)


def _from_hf_names(model_type: str, weights: dict[str, Tensor],
                   n_head: int) -> tuple[dict[str, Tensor], dict[str, str]]:
    """HF tensors -> lmforge state dict, plus each lmforge key's HF source name (for errors)."""
    state: dict[str, Tensor] = {}
    source: dict[str, str] = {}

    def put(key: str, tensor: Tensor, name: str) -> None:
        state[key], source[key] = tensor, name

    for name, tensor in weights.items():
        key = name.removeprefix(_PREFIX[model_type])
        if name == _HEAD[model_type]:
            put("lm_head.weight", tensor, name)
        elif key in _GLOBAL[model_type]:
            put(_GLOBAL[model_type][key], tensor, name)
        elif _IGNORED_RE.fullmatch(key):
            continue
        elif (m := _HF_LAYER_RE.fullmatch(key)) is None:
            put(name, tensor, name)  # unknown: reported as unexpected
        elif m[2] == _FUSED_QKV.get(model_type):
            if tensor.shape[0 if model_type == "gpt_neox" else -1] % (3 * n_head):
                raise CheckpointError(f"{name} has shape {tuple(tensor.shape)}, which does not split into q, k and v "
                                      f"of the {n_head} heads config.json gives")
            for part, chunk in zip("qkv", split_fused_qkv(model_type, tensor, m[3] == "weight", n_head), strict=True):
                put(f"blocks.{m[1]}.attn.{part}.{m[3]}", chunk, name)
        elif m[2] in _LAYER[model_type]:
            conv1d = model_type == "gpt2" and m[3] == "weight" and m[2] not in ("ln_1", "ln_2")
            put(f"blocks.{m[1]}.{_LAYER[model_type][m[2]]}.{m[3]}", tensor.t() if conv1d else tensor, name)
        else:
            put(name, tensor, name)
    return state, source


def to_hf_names(model: DecoderLM, model_type: str) -> dict[str, Tensor]:
    """lmforge state dict -> HF tensors (contiguous fp32 on CPU; a tied head is written once)."""
    state = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    prefix = _PREFIX[model_type]
    global_names = {lm: hf for hf, lm in _GLOBAL[model_type].items()}
    layer_names = {lm: hf for hf, lm in _LAYER[model_type].items()}
    hf_layer = "h" if model_type == "gpt2" else "layers"
    out: dict[str, Tensor] = {}
    for key, tensor in state.items():
        if key == "lm_head.weight":
            if not model.cfg.tie_embeddings:
                out[_HEAD[model_type]] = tensor
        elif key in global_names:
            out[prefix + global_names[key]] = tensor
        elif (m := _LM_LAYER_RE.fullmatch(key)) is None:
            raise CheckpointError(f"no HF {model_type} name for lmforge weight '{key}'")
        elif model_type in _FUSED_QKV and m[2] in ("attn.q", "attn.k", "attn.v"):
            if m[2] == "attn.q":
                parts = [state[f"blocks.{m[1]}.attn.{p}.{m[3]}"] for p in "qkv"]
                fused = join_fused_qkv(model_type, parts, m[3] == "weight", model.cfg.n_head)
                out[f"{prefix}{hf_layer}.{m[1]}.{_FUSED_QKV[model_type]}.{m[3]}"] = fused
        else:
            hf_module = layer_names[m[2]]
            conv1d = model_type == "gpt2" and m[3] == "weight" and m[2] not in ("attn_norm", "mlp_norm")
            out[f"{prefix}{hf_layer}.{m[1]}.{hf_module}.{m[3]}"] = tensor.t() if conv1d else tensor
    return {k: v.contiguous() for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# Load / export
# ---------------------------------------------------------------------------------------------


def load_hf(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[DecoderLM, Tokenizer | None]:
    """Load an HF directory of one of SUPPORTED_MODEL_TYPES as an eval-mode `DecoderLM` in `dtype` (+ its
    tokenizer.json, if any). Each tensor is converted as it is read and becomes the model's parameter itself: a bf16
    load of a 1B model holds ~2 GB, never an fp32 copy."""
    path = Path(path)
    if not is_hf_dir(path):
        raise CheckpointError(f"{path}: not a Hugging Face model dir (no {CONFIG_FILE} with a model_type)")
    hf_config = json.loads((path / CONFIG_FILE).read_text())
    cfg = config_from_hf(hf_config)
    state, source = _from_hf_names(hf_config["model_type"], read_hf_weights(path, dtype), cfg.n_head)
    with torch.device("meta"):
        expected = DecoderLM(cfg).state_dict()
    if cfg.tie_embeddings:  # transformers ties the head to the embedding, ignoring any saved head
        state.pop("lm_head.weight", None)
        if "tok_emb.weight" in state:
            state["lm_head.weight"] = state["tok_emb.weight"]
    check_hf_weights(path, state, source, expected)
    model = DecoderLM.holding(cfg, {k: v.contiguous() for k, v in state.items()})
    tokenizer = Tokenizer.from_file(path) if (path / TOKENIZER_FILE).is_file() else None
    return model.eval(), tokenizer


def require_tokenizer_fits(tokenizer: Tokenizer | None, vocab_size: int) -> None:
    """An exported model must have an embedding row for every token of its tokenizer."""
    if tokenizer is not None and tokenizer.vocab_size > vocab_size:
        raise ConfigError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {vocab_size}")


@dataclass(frozen=True)
class HFHead:
    """A task head under transformers' names: its model class, its tensors and the config.json keys it needs."""

    architecture: str
    tensors: dict[str, Tensor]
    config: dict[str, Any]


def with_eos_template(tokenizer: Tokenizer) -> Tokenizer:
    """A copy of `tokenizer` whose post-processor appends EOS (A EOS, pairs A EOS B EOS), for exports of models lmforge
    fed `text EOS`: T5's inputs, a decoder classifier's texts. lmforge itself encodes without it."""
    copy = Tokenizer(HFTokenizer.from_str(tokenizer.backend.to_str()))
    if tokenizer.eos_id is not None:
        eos = tokenizer.backend.id_to_token(tokenizer.eos_id)
        copy.backend.post_processor = processors.TemplateProcessing(
            single=f"$A {eos}", pair=f"$A {eos} $B:1 {eos}:1", special_tokens=[(eos, tokenizer.eos_id)])
    return copy


def write_hf_tokenizer(tokenizer: Tokenizer, path: Path, max_len: int,
                       chat_template: ChatTemplate | None = None) -> dict[str, int | None]:
    """tokenizer.json and tokenizer_config.json (with the chat template as Jinja) for a decoder, as
    `AutoTokenizer` reads them; returns the bos/eos/pad token ids."""
    source = None if chat_template is None else jinja_chat_template(chat_template)  # may refuse: before writing
    tokenizer.save(path)
    ids = dict(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    tok_config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
                                  "clean_up_tokenization_spaces": False}
    for role in ("bos", "eos", "pad"):
        if ids[f"{role}_token_id"] is not None:
            tok_config[f"{role}_token"] = tokenizer.backend.id_to_token(ids[f"{role}_token_id"])
    if source is not None:
        tok_config["chat_template"] = source
    atomic_write_text(path / TOKENIZER_CONFIG_FILE, json.dumps(tok_config, indent=2) + "\n")
    return ids


def export_hf(model: DecoderLM, tokenizer: Tokenizer | None, path: str | Path,
              chat_template: ChatTemplate | None = None, head: HFHead | None = None,
              max_shard_bytes: int | None = None) -> Path:
    """Write `path` as an HF `save_pretrained` dir (float32; sharded with `max_shard_bytes`); config.json is written
    last.

    A causal LM gets generation_config.json, whose `eos_token_id` lists every token that ends a reply in
    `chat_template` (end of turn and EOS), so transformers' generate stops where lmforge does; the template
    itself goes into tokenizer_config.json. With `head`, the backbone is written under the head's class
    (e.g. GPT2ForSequenceClassification) instead of the LM head."""
    path = Path(path)
    cfg = model.cfg
    hf_config = config_to_hf(cfg)
    require_tokenizer_fits(tokenizer, cfg.vocab_size)
    if chat_template is not None and tokenizer is None:
        raise ConfigError("a chat template needs the tokenizer it renders with; pass the model's tokenizer")
    weights = to_hf_names(model, hf_config["model_type"])
    if head is not None:
        weights.pop(_HEAD[hf_config["model_type"]], None)
        weights |= {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in head.tensors.items()}
        hf_config.update(head.config, architectures=[head.architecture])
    ids: dict[str, Any] = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if tokenizer is not None:
        ids = write_hf_tokenizer(tokenizer, path, cfg.max_seq_len, chat_template)
    write_hf_weights(weights, path, max_shard_bytes)
    if tokenizer is None:  # files an earlier export left would otherwise be picked up
        for name in (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE):
            (path / name).unlink(missing_ok=True)
    if head is None and tokenizer is not None:
        generation = {**ids, "eos_token_id": ending_ids(tokenizer, chat_template) or None}
        atomic_write_text(path / GENERATION_CONFIG_FILE, json.dumps(generation, indent=2) + "\n")
    else:
        (path / GENERATION_CONFIG_FILE).unlink(missing_ok=True)
    hf_config.update(ids, dtype="float32", torch_dtype="float32")
    atomic_write_text(path / CONFIG_FILE, json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    return path
