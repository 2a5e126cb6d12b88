"""Typed configs (pydantic): the model, training, data and PEFT sections every recipe validates.

`lmforge.config_loading` reads them from YAML plus dotted command-line overrides.
"""

from __future__ import annotations

import math
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# Family defaults; any field given explicitly wins over its family's default.
MODEL_FAMILIES: dict[str, dict[str, Any]] = {
    "gpt2": dict(position="learned", norm="layernorm", mlp="gelu", activation="gelu_tanh",
                 attn_bias=True, mlp_bias=True, tie_embeddings=True, norm_eps=1e-5),
    "llama": dict(position="rope", norm="rmsnorm", mlp="swiglu", activation="silu",
                  attn_bias=False, mlp_bias=False, tie_embeddings=False, norm_eps=1e-5),
}
# The other Hugging Face families are Llama with one or two keys changed (model/hf_families.py maps them).
MODEL_FAMILIES |= {
    "mistral": MODEL_FAMILIES["llama"],  # + sliding_window
    "qwen2": {**MODEL_FAMILIES["llama"], "qkv_bias": True, "norm_eps": 1e-6},
    "qwen3": {**MODEL_FAMILIES["llama"], "qk_norm": True, "norm_eps": 1e-6},
    "gpt_neox": dict(position="rope", norm="layernorm", mlp="gelu", activation="gelu", attn_bias=True,
                     mlp_bias=True, tie_embeddings=False, norm_eps=1e-5, parallel_residual=True, rope_fraction=0.25),
}


class RopeScaling(StrictModel):
    """RoPE context extension, as Hugging Face configs name it: `linear` divides positions by `factor`; `dynamic`
    (NTK) grows the base once a forward reaches past max_seq_len; `llama3` (Llama 3.1) divides the low frequencies
    by `factor`, keeps the high ones and blends those between, measured against `original_max_len`."""

    type: Literal["linear", "dynamic", "llama3"]
    factor: float = Field(gt=0)
    original_max_len: int | None = Field(None, ge=1)  # llama3: the pre-extension context (HF's
    # original_max_position_embeddings)
    low_freq_factor: float = Field(1.0, gt=0)
    high_freq_factor: float = Field(4.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> RopeScaling:
        if self.type == "llama3" and self.original_max_len is None:
            raise ValueError("rope_scaling type llama3 needs original_max_len (the context before extension)")
        if self.type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"rope_scaling high_freq_factor={self.high_freq_factor} must exceed "
                             f"low_freq_factor={self.low_freq_factor}")
        return self


FAMILY_KEY_DEFAULTS = {"head_size": None, "rope_scaling": None, "rope_fraction": 1.0, "sliding_window": None,
                       "qkv_bias": None, "qk_norm": False, "parallel_residual": False}


