"""A tiny word corpus as token shards, and a pretrain config of a small decoder on them: the pretraining set-up
the trainer, run-directory, distillation, DDP and position-study tests share."""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

from lmforge.data.shards import prepare_shards
from lmforge.tokenizer import Tokenizer, train_tokenizer

WORDS = "the a king queen sword castle river moon ship wind stone fire bread gold".split()


def word_documents(n: int, seed: int = 0) -> list[str]:
    """n sentences of 5 to 40 words drawn from WORDS."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) + "." for _ in range(n)]


def write_word_shards(root: Path, n_docs: int, val_fraction: float) -> tuple[Tokenizer, Path]:
    """root/corpus.jsonl of n_docs word documents, a 400-token tokenizer trained on them, and their shards in
    root/shards; returns (tokenizer, shards dir)."""
    docs = word_documents(n_docs)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tok = train_tokenizer(docs, vocab_size=400, show_progress=False)
    prepare_shards([corpus], tok, root / "shards", val_fraction=val_fraction, progress=False)
    return tok, root / "shards"


def write_config(path: Path, shards: Path, out: Path, **train) -> Path:
    """A pretrain config.yaml: a 2-layer decoder on `shards`, 40 steps saving every 3; `train` overrides."""
    cfg = {
        "model": {"vocab_size": 400, "max_seq_len": 32, "n_layer": 2, "n_head": 2, "d_model": 32, "dropout": 0.1},
        "data": {"dir": str(shards)},
        "train": {"out_dir": str(out), "batch_size": 4, "max_steps": 40, "warmup_steps": 5, "save_every": 3,
                  "eval_every": 10, "eval_batches": 2, "log_every": 1, "progress": False, **train},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path
