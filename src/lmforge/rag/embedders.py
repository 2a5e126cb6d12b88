"""The models that turn chunks and questions into vectors, each known by a name the index records.

- `all-MiniLM-L6-v2` (also spelt `minilm`; the default): `lmforge.embed` on the packaged sentence-transformers model.
- a sentence-transformers directory of a BERT model: `lmforge.embed` on it; named by its resolved path.
- `mean:RUN`: the fallback without a sentence-embedding model: an lmforge decoder's final hidden states, averaged
  over the text's tokens; named `mean:` + the run's resolved path.

Every embedder gives unit-length float32 rows, so a dot product is the cosine, and tokenises text for the chunker
(its own tokenizer: chunks are counted in the tokens it reads)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from lmforge.errors import ConfigError

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
_ALIASES = {"minilm": DEFAULT_EMBEDDER, DEFAULT_EMBEDDER: DEFAULT_EMBEDDER}
_MEAN = "mean:"
BATCH_SIZE = 32


class Embedder(Protocol):
    name: str  # what the index records; an index is searched only with the embedder of the same name
    max_tokens: int  # the longest text (in its tokens) it reads whole

    def token_offsets(self, text: str) -> list[tuple[int, int]]: ...  # each token's [start, end) in `text`

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...  # [N, D] float32, unit-length rows


def embedder_name(spec: str) -> str:
    """The name an embedder `spec` (minilm, a sentence-transformers dir, mean:RUN) is recorded under; an unusable
    spec is a ConfigError listing the kinds."""
    if spec in _ALIASES:
        return _ALIASES[spec]
    if spec.startswith(_MEAN):
        return _MEAN + str(Path(spec.removeprefix(_MEAN)).resolve())
    if (Path(spec) / "modules.json").is_file():
        return str(Path(spec).resolve())
    raise ConfigError(f"--embedder {spec!r} is not an embedder: use minilm (all-MiniLM-L6-v2, the default), a "
                      "sentence-transformers dir (with modules.json) or mean:RUN (an lmforge decoder's mean-pooled "
                      "hidden states)")


@functools.lru_cache(maxsize=4)
def get_embedder(spec: str) -> Embedder:
    """The embedder of `spec` (see `embedder_name`), loaded once per process."""
    name = embedder_name(spec)
    if name.startswith(_MEAN):
        return HiddenStateEmbedder(name)
    return SentenceEmbedder(name)


def _offsets(backend, text: str) -> list[tuple[int, int]]:
    return list(backend.encode(text, add_special_tokens=False).offsets)


class SentenceEmbedder:
    """`lmforge.embed` on a sentence-transformers dir (the packaged all-MiniLM-L6-v2 when named so)."""

    def __init__(self, name: str):
        from tokenizers import Tokenizer as HFTokenizer

        from lmforge.embedding import embedding_model_dir, load_sentence_encoder

        self.name = name
        self.model_dir = str(embedding_model_dir() if name == DEFAULT_EMBEDDER else Path(name))
        encoder = load_sentence_encoder(str(Path(self.model_dir).resolve()))
        truncation = encoder.tokenizer.backend.truncation
        special = encoder.tokenizer.backend.num_special_tokens_to_add(False)  # [CLS] and [SEP]
        self.max_tokens = (truncation["max_length"] if truncation else encoder.model.cfg.max_seq_len) - special
        # a copy without truncation: the chunker needs every token of a long document
        self._tokenizer = HFTokenizer.from_str(encoder.tokenizer.backend.to_str())
        self._tokenizer.no_truncation()

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        return _offsets(self._tokenizer, text)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        from lmforge.embedding import embed

        return embed(list(texts), self.model_dir, batch_size=BATCH_SIZE, normalize=True).numpy()


class HiddenStateEmbedder:
    """An lmforge decoder's final hidden states averaged over the text's tokens (right-padded batches, padding
    masked out), L2-normalised. Weaker than a trained sentence encoder: the fallback when none is installed."""

    def __init__(self, name: str):
        import torch

        from lmforge.infer.model_kind import load_for_verb

        self.name = name
        run = name.removeprefix(_MEAN)
        model, self.tokenizer, _ = load_for_verb(run, "lmforge rag --embedder mean:RUN", ("decoder",))
        self.model = model.eval()
        self.max_tokens = self.model.cfg.max_seq_len
        self._torch = torch

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        return _offsets(self.tokenizer.backend, text)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        from lmforge.embedding import POOLING

        torch = self._torch
        pad = self.tokenizer.pad_id or 0
        rows = [ids[:self.max_tokens] or [pad] for ids in self.tokenizer.encode_batch(list(texts))]
        out = np.empty((len(rows), self.model.cfg.d_model), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(rows), BATCH_SIZE):
                batch = rows[start:start + BATCH_SIZE]
                ids = torch.full((len(batch), max(map(len, batch))), pad, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for r, row in enumerate(batch):
                    ids[r, :len(row)] = torch.tensor(row)
                    mask[r, :len(row)] = 1
                mean = POOLING["mean"](self.model.hidden(ids, attention_mask=mask).float(), mask)
                out[start:start + len(batch)] = torch.nn.functional.normalize(mean, dim=-1).numpy()
        return out
