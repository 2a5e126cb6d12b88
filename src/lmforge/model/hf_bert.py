"""Hugging Face interop for BERT: import `BertModel` / `BertForMaskedLM` / `BertForSequenceClassification`
checkpoints into `EncoderModel`, export back.

`load_hf_bert(dir)` reads a `save_pretrained` directory (weight names with or without the `bert.`
prefix) and returns a model whose fp32 hidden states and MLM logits match transformers'.
`export_hf_bert(model, tok, dir)` writes one that `BertForMaskedLM.from_pretrained` (or, given a task
head, `BertForSequenceClassification` / `BertForTokenClassification`) loads with the same outputs. Any HF
setting lmforge cannot honour is a `ConfigError` naming the field. Weights are loaded as float32.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors
from torch import Tensor

from lmforge.config import EncoderConfig
from lmforge.config_loading import validation_summary
from lmforge.errors import CheckpointError, ConfigError
from lmforge.io import atomic_write, atomic_write_text
from lmforge.model.encoder import EncoderModel
from lmforge.model.hf import (
    ACT_TO_HF,
    CONFIG_FILE,
    TOKENIZER_CONFIG_FILE,
    HFHead,
    check_hf_weights,
    hf_activation,
    hf_field,
    is_hf_dir,
    require_hf_value,
    require_tokenizer_fits,
)
from lmforge.model.hf_weight_files import WEIGHTS_FILE, read_hf_weights
from lmforge.tokenizer import CLS, SEP, TOKENIZER_FILE, Tokenizer

VOCAB_FILE = "vocab.txt"
POOLED_HEADS = {"BertForSequenceClassification": True, "BertForTokenClassification": False}  # class -> has pooler
BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

# HF module (without "bert.") -> lmforge module; per-layer modules below.
_GLOBAL = {
    "embeddings.word_embeddings": "tok_emb", "embeddings.position_embeddings": "pos_emb",
    "embeddings.token_type_embeddings": "type_emb", "embeddings.LayerNorm": "emb_norm", "pooler.dense": "pooler",
}
_HEADS = {"cls.predictions.transform.dense": "mlm_dense", "cls.predictions.transform.LayerNorm": "mlm_norm",
          "cls.seq_relationship": "nsp_head"}
_LAYER = {"attention.self.query": "attn.q", "attention.self.key": "attn.k", "attention.self.value": "attn.v",
          "attention.output.dense": "attn.o", "attention.output.LayerNorm": "attn_norm",
          "intermediate.dense": "mlp.up", "output.dense": "mlp.down", "output.LayerNorm": "mlp_norm"}
_HF_LAYER_RE = re.compile(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)")
_LM_LAYER_RE = re.compile(r"blocks\.(\d+)\.(.+)\.(weight|bias)")
# Buffers some checkpoints saved, and the MLM decoder (tied to the word embeddings; its bias is cls.predictions.bias).
_IGNORED = {"embeddings.position_ids", "embeddings.token_type_ids", "cls.predictions.decoder.weight"}
# Heads a checkpoint may lack (a bare BertModel has no MLM head, BertForMaskedLM no pooler): each is all or nothing.
_OPTIONAL = (("pooler.weight", "pooler.bias"),
             ("mlm_dense.weight", "mlm_dense.bias", "mlm_norm.weight", "mlm_norm.bias", "mlm_bias"),
             ("nsp_head.weight", "nsp_head.bias"))


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------


def config_from_hf_bert(hf_config: dict[str, Any]) -> EncoderConfig:
    """The `EncoderConfig` equivalent to an HF bert config.json dict (no NSP head; `load_hf_bert` adds it)."""
    if hf_config.get("model_type") != "bert":
        raise ConfigError(f"HF model_type={hf_config.get('model_type')!r} unsupported (needs 'bert')")
    require_hf_value(hf_config, "position_embedding_type", "absolute", "absolute")
    require_hf_value(hf_config, "is_decoder", False, False)
    require_hf_value(hf_config, "add_cross_attention", False, False)
    require_hf_value(hf_config, "tie_word_embeddings", True, True)  # lmforge's MLM decoder is the word embedding
    try:
        return EncoderConfig(
            vocab_size=hf_field(hf_config, "vocab_size"), max_seq_len=hf_field(hf_config, "max_position_embeddings"),
            type_vocab_size=hf_field(hf_config, "type_vocab_size"), n_layer=hf_field(hf_config, "num_hidden_layers"),
            n_head=hf_field(hf_config, "num_attention_heads"), d_model=hf_field(hf_config, "hidden_size"),
            d_ff=hf_field(hf_config, "intermediate_size"), activation=hf_activation(hf_config, "hidden_act", "gelu"),
            norm_eps=hf_config.get("layer_norm_eps", 1e-12), init_std=hf_config.get("initializer_range", 0.02),
        )
    except ValidationError as err:
        raise ConfigError(f"HF bert config is not a valid lmforge encoder: {validation_summary(err)}") from None


def config_to_hf_bert(cfg: EncoderConfig) -> dict[str, Any]:
    """The HF bert config.json dict for `cfg` (model fields only; export_hf_bert adds the rest)."""
    return dict(
        model_type="bert", vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head, intermediate_size=cfg.ff_dim, hidden_act=ACT_TO_HF[cfg.activation],
        hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
        max_position_embeddings=cfg.max_seq_len, type_vocab_size=cfg.type_vocab_size,
        initializer_range=cfg.init_std, layer_norm_eps=cfg.norm_eps, position_embedding_type="absolute",
        is_decoder=False, add_cross_attention=False, tie_word_embeddings=True,
    )


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------


def _from_hf_names(weights: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str], dict[str, Tensor]]:
    """HF tensors -> (lmforge state dict, each key's HF source name, classifier tensors)."""
    state: dict[str, Tensor] = {}
    source: dict[str, str] = {}
    extra: dict[str, Tensor] = {}
    for name, tensor in weights.items():
        # Checkpoints converted from the original TF code name LayerNorm parameters gamma/beta.
        key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", name.removeprefix("bert."))
        key = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key)
        module, _, kind = key.rpartition(".")
        if key in _IGNORED:
            continue
        if module == "classifier":
            extra[key] = tensor
            continue
        if key in ("cls.predictions.bias", "cls.predictions.decoder.bias"):  # tied: either name holds it
            lm = "mlm_bias"
        elif module in _GLOBAL:
            lm = f"{_GLOBAL[module]}.{kind}"
        elif module in _HEADS:
            lm = f"{_HEADS[module]}.{kind}"
        elif (m := _HF_LAYER_RE.fullmatch(key)) and m[2] in _LAYER:
            lm = f"blocks.{m[1]}.{_LAYER[m[2]]}.{m[3]}"
        else:
            lm = name  # unknown: reported as unexpected
        state[lm], source[lm] = tensor, name
    return state, source, extra


