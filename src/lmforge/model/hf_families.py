"""The RoPE families of Hugging Face checkpoints as `ModelConfig`s, and back: Llama, Mistral, Qwen2, Qwen3, GPT-NeoX.

Each is the one decoder with a few keys set: Mistral slides its attention window (`sliding_window`), Qwen2 puts a bias
on q/k/v only (`qkv_bias`), Qwen3 norms each head's q and k (`qk_norm`, and its own `head_size`), GPT-NeoX runs
attention and MLP side by side (`parallel_residual`) and rotates only part of each head (`rope_fraction`). RoPE
scaling (`linear`, `dynamic`, `llama3`) is read from both ways transformers writes it: `rope_scaling` with a
top-level `rope_theta` (4.x) and `rope_parameters` (5.x); export writes `rope_parameters`, as the installed 5.x reads.
"""

from __future__ import annotations

from typing import Any

from lmforge.config import ModelConfig
from lmforge.errors import ConfigError

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
HF_CLASS_PREFIX = {"gpt2": "GPT2", "llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3",
                   "gpt_neox": "GPTNeoX"}


def hf_field(hf: dict[str, Any], key: str) -> Any:
    if hf.get(key) is None:
        raise ConfigError(f"HF config has no '{key}'")
    return hf[key]


def rope_fields(hf: dict[str, Any], default_fraction: float = 1.0) -> dict[str, Any]:
    """rope_theta, rope_scaling and rope_fraction of an HF config, 4.x or 5.x style."""
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"HF config rope_type={rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    fraction = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", hf.get("rotary_pct")))
    fields = dict(rope_theta=float(params.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 1e4)))),
                  rope_fraction=default_fraction if fraction is None else fraction)
    if rope_type != "default":
        if params.get("factor") is None:
            raise ConfigError(f"HF config rope_type={rope_type!r} has no 'factor'")
        fields["rope_scaling"] = dict(type=rope_type, factor=params["factor"],
                                      original_max_len=params.get("original_max_position_embeddings"),
                                      low_freq_factor=params.get("low_freq_factor", 1.0),
                                      high_freq_factor=params.get("high_freq_factor", 4.0))
    return fields


def _sliding_window(hf: dict[str, Any], model_type: str) -> int | None:
    """Mistral slides every layer's window; Qwen2/3 only with use_sliding_window, from layer max_window_layers on
    (lmforge slides all layers or none)."""
    if model_type == "mistral":
        return hf.get("sliding_window")
    if model_type not in ("qwen2", "qwen3") or not hf.get("use_sliding_window"):
        return None
    n_layer = hf_field(hf, "num_hidden_layers")
    kinds = hf.get("layer_types") or ["sliding_attention" if i >= hf.get("max_window_layers", 28) else
                                      "full_attention" for i in range(n_layer)]
    if len(set(kinds)) > 1:
        raise ConfigError(f"HF config slides the attention window of only some layers (layer_types={kinds}); "
                          "lmforge slides every layer's or none")
    return hf.get("sliding_window") if kinds[0] == "sliding_attention" else None


def llama_like_fields(hf: dict[str, Any], model_type: str, activation: str) -> dict[str, Any]:
    """`ModelConfig` fields of an HF llama, mistral, qwen2 or qwen3 config.json dict."""
    d_model, n_head = hf_field(hf, "hidden_size"), hf_field(hf, "num_attention_heads")
    head_dim = hf.get("head_dim")
    qwen2 = model_type == "qwen2"
    return dict(
        family=model_type, vocab_size=hf_field(hf, "vocab_size"),
        max_seq_len=hf.get("max_position_embeddings", 2048), n_layer=hf_field(hf, "num_hidden_layers"),
        n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head, d_model=d_model,
        head_size=None if head_dim is None or head_dim * n_head == d_model else head_dim,
        d_ff=hf_field(hf, "intermediate_size"), position="rope", **rope_fields(hf), norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6), norm_placement="pre", mlp="swiglu", activation=activation,
        attn_bias=False if qwen2 else hf.get("attention_bias", False), qkv_bias=True if qwen2 else None,
        qk_norm=model_type == "qwen3", mlp_bias=hf.get("mlp_bias", False),
        sliding_window=_sliding_window(hf, model_type), tie_embeddings=hf.get("tie_word_embeddings", False),
        init_std=hf.get("initializer_range", 0.02),
    )


