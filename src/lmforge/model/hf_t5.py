"""Hugging Face interop for T5: import `T5ForConditionalGeneration` checkpoints into `EncDecLM`, export back.

`load_hf_t5(dir)` reads a `save_pretrained` directory (config.json + safetensors) and returns a model
whose fp32 logits match transformers'; `export_hf_t5(model, tok, dir)` writes one that
`T5ForConditionalGeneration.from_pretrained` loads with the same logits. Any HF setting lmforge cannot
honour is a `ConfigError` naming the field. Weights load as float32; dropout is exported, never imported.

The head: T5 (v1.0) ties it to the shared embedding and rescales the decoder output by d_model^-1/2;
T5 v1.1 / Flan-T5 use an untied, unscaled head. transformers >= 5 writes `scale_decoder_outputs` for the
rescaling and may tie even an unscaled head (then no `lm_head.weight` is saved): lmforge loads that as an
untied head holding a copy of the embedding, which gives the same logits.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors.torch import save_file
from torch import Tensor

from lmforge.config import EncDecConfig
from lmforge.config_loading import validation_summary
from lmforge.errors import CheckpointError, ConfigError
from lmforge.io import atomic_write, atomic_write_text
from lmforge.model.encdec import EncDecLM
from lmforge.model.hf import (
    CONFIG_FILE,
    TOKENIZER_CONFIG_FILE,
    check_hf_weights,
    hf_field,
    is_hf_dir,
    require_hf_value,
    require_tokenizer_fits,
    with_eos_template,
)
from lmforge.model.hf_weight_files import WEIGHTS_FILE, read_hf_weights
from lmforge.tokenizer import TOKENIZER_FILE, Tokenizer

# feed_forward_proj's activation -> lmforge's. HF maps "gated-gelu" alone to gelu_new (tanh approximation).
ACT_FROM_HF = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                "silu": "silu", "swish": "silu"}
ACT_TO_HF = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new", "silu": "silu"}

_GLOBAL = {"shared.weight": "tok_emb.weight", "lm_head.weight": "lm_head.weight",
           "encoder.final_layer_norm.weight": "encoder.final_norm.weight",
           "decoder.final_layer_norm.weight": "decoder.final_norm.weight",
           "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": "encoder.rel_bias.weight",
           "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": "decoder.rel_bias.weight"}
_HF_BLOCK_RE = re.compile(r"(encoder|decoder)\.block\.(\d+)\.(.+)\.weight")
_LM_BLOCK_RE = re.compile(r"(encoder|decoder)\.blocks\.(\d+)\.(.+)\.weight")
# Copies of `shared` older checkpoints saved, and a cross-attention bias table T5 never uses.
_IGNORED_RE = re.compile(r"(encoder|decoder)\.embed_tokens\.weight|"
                         r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight")


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------


def _mlp_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """feed_forward_proj "ACT" or "gated-ACT" (is_gated_act and dense_act_fn are derived from it, as HF does)."""
    proj = hf.get("feed_forward_proj", "relu")
    parts = proj.split("-") if isinstance(proj, str) else []
    gated = len(parts) == 2 and parts[0] == "gated"
    act = "gelu_new" if proj == "gated-gelu" else parts[-1] if parts else None
    if not (len(parts) == 1 or gated) or act not in ACT_FROM_HF:
        raise ConfigError(f"HF config feed_forward_proj={proj!r} is not supported; use 'ACT' or 'gated-ACT' "
                          f"with ACT one of {sorted(ACT_FROM_HF)}")
    if hf.get("is_gated_act", gated) != gated:
        raise ConfigError(f"HF config is_gated_act={hf['is_gated_act']!r} contradicts feed_forward_proj={proj!r}")
    return dict(activation=ACT_FROM_HF[act], gated=gated)


def scales_decoder_output(hf: dict[str, Any]) -> bool:
    """Whether HF rescales the decoder output by d_model^-1/2 (transformers >= 5 says so explicitly)."""
    if "scale_decoder_outputs" in hf:
        return bool(hf["scale_decoder_outputs"])
    return hf.get("tie_word_embeddings", True) is not False


def config_from_hf_t5(hf_config: dict[str, Any]) -> EncDecConfig:
    """The `EncDecConfig` equivalent to an HF t5 config.json dict."""
    hf = hf_config
    if hf.get("model_type") != "t5":
        raise ConfigError(f"HF model_type={hf.get('model_type')!r} unsupported (supported: 't5')")
    require_hf_value(hf, "is_encoder_decoder", True, True)
    start = hf.get("decoder_start_token_id")
    start = hf.get("pad_token_id") if start is None else start
    if start is None:
        raise ConfigError("HF config has no 'decoder_start_token_id' (nor a 'pad_token_id' to start from)")
    n_layer = hf_field(hf, "num_layers")
    n_decoder_layer = hf.get("num_decoder_layers")
    fields = dict(
        vocab_size=hf_field(hf, "vocab_size"), max_seq_len=hf.get("n_positions") or 512, n_layer=n_layer,
        n_decoder_layer=None if n_decoder_layer == n_layer else n_decoder_layer,
        n_head=hf_field(hf, "num_heads"), head_dim=hf_field(hf, "d_kv"), d_model=hf_field(hf, "d_model"),
        d_ff=hf_field(hf, "d_ff"), **_mlp_fields(hf),
        relative_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_max_distance=hf.get("relative_attention_max_distance", 128),
        norm_eps=hf.get("layer_norm_epsilon", 1e-6), tie_embeddings=scales_decoder_output(hf),
        init_std=hf.get("initializer_factor", 1.0), decoder_start_id=start,
    )
    try:
        return EncDecConfig(**fields)
    except ValidationError as err:
        raise ConfigError(f"HF t5 config is not a valid lmforge model: {validation_summary(err)}") from None


def config_to_hf_t5(cfg: EncDecConfig) -> dict[str, Any]:
    """The HF config.json dict for `cfg` (export_hf_t5 adds dtype and token ids)."""
    act = ACT_TO_HF[cfg.activation]
    if cfg.gated and cfg.activation == "gelu":
        raise ConfigError("activation='gelu' (exact) with gated=True cannot be exported: HF reads "
                          "feed_forward_proj='gated-gelu' as the tanh approximation (use activation='gelu_tanh')")
    proj = ("gated-gelu" if act == "gelu_new" else f"gated-{act}") if cfg.gated else act
    return dict(
        architectures=["T5ForConditionalGeneration"], model_type="t5", is_encoder_decoder=True,
        vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, d_model=cfg.d_model, d_kv=cfg.head_dim,
        d_ff=cfg.d_ff, num_layers=cfg.n_layer, num_decoder_layers=cfg.decoder_layers, num_heads=cfg.n_head,
        feed_forward_proj=proj, relative_attention_num_buckets=cfg.relative_buckets,
        relative_attention_max_distance=cfg.relative_max_distance, layer_norm_epsilon=cfg.norm_eps,
        dropout_rate=cfg.dropout, initializer_factor=cfg.init_std, tie_word_embeddings=cfg.tie_embeddings,
        scale_decoder_outputs=cfg.tie_embeddings, decoder_start_token_id=cfg.decoder_start_id,
    )


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------


def _block_names(stack: str, gated: bool) -> dict[str, str]:
    """HF module names inside one block of `stack` -> lmforge's. T5Block.layer holds the sublayers in order:
    self-attention, cross-attention (decoder only), MLP (`wi`, or `wi_0` gate and `wi_1` up when gated)."""
    mlp = "layer.2" if stack == "decoder" else "layer.1"
    names = {"layer.0.layer_norm": "attn_norm", f"{mlp}.layer_norm": "mlp_norm",
             f"{mlp}.DenseReluDense.wo": "mlp.down",
             **{f"layer.0.SelfAttention.{p}": f"attn.{p}" for p in "qkvo"}}
    if gated:
        names.update({f"{mlp}.DenseReluDense.wi_0": "mlp.gate", f"{mlp}.DenseReluDense.wi_1": "mlp.up"})
    else:
        names[f"{mlp}.DenseReluDense.wi"] = "mlp.up"
    if stack == "decoder":
        names.update({"layer.1.layer_norm": "cross_norm",
                      **{f"layer.1.EncDecAttention.{p}": f"cross_attn.{p}" for p in "qkvo"}})
    return names


def _from_hf_names(weights: dict[str, Tensor], gated: bool) -> tuple[dict[str, Tensor], dict[str, str]]:
    """HF tensors -> lmforge state dict, plus each lmforge key's HF source name (for errors)."""
    blocks = {stack: _block_names(stack, gated) for stack in ("encoder", "decoder")}
    state: dict[str, Tensor] = {}
    source: dict[str, str] = {}
    for name, tensor in weights.items():
        key = name
        if name in _GLOBAL:
            key = _GLOBAL[name]
        elif _IGNORED_RE.fullmatch(name):
            continue
        elif (m := _HF_BLOCK_RE.fullmatch(name)) and m[3] in blocks[m[1]]:
            key = f"{m[1]}.blocks.{m[2]}.{blocks[m[1]][m[3]]}.weight"
        state[key], source[key] = tensor, name  # an unknown name stays as is: reported as unexpected
    return state, source