def _to_hf_names(model: EncoderModel, pooler: bool, mlm: bool) -> dict[str, Tensor]:
    """lmforge state dict -> `bert.`-prefixed HF tensors (contiguous fp32 on CPU), with the chosen heads."""
    layer_names = {lm: hf for hf, lm in _LAYER.items()}
    global_names = {lm: hf for hf, lm in {**_GLOBAL, **_HEADS}.items()}
    out: dict[str, Tensor] = {}
    for key, tensor in model.state_dict().items():
        module, _, kind = key.rpartition(".")
        if key == "mlm_bias":
            hf = "cls.predictions.bias"
        elif (m := _LM_LAYER_RE.fullmatch(key)) is not None:
            hf = f"bert.encoder.layer.{m[1]}.{layer_names[m[2]]}.{m[3]}"
        elif module in global_names:
            hf = global_names[module] + "." + kind
            hf = hf if hf.startswith("cls.") else "bert." + hf
        else:
            raise CheckpointError(f"no HF bert name for lmforge weight '{key}'")
        if (module == "pooler" and not pooler) or (hf.startswith("cls.predictions") and not mlm):
            continue
        out[hf] = tensor.detach().to("cpu", torch.float32).contiguous()
    return out


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def wordpiece_tokenizer(path: str | Path) -> Tokenizer:
    """BERT's WordPiece tokenizer from a dir's vocab.txt, honouring tokenizer_config.json's `do_lower_case`,
    `strip_accents` and `tokenize_chinese_chars`; adds [CLS] A [SEP] (B [SEP]) like BertTokenizerFast."""
    path = Path(path)
    tok_config_file = path / TOKENIZER_CONFIG_FILE
    tok_config = json.loads(tok_config_file.read_text()) if tok_config_file.is_file() else {}
    tokens = (path / VOCAB_FILE).read_text(encoding="utf-8").splitlines()
    vocab = {token: i for i, token in enumerate(tokens)}
    for token in ("[UNK]", "[CLS]", "[SEP]"):
        if token not in vocab:
            raise CheckpointError(f"{path / VOCAB_FILE}: no {token} token")
    backend = HFTokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=tok_config.get("tokenize_chinese_chars", True),
        strip_accents=tok_config.get("strip_accents"), lowercase=tok_config.get("do_lower_case", True),
    )
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    backend.add_special_tokens([t for t in BERT_SPECIAL_TOKENS if t in vocab])
    return with_bert_template(Tokenizer(backend))


def with_bert_template(tokenizer: Tokenizer) -> Tokenizer:
    """A copy of `tokenizer` whose post-processor adds [CLS] A [SEP] (B [SEP], segment 1) as transformers' BERT
    tokenizers do: the layout lmforge feeds encoders (`task_data`). lmforge itself encodes without it."""
    copy = Tokenizer(HFTokenizer.from_str(tokenizer.backend.to_str()))
    cls, sep = tokenizer.token_id(CLS), tokenizer.token_id(SEP)
    if cls is not None and sep is not None:
        copy.backend.post_processor = processors.TemplateProcessing(
            single=f"{CLS} $A {SEP}", pair=f"{CLS} $A {SEP} $B:1 {SEP}:1", special_tokens=[(CLS, cls), (SEP, sep)])
    return copy