def neox_fields(hf: dict[str, Any], activation: str) -> dict[str, Any]:
    """`ModelConfig` fields of an HF gpt_neox (Pythia) config.json dict."""
    return dict(
        family="gpt_neox", vocab_size=hf_field(hf, "vocab_size"), max_seq_len=hf.get("max_position_embeddings", 2048),
        n_layer=hf_field(hf, "num_hidden_layers"), n_head=hf_field(hf, "num_attention_heads"),
        d_model=hf_field(hf, "hidden_size"), d_ff=hf_field(hf, "intermediate_size"), position="rope",
        **rope_fields(hf, default_fraction=0.25), norm="layernorm", norm_eps=hf.get("layer_norm_eps", 1e-5),
        norm_placement="pre", mlp="gelu", activation=activation, attn_bias=hf.get("attention_bias", True),
        mlp_bias=True, parallel_residual=hf.get("use_parallel_residual", True),
        tie_embeddings=hf.get("tie_word_embeddings", False), init_std=hf.get("initializer_range", 0.02),
    )


def rope_model_type(cfg: ModelConfig) -> str:
    """The HF model_type a RoPE decoder exports as: its family's, else llama; ConfigError naming the first key that
    class cannot express."""
    model_type = cfg.family if cfg.family in (*LLAMA_LIKE, "gpt_neox") else "llama"
    llama_like = dict(norm="rmsnorm", mlp="swiglu", qk_norm=False, parallel_residual=False, rope_fraction=1.0,
                      has_qkv_bias=cfg.attn_bias)
    needs = {
        "llama": dict(llama_like, sliding_window=None),
        "mistral": dict(llama_like, attn_bias=False, mlp_bias=False),
        "qwen2": dict(llama_like, has_qkv_bias=True, attn_bias=False, mlp_bias=False),
        "qwen3": dict(llama_like, qk_norm=True, mlp_bias=False),
        "gpt_neox": dict(norm="layernorm", mlp="gelu", qk_norm=False, mlp_bias=True, has_qkv_bias=cfg.attn_bias,
                         kv_heads=cfg.n_head, head_dim=cfg.d_model / cfg.n_head, sliding_window=None),
    }[model_type]
    for key, expected in needs.items():
        if getattr(cfg, key) != expected:
            raise ConfigError(f"{key}={getattr(cfg, key)!r} cannot be exported as HF {model_type} "
                              f"(which needs {key}={expected!r})")
    return model_type


def _rope_parameters(cfg: ModelConfig) -> dict[str, Any]:
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    scaling = cfg.rope_scaling
    if scaling is not None:
        params |= {"rope_type": scaling.type, "factor": scaling.factor}
        if scaling.type == "llama3":
            params |= {"original_max_position_embeddings": scaling.original_max_len,
                       "low_freq_factor": scaling.low_freq_factor, "high_freq_factor": scaling.high_freq_factor}
    if cfg.rope_fraction != 1.0:
        params["partial_rotary_factor"] = cfg.rope_fraction
    return params


def rope_config_to_hf(cfg: ModelConfig, model_type: str, common: dict[str, Any], hf_activation: str) -> dict[str, Any]:
    """The config.json dict of a RoPE decoder exported as `model_type` (from `rope_model_type`)."""
    shared = dict(architectures=[f"{HF_CLASS_PREFIX[model_type]}ForCausalLM"], **common, hidden_size=cfg.d_model,
                  intermediate_size=cfg.ff_dim, num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                  hidden_act=hf_activation, max_position_embeddings=cfg.max_seq_len, rope_theta=cfg.rope_theta,
                  rope_parameters=_rope_parameters(cfg), attention_dropout=cfg.dropout)
    if model_type == "gpt_neox":
        return dict(shared, layer_norm_eps=cfg.norm_eps, attention_bias=cfg.attn_bias,
                    use_parallel_residual=cfg.parallel_residual, hidden_dropout=cfg.dropout)
    shared |= dict(num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps)
    if model_type == "llama":
        return dict(shared, attention_bias=cfg.attn_bias, mlp_bias=cfg.mlp_bias)
    if model_type == "mistral":
        return dict(shared, sliding_window=cfg.sliding_window)
    window = cfg.sliding_window
    sliding = dict(use_sliding_window=window is not None, sliding_window=window, max_window_layers=0,
                   layer_types=[("full_attention" if window is None else "sliding_attention")] * cfg.n_layer)
    return dict(shared, **sliding, **({} if model_type == "qwen2" else dict(attention_bias=cfg.attn_bias)))
