"""Perplexity and bits per byte of a decoder on text files, with the sliding window of transformers' perplexity guide.

A document is scored as training saw it: after the EOS that separates documents in `lmforge data prepare`'s shards
(BOS when the tokenizer has no EOS), so that its first token is scored too. A sequence longer than the context is
cut into windows of the model's context starting every `stride` tokens; each window scores only the tokens the
previous windows did not reach, so every token is scored once, with at least context - stride tokens before it
(the guide's loop, https://huggingface.co/docs/transformers/perplexity). Perplexity is exp(mean NLL per token);
bits per byte is the summed NLL in bits over the documents' UTF-8 bytes, which does not depend on the tokenizer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lmforge.data.readers import read_documents
from lmforge.errors import ConfigError, DataError
from lmforge.model.decoder import DecoderLM
from lmforge.tokenizer import Tokenizer


@dataclass
class Perplexity:
    source: str  # a file, or "overall"
    documents: int
    tokens: int  # tokens scored
    bytes: int  # UTF-8 bytes of the documents
    nll: float  # summed negative log-likelihood, nats
    skipped_lines: int = 0  # bad JSONL lines or null parquet rows skipped (--skip-bad-lines)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / self.bytes

    def as_dict(self) -> dict:
        return {**asdict(self), "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte}


def window_plan(length: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) of each window over a sequence of `length` tokens: the window holds tokens
    [begin, end) and scores tokens [first_scored, end), each predicted from the tokens before it in the window."""
    if not 1 <= stride < context:
        raise ConfigError(f"--stride must be between 1 and the context minus one ({context - 1}), got {stride}: "
                          "each window needs a token of context before the ones it scores")
    plan, scored_to = [], 1
    for begin in range(0, length - 1, stride):
        end = min(begin + context, length)
        plan.append((begin, end, scored_to))
        scored_to = end
        if end == length:
            break
    return plan


def default_stride(context: int) -> int:
    """Half the context, as the guide's 512 of 1024: each token scored with at least half a context before it."""
    return max(1, context // 2)


def document_ids(tokenizer: Tokenizer, texts: Sequence[str], source: str) -> list[list[int]]:
    """The scored sequence of each document: the document separator, then the document's tokens."""
    start = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.bos_id
    if start is None:
        raise DataError("the tokenizer has neither an EOS nor a BOS token to start a document with; perplexity "
                        "scores every token of a document after one of them")
    sequences = []
    for d, ids in enumerate(tokenizer.encode_batch(texts), start=1):
        if not ids:
            raise DataError(f"{source}: document {d} tokenises to no tokens (an empty text); remove it or give it "
                            "text")
        sequences.append([start, *ids])
    return sequences


@torch.inference_mode()
def sequence_nlls(model: DecoderLM, sequences: Sequence[Sequence[int]], stride: int, batch_size: int = 8,
                  progress: bool = True) -> list[float]:
    """Summed NLL (nats) of tokens 1.. of each sequence, windows of the model's context batched together."""
    context = model.cfg.max_seq_len
    windows = [(i, seq[begin:end], first - begin) for i, seq in enumerate(sequences)
               for begin, end, first in window_plan(len(seq), context, stride)]
    windows.sort(key=lambda w: -len(w[1]))  # similar lengths share a batch: little padding
    nll = [0.0] * len(sequences)
    device = model.device
    bar = tqdm(total=len(windows), desc="perplexity", unit="window", disable=not progress or None, leave=False)
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size]
        width = len(batch[0][1])
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        scored = torch.zeros((len(batch), width - 1), dtype=torch.bool)
        for row, (_, tokens, first) in enumerate(batch):
            ids[row, :len(tokens)] = torch.as_tensor(tokens)
            scored[row, first - 1:len(tokens) - 1] = True  # logits at t predict token t + 1
        ids, scored = ids.to(device), scored.to(device)
        logp = torch.log_softmax(model(ids)[:, :-1].float(), dim=-1)
        token_nll = -logp.gather(-1, ids[:, 1:, None])[..., 0].double()
        for row, total in enumerate((token_nll * scored).sum(dim=1).tolist()):
            nll[batch[row][0]] += total
        bar.update(len(batch))
    bar.close()
    return nll


def file_perplexity(model: DecoderLM, tokenizer: Tokenizer, paths: Sequence[str | Path], stride: int | None = None,
                    batch_size: int = 8, text_field: str = "text", skip_bad_lines: bool = False,
                    progress: bool = True) -> list[Perplexity]:
    """Perplexity per file (read as `lmforge data prepare` reads them) and "overall", the last entry. `stride`
    defaults to `default_stride` of the model's context."""
    stride = default_stride(model.cfg.max_seq_len) if stride is None else stride
    window_plan(2, model.cfg.max_seq_len, stride)  # checks the stride before any file is read
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    texts: list[tuple[str, list[str]]] = []
    skipped = []
    for path in paths:
        docs = read_documents([path], text_field=text_field, skip_bad_lines=skip_bad_lines)
        texts.append((str(path), list(docs)))
        docs.require_text()
        skipped.append(docs.skipped)
    sequences, owner = [], []
    for f, (path, docs) in enumerate(texts):
        sequences += document_ids(tokenizer, docs, path)
        owner += [f] * len(docs)
    nlls = sequence_nlls(model.eval(), sequences, stride, batch_size, progress)
    results = []
    for f, (path, docs) in enumerate(texts):
        mine = [i for i, o in enumerate(owner) if o == f]
        results.append(Perplexity(path, len(docs), sum(len(sequences[i]) - 1 for i in mine),
                                  sum(len(t.encode("utf-8")) for t in docs), sum(nlls[i] for i in mine),
                                  skipped[f]))
    results.append(Perplexity("overall", *(sum(getattr(r, k) for r in results)
                                           for k in ("documents", "tokens", "bytes", "nll", "skipped_lines"))))
    return results