def _to_hf_names(model: EncDecLM) -> dict[str, Tensor]:
    """lmforge state dict -> HF tensors (contiguous fp32 on CPU)."""
    global_names = {lm: hf for hf, lm in _GLOBAL.items()}
    blocks = {stack: {lm: hf for hf, lm in _block_names(stack, model.cfg.gated).items()}
              for stack in ("encoder", "decoder")}
    out: dict[str, Tensor] = {}
    for key, tensor in model.state_dict().items():
        if key in global_names:
            name = global_names[key]
        elif (m := _LM_BLOCK_RE.fullmatch(key)) is not None and m[3] in blocks[m[1]]:
            name = f"{m[1]}.block.{m[2]}.{blocks[m[1]][m[3]]}.weight"
        else:
            raise CheckpointError(f"no HF t5 name for lmforge weight '{key}'")
        out[name] = tensor.detach().to("cpu", torch.float32).contiguous()
    return out


# ---------------------------------------------------------------------------------------------
# Load / export
# ---------------------------------------------------------------------------------------------


def load_hf_t5(path: str | Path) -> tuple[EncDecLM, Tokenizer | None]:
    """Load an HF t5 directory as an eval-mode `EncDecLM` (+ its tokenizer.json, if any)."""
    path = Path(path)
    if not is_hf_dir(path):
        raise CheckpointError(f"{path}: not a Hugging Face model dir (no {CONFIG_FILE} with a model_type)")
    cfg = config_from_hf_t5(json.loads((path / CONFIG_FILE).read_text()))
    state, source = _from_hf_names(read_hf_weights(path), cfg.gated)
    head, emb = state.get("lm_head.weight"), state.get("tok_emb.weight")
    if cfg.tie_embeddings:
        if head is not None and emb is not None and not torch.equal(head, emb):
            raise ConfigError(f"{path}: tie_word_embeddings/scale_decoder_outputs say the head is the (rescaled) "
                              "shared embedding, but lm_head.weight differs from it; lmforge cannot load a "
                              "rescaled untied head")
        state.pop("lm_head.weight", None)
    elif head is None and emb is not None:  # transformers >= 5 ties an unscaled head without saving it
        state["lm_head.weight"], source["lm_head.weight"] = emb.clone(), "shared.weight"
    model = EncDecLM(cfg)
    expected = model.state_dict()
    check_hf_weights(path, state, source, expected)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    tokenizer = Tokenizer.from_file(path) if (path / TOKENIZER_FILE).is_file() else None
    return model.eval(), tokenizer