class ModelConfig(StrictModel):
    """A decoder-only Transformer; `family` fills in the defaults of GPT-2, Llama, Mistral, Qwen2, Qwen3 or
    GPT-NeoX (and names the Hugging Face class it exports to)."""

    arch: Literal["decoder"] = "decoder"
    family: Literal["gpt2", "llama", "mistral", "qwen2", "qwen3", "gpt_neox", "custom"] = "gpt2"
    vocab_size: int = Field(1024, ge=1)
    max_seq_len: int = Field(256, ge=1)
    n_layer: int = Field(4, ge=1)
    n_head: int = Field(4, ge=1)
    n_kv_head: int | None = Field(None, ge=1)  # None = n_head (MHA); 1 = MQA; in between = GQA
    d_model: int = Field(128, ge=1)
    head_size: int | None = Field(None, ge=1)  # width of each q/k/v head; None = d_model / n_head (Qwen3 differs)
    d_ff: int | None = Field(None, ge=1)  # None = 4*d_model (gelu) or the Llama rule (swiglu)
    position: Literal["learned", "sinusoidal", "rope", "alibi", "none"] = "learned"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rope_fraction: float = Field(1.0, gt=0.0, le=1.0)  # the leading share of each head RoPE rotates (GPT-NeoX)
    sliding_window: int | None = Field(None, ge=1)  # each query sees only the last this-many positions (Mistral)
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    norm_placement: Literal["pre", "post"] = "pre"
    mlp: Literal["gelu", "swiglu"] = "gelu"
    activation: Literal["gelu", "gelu_tanh", "silu", "relu"] = "gelu_tanh"
    attn_bias: bool = True
    qkv_bias: bool | None = None  # bias on q/k/v; None = attn_bias (Qwen2: q/k/v yes, output no)
    qk_norm: bool = False  # a norm (of kind `norm`) over each head's q and k before RoPE (Qwen3)
    parallel_residual: bool = False  # x + attn(norm1(x)) + mlp(norm2(x)) (GPT-NeoX) instead of one after the other
    mlp_bias: bool = True
    tie_embeddings: bool = True
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    init_std: float = 0.02

    @model_serializer(mode="wrap")
    def _omit_family_keys_left_at_default(self, handler: Any) -> dict[str, Any]:
        """The keys the Hugging Face families added are written only when set, so a checkpoint that does not use
        them keeps the config.yaml layout earlier lmforge versions read."""
        return {k: v for k, v in handler(self).items() if k not in FAMILY_KEY_DEFAULTS or v != FAMILY_KEY_DEFAULTS[k]}

    @model_validator(mode="before")
    @classmethod
    def _apply_family(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("family") in MODEL_FAMILIES:
            return {**MODEL_FAMILIES[data["family"]], **data}
        return data

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        if self.head_size is None and self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_head={self.n_head} (or set head_size)")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head={self.n_head} must be divisible by n_kv_head={self.kv_heads}")
        if self.position == "rope" and (self.rotary_dim % 2 or self.rotary_dim < 2):
            raise ValueError(f"rope needs an even number (>= 2) of rotated dims, got {self.rotary_dim} "
                             f"(head dim {self.head_dim} x rope_fraction {self.rope_fraction})")
        if self.sliding_window is not None and self.sliding_window > self.max_seq_len:
            raise ValueError(f"sliding_window={self.sliding_window} is larger than the context "
                             f"max_seq_len={self.max_seq_len}; set sliding_window <= max_seq_len, or null for full "
                             "attention")
        if self.parallel_residual and self.norm_placement != "pre":
            raise ValueError("parallel_residual needs norm_placement='pre'")
        return self

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.head_size or self.d_model // self.n_head

    @property
    def rotary_dim(self) -> int:
        """How many leading dims of each head RoPE rotates (as transformers rounds it: down)."""
        return int(self.head_dim * self.rope_fraction)

    @property
    def has_qkv_bias(self) -> bool:
        return self.attn_bias if self.qkv_bias is None else self.qkv_bias

    @property
    def ff_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.mlp == "swiglu":  # Llama: 2/3 of 4d, rounded up to a multiple of 32
            return -(-int(8 * self.d_model / 3) // 32) * 32
        return 4 * self.d_model


class TrainConfig(StrictModel):
    """The shared training loop's settings (every training stage uses these)."""

    out_dir: str = "runs/pretrain"
    seed: int = 1337
    batch_size: int = 16
    seq_len: int | None = None  # None = model.max_seq_len
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # bf16/fp16: autocast over fp32 master weights
    # fp16 only: dynamic loss scaling (torch.amp.GradScaler). A step with inf/nan gradients is skipped and the
    # scale halved; after loss_scale_growth_interval good steps in a row it doubles
    loss_scale_init: float = Field(2.0**16, gt=0)
    loss_scale_growth_interval: int = Field(2000, ge=1)
    activation_checkpointing: bool = False  # recompute each block's activations in the backward: less memory
    compile: bool = False  # torch.compile the training forward (pays for Llama blocks; costs a warm-up)
    # CPU, fp32 or bf16: each MLP's activation (tanh-GELU, SiLU, gated) as one compiled kernel each way where it spans
    # at least 2^20 elements; the first use in a process costs a warm-up of seconds (model/compiled_activation.py)
    compile_activations: bool = True
    # FLOP/s of one device for the logged MFU (model FLOPs utilisation); None: a square matmul's rate measured once
    peak_flops: float | None = Field(None, gt=0)
    parallel: Literal["ddp", "fsdp"] = "ddp"  # under torchrun: replicate the model (DDP) or shard it (FSDP2)
    device: str = "auto"  # auto | cpu | cuda | cuda:1 | mps
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    tensorboard: bool = False
    progress: bool = True
    # early stopping: end the run when the validation loss has not fallen by more than early_stopping_min_delta
    # below its best for this many evaluations in a row (0 = off; evaluations come every eval_every steps)
    early_stopping_patience: int = Field(0, ge=0)
    early_stopping_min_delta: float = Field(0.0, ge=0.0)

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        for name in ("batch_size", "grad_accum", "max_steps", "eval_every", "save_every", "log_every",
                     "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr={self.min_lr} must not exceed lr={self.lr}")
        return self


class DataSource(StrictModel):
    """One source of a pretraining mixture: a `lmforge data prepare` directory and its sampling weight."""

    dir: str
    weight: float


class DataConfig(StrictModel):
    dir: str = "runs/data"  # token shards written by `lmforge data prepare`
    # A mixture instead of `dir` (as LLaMA's data table): name -> {dir, weight}; each training row comes from a source
    # with probability weight / sum of weights (see lmforge.data.mixture). Empty: `dir` alone.
    sources: dict[str, DataSource] = {}

    @model_validator(mode="after")
    def _check_weights(self) -> DataConfig:
        for name, source in self.sources.items():
            if not (math.isfinite(source.weight) and source.weight >= 0):
                raise ValueError(f"data.sources.{name}.weight={source.weight} must be a finite number >= 0 (a "
                                 "sampling weight; the weights need not sum to 1)")
        if self.sources and sum(source.weight for source in self.sources.values()) <= 0:
            weights = ", ".join(f"{name}={source.weight}" for name, source in self.sources.items())
            raise ValueError(f"data.sources weights ({weights}) sum to 0; give at least one source a positive weight")
        return self


DecoderConfig = ModelConfig


class EncoderConfig(StrictModel):
    """A BERT-style bidirectional encoder: token + segment + learned positions, post-norm, MLM head."""

    arch: Literal["encoder"] = "encoder"
    vocab_size: int = Field(1024, ge=1)
    max_seq_len: int = Field(256, ge=1)
    type_vocab_size: int = Field(2, ge=1)  # segments (sentence A / B)
    n_layer: int = Field(4, ge=1)
    n_head: int = Field(4, ge=1)
    d_model: int = Field(128, ge=1)
    d_ff: int | None = Field(None, ge=1)  # None = 4*d_model
    activation: Literal["gelu", "gelu_tanh", "relu", "silu"] = "gelu"
    norm_eps: float = 1e-12
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    init_std: float = 0.02
    nsp: bool = False  # next-sentence-prediction head (BERT's second objective), off by default

    @model_validator(mode="after")
    def _check_shapes(self) -> EncoderConfig:
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_head={self.n_head}")
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def ff_dim(self) -> int:
        return self.d_ff or 4 * self.d_model


class EncDecConfig(StrictModel):
    """A T5-style encoder-decoder: RMSNorm without bias, bucketed relative position bias, no attention scaling."""

    arch: Literal["encdec"] = "encdec"
    vocab_size: int = Field(1024, ge=1)
    max_seq_len: int = Field(512, ge=1)  # longest input/target lmforge accepts (relative positions have no table)
    n_layer: int = Field(2, ge=1)  # encoder layers
    n_decoder_layer: int | None = Field(None, ge=1)  # None = n_layer
    n_head: int = Field(4, ge=1)
    head_dim: int = Field(32, ge=1)  # T5's d_kv: need not be d_model / n_head
    d_model: int = Field(128, ge=1)
    d_ff: int = Field(512, ge=1)
    activation: Literal["relu", "gelu_tanh", "gelu", "silu"] = "relu"
    gated: bool = False  # T5 v1.1 / Flan-T5 use a gated-GELU MLP
    relative_buckets: int = Field(32, ge=2)
    relative_max_distance: int = Field(128, ge=2)
    norm_eps: float = 1e-6
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    tie_embeddings: bool = True  # tied: decoder output scaled by d_model**-0.5 before the head, as T5 does
    init_std: float = 1.0  # T5 scales its init per tensor; see EncDecLM.reset_parameters
    decoder_start_id: int = 2  # T5 starts decoding from the pad token; lmforge's <|pad|> is id 2

    @property
    def decoder_layers(self) -> int:
        return self.n_decoder_layer or self.n_layer


AnyModelConfig = Annotated[ModelConfig | EncoderConfig | EncDecConfig, Field(discriminator="arch")]


def with_default_arch(tree: Any) -> Any:
    """A model section without `arch` is a decoder (configs written before encoders existed)."""
    if isinstance(tree, dict) and "arch" not in tree:
        return {**tree, "arch": "decoder"}
    return tree


class PretrainConfig(StrictModel):
    model: AnyModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    objective: Literal["clm", "mlm", "span"] = "clm"  # must fit the architecture: decoder/encoder/encdec
    # continued pretraining / mid-training: start from this run's (or Hugging Face dir's) weights, with its
    # architecture in place of `model`, and a fresh optimizer and schedule
    init_from: str = ""

    @model_validator(mode="before")
    @classmethod
    def _default_arch(cls, data: Any) -> Any:
        if isinstance(data, dict) and "model" in data:
            return {**data, "model": with_default_arch(data["model"])}
        return data

    @model_validator(mode="after")
    def _objective_fits_arch(self) -> PretrainConfig:
        wanted = OBJECTIVE_ARCH[self.objective]
        if self.model.arch != wanted:
            raise ValueError(f"objective '{self.objective}' trains a model.arch '{wanted}', but model.arch is "
                             f"'{self.model.arch}'; set --model.arch={wanted} or pick the objective of that arch "
                             f"({', '.join(o for o, a in OBJECTIVE_ARCH.items() if a == self.model.arch)})")
        return self


LoraMethod = Literal["lora", "dora", "pissa", "qlora"]  # low-rank adapters on Linear layers (lmforge.peft.lora)
PeftMethod = Literal[LoraMethod, "adapter", "parallel-adapter", "prefix", "prompt", "bitfit", "topk", "svd-diag"]
LORA_METHODS: tuple[str, ...] = typing.get_args(LoraMethod)
PEFT_METHODS: tuple[str, ...] = typing.get_args(PeftMethod)  # every method `--peft` takes, in this order


class PeftConfig(StrictModel):
    """The method and its hyperparameters; each method reads only its own fields."""

    method: PeftMethod = "lora"
    # LoRA family and svd-diag: the Linear layers to adapt, by name pattern ("attn.q": every block's query
    # projection; "mlp": every Linear inside an mlp; fnmatch wildcards such as "blocks.0.*")
    targets: list[str] = Field(default_factory=lambda: ["attn.q", "attn.k", "attn.v", "attn.o"], min_length=1)
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    qlora_group_size: int = Field(64, ge=2, multiple_of=2)
    qlora_double_quant: bool = False
    # adapters (Houlsby et al. 2019; parallel: He et al. 2022, whose scale s = 4)
    bottleneck: int = Field(16, ge=1)
    adapter_activation: Literal["relu", "gelu", "gelu_tanh", "silu"] = "relu"
    adapter_scale: float = 4.0
    # prefix tuning (Li & Liang 2021) and prompt tuning (Lester et al. 2021)
    prefix_len: int = Field(10, ge=1)
    reparam: bool = True  # train the prefixes through an MLP (fold it away after training)
    reparam_hidden: int = Field(512, ge=1)
    prompt_len: int = Field(20, ge=1)
    # top-k layers
    top_k: int = Field(1, ge=1)

    @property
    def scaling(self) -> float:
        """The LoRA family's s = alpha / r."""
        return self.alpha / self.r


class FinetuneConfig(StrictModel):
    """Task fine-tuning of a pretrained (or, as a baseline, freshly initialised) backbone."""

    task: Literal["classify", "tokens", "span", "text2text"] = "classify"
    base: str = ""  # lmforge run/checkpoint dir or Hugging Face dir
    from_scratch: bool = False  # same architecture, random weights: the baseline pretraining is measured against
    train_file: str = ""
    eval_file: str | None = None
    labels: list[str] | None = None  # the label set (default: every label in train_file, sorted)
    max_len: int = Field(128, ge=2)
    truncate: bool = False  # cut over-long inputs instead of stopping with file:line
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    peft: PeftConfig | None = None  # parameter-efficient fine-tuning of the backbone (the task head always trains)
    train: TrainConfig = TrainConfig(out_dir="runs/finetune", max_steps=300, lr=1e-3, min_lr=1e-4, warmup_steps=20,
                                     batch_size=16, eval_every=100, save_every=100)


# causal LM -> decoder (GPT), masked LM -> encoder (BERT), span corruption -> encoder-decoder (T5)
OBJECTIVE_ARCH = {"clm": "decoder", "mlm": "encoder", "span": "encdec"}
