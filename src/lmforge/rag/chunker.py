"""Token-based chunking with overlap.

Chunks are counted in the tokens of the embedding model that will read them (its tokenizer gives each token's
character offsets), so a chunk of `chunk_tokens` tokens is what the embedder sees whole, never truncated. A chunk's
text is the exact slice of the document from its first token's start to its last token's end."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lmforge.errors import ConfigError


@dataclass(frozen=True)
class ChunkerSettings:
    chunk_tokens: int = 128
    overlap: int = 32  # tokens each chunk repeats from the end of the one before

    def validate(self, max_tokens: int | None = None, embedder: str = "") -> None:
        """ConfigError naming the option when the settings cannot chunk (or exceed the embedder's input)."""
        if self.chunk_tokens < 1:
            raise ConfigError(f"--chunk-tokens must be >= 1, got {self.chunk_tokens}")
        if not 0 <= self.overlap < self.chunk_tokens:
            raise ConfigError(f"--overlap must be >= 0 and below --chunk-tokens ({self.chunk_tokens}), got "
                              f"{self.overlap}")
        if max_tokens is not None and self.chunk_tokens > max_tokens:
            raise ConfigError(f"--chunk-tokens {self.chunk_tokens} is longer than the {max_tokens} tokens embedder "
                              f"{embedder} reads; pass --chunk-tokens {max_tokens} or less")


def chunk_token_spans(n_tokens: int, settings: ChunkerSettings) -> list[tuple[int, int]]:
    """[start, end) token ranges covering `n_tokens` tokens: each `chunk_tokens` long (the last may be shorter),
    each starting `chunk_tokens - overlap` after the one before; none for an empty text."""
    stride = settings.chunk_tokens - settings.overlap
    spans = []
    start = 0
    while start < n_tokens:
        end = min(start + settings.chunk_tokens, n_tokens)
        spans.append((start, end))
        if end == n_tokens:
            break
        start += stride
    return spans


def chunk_text(text: str, offsets: Sequence[tuple[int, int]], settings: ChunkerSettings) -> list[str]:
    """The chunks of `text`, whose tokens have the character `offsets` [(start, end), ...]."""
    return [text[offsets[start][0]:offsets[end - 1][1]] for start, end in chunk_token_spans(len(offsets), settings)]
