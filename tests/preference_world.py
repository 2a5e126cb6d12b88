"""JSONL preference pairs and a random-init tiny decoder base: the world the reward-model and DPO stages learn."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

import lmforge
from lmforge.config import ModelConfig
from lmforge.model.decoder import DecoderLM
from lmforge.tokenizer import train_tokenizer


def write_preference_world(root: Path, n_train: int, n_eval: int, dropout: float = 0.0) -> dict[str, Path]:
    """JSONL pairs whose chosen replies use one set of words and rejected replies another, plus a random-init
    tiny decoder base (with `dropout`) whose tokenizer has lmforge's chat tokens."""
    rng = random.Random(0)
    prompt_words, good, bad = "king queen sword castle".split(), "gold bread fire".split(), "stone wind ship".split()

    def pair() -> dict[str, str]:
        words = [rng.choice(prompt_words) for _ in range(rng.randint(2, 5))]
        return {"prompt": " ".join(words) + "?", "chosen": " ".join(rng.choices(good, k=rng.randint(1, 4))),
                "rejected": " ".join(rng.choices(bad, k=rng.randint(1, 4)))}

    paths = {"train": root / "train.jsonl", "eval": root / "eval.jsonl", "base": root / "base"}
    records = {"train": [pair() for _ in range(n_train)], "eval": [pair() for _ in range(n_eval)]}
    for split, rows in records.items():
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = [t for rows in records.values() for r in rows for t in r.values()]
    tok = train_tokenizer(texts * 3, vocab_size=400, show_progress=False)
    torch.manual_seed(0)
    lmforge.save(DecoderLM(ModelConfig(vocab_size=400, max_seq_len=40, n_layer=1, n_head=2, d_model=32,
                                       dropout=dropout)), tok, paths["base"])
    return paths