def export_hf_t5(model: EncDecLM, tokenizer: Tokenizer | None, path: str | Path) -> Path:
    """Write `path` as an HF `save_pretrained` dir (float32) for T5ForConditionalGeneration; config.json last.

    Without a tokenizer the pad id is the decoder start id (T5 starts decoding from pad) and there is no EOS."""
    path = Path(path)
    cfg = model.cfg
    hf_config = config_to_hf_t5(cfg)
    require_tokenizer_fits(tokenizer, cfg.vocab_size)
    weights = _to_hf_names(model)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / WEIGHTS_FILE, lambda p: save_file(weights, str(p), metadata={"format": "pt"}))
    ids = dict(eos_token_id=None, pad_token_id=cfg.decoder_start_id)
    if tokenizer is None:  # a stale tokenizer from an earlier export would otherwise be picked up
        for name in (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE):
            (path / name).unlink(missing_ok=True)
    else:
        with_eos_template(tokenizer).save(path)  # transformers appends EOS to inputs, as lmforge trained with
        ids = dict(eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
        if ids["pad_token_id"] is None:
            ids["pad_token_id"] = cfg.decoder_start_id
        tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_seq_len,
                      "clean_up_tokenization_spaces": False}
        for role in ("eos", "pad"):
            if ids[f"{role}_token_id"] is not None:
                tok_config[f"{role}_token"] = tokenizer.backend.id_to_token(ids[f"{role}_token_id"])
        atomic_write_text(path / TOKENIZER_CONFIG_FILE, json.dumps(tok_config, indent=2) + "\n")
    hf_config.update(ids, dtype="float32", torch_dtype="float32")
    atomic_write_text(path / CONFIG_FILE, json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    return path