# ---------------------------------------------------------------------------------------------
# Load / export
# ---------------------------------------------------------------------------------------------


def load_hf_bert(path: str | Path) -> tuple[EncoderModel, Tokenizer | None, dict[str, Any]]:
    """Load an HF bert dir as an eval-mode `EncoderModel`, its tokenizer (tokenizer.json, else vocab.txt,
    else None) and any classifier head: `{"classifier.weight", "classifier.bias", "num_labels"}` or `{}`.

    Heads the checkpoint lacks stay at their init: the MLM head for a bare `BertModel`, the pooler for
    `BertForMaskedLM`. An NSP head (`cls.seq_relationship`, BertForPreTraining) turns on `cfg.nsp`.
    Padding/truncation saved in tokenizer.json is cleared: lmforge pads and truncates explicitly."""
    path = Path(path)
    if not is_hf_dir(path):
        raise CheckpointError(f"{path}: not a Hugging Face model dir (no {CONFIG_FILE} with a model_type)")
    cfg = config_from_hf_bert(json.loads((path / CONFIG_FILE).read_text()))
    state, source, extra = _from_hf_names(read_hf_weights(path))
    if "nsp_head.weight" in state:
        cfg = cfg.model_copy(update={"nsp": True})
    model = EncoderModel(cfg)
    expected = model.state_dict()
    check_hf_weights(path, state, source, expected, optional=_OPTIONAL)
    model.load_state_dict(state, strict=False)
    if extra:
        weight = extra.get("classifier.weight")
        if weight is None or weight.shape[-1] != cfg.d_model or set(extra) - {"classifier.weight", "classifier.bias"}:
            raise CheckpointError(f"{path}: classifier head {sorted(extra)} is not a [num_labels, {cfg.d_model}] "
                                  "linear layer")
        extra = {k: v.float() for k, v in extra.items()} | {"num_labels": weight.shape[0]}
    tokenizer = None
    if (path / TOKENIZER_FILE).is_file():
        tokenizer = Tokenizer.from_file(path)
        tokenizer.backend.no_padding()
        tokenizer.backend.no_truncation()
    elif (path / VOCAB_FILE).is_file():
        tokenizer = wordpiece_tokenizer(path)
    return model.eval(), tokenizer, extra


def export_hf_bert(model: EncoderModel, tokenizer: Tokenizer | None, path: str | Path,
                   head: HFHead | None = None) -> Path:
    """Write `path` as an HF bert `save_pretrained` dir (float32); config.json is written last.

    Without a head: `BertForMaskedLM` (encoder + MLM head), or `BertForPreTraining` (also pooler + NSP
    head) when `cfg.nsp`. With one (`lmforge.model.hf_heads`): its class, e.g. `BertForSequenceClassification`
    (encoder + pooler + classifier) or `BertForTokenClassification` (encoder + classifier); no MLM head."""
    path = Path(path)
    cfg = model.cfg
    require_tokenizer_fits(tokenizer, cfg.vocab_size)
    hf_config = config_to_hf_bert(cfg)
    if head is not None:
        if head.architecture not in POOLED_HEADS:
            raise ConfigError(f"no BERT head class {head.architecture!r}; supported: {sorted(POOLED_HEADS)}")
        weights = _to_hf_names(model, pooler=POOLED_HEADS[head.architecture], mlm=False)
        weights |= {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in head.tensors.items()}
        hf_config.update(head.config, architectures=[head.architecture])
    else:
        weights = _to_hf_names(model, pooler=cfg.nsp, mlm=True)
        hf_config.update(architectures=["BertForPreTraining" if cfg.nsp else "BertForMaskedLM"])
    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / WEIGHTS_FILE, lambda p: save_file(weights, str(p), metadata={"format": "pt"}))
    pad_id = None
    if tokenizer is None:  # a stale tokenizer from an earlier export would otherwise be picked up
        for name in (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, VOCAB_FILE):
            (path / name).unlink(missing_ok=True)
    else:
        with_bert_template(tokenizer).save(path)  # transformers adds [CLS]/[SEP] as lmforge did in training
        pad_id = tokenizer.pad_id
        tok_config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast",
                                      "model_input_names": ["input_ids", "token_type_ids", "attention_mask"],
                                      "model_max_length": cfg.max_seq_len, "clean_up_tokenization_spaces": False}
        roles = dict(zip(("pad", "unk", "cls", "sep", "mask"), map(tokenizer.token_id, BERT_SPECIAL_TOKENS),
                         strict=True)) | {"pad": pad_id}  # lmforge's own tokenizers name it <|pad|>
        for role, token_id in roles.items():
            if token_id is not None:
                tok_config[f"{role}_token"] = tokenizer.backend.id_to_token(token_id)
        atomic_write_text(path / TOKENIZER_CONFIG_FILE, json.dumps(tok_config, indent=2) + "\n")
    hf_config.update(pad_token_id=pad_id, dtype="float32", torch_dtype="float32")
    atomic_write_text(path / CONFIG_FILE, json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    return path

