"""log p(continuation | context) for a decoder or an encoder-decoder, many requests per forward.

A decoder reads context + continuation as one sequence, tokenised as lm-evaluation-harness does: the whole text is
encoded and the continuation is what follows the context's own tokens; an empty context is replaced by EOS (the
document separator), and a sequence longer than the context window loses its oldest tokens. An encoder-decoder
reads the context (then EOS) in its encoder and scores the continuation (then EOS) as its target, the layout
`lmforge finetune --task text2text` trains on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lmforge.errors import DataError
from lmforge.tokenizer import Tokenizer


def _separator(tokenizer: Tokenizer) -> int:
    tid = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.bos_id
    if tid is None:
        raise DataError("the tokenizer has neither an EOS nor a BOS token; scoring needs one of them")
    return tid


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str, encdec: bool, limit: int, where: str
                ) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) of one request; DataError when the continuation tokenises to nothing or
    does not fit the model's `limit` tokens."""
    eos = _separator(tokenizer)
    if encdec:
        ctx, cont = [*tokenizer.encode(context), eos], tokenizer.encode(continuation)
    else:  # as lm-evaluation-harness: the context's trailing spaces belong to the continuation
        stripped = context.rstrip(" ")
        continuation = context[len(stripped):] + continuation
        ctx = tokenizer.encode(stripped)
        cont = tokenizer.encode(stripped + continuation)[len(ctx):]
        ctx = ctx or [eos]
    if not cont:
        raise DataError(f"{where}: {continuation!r} tokenises to no tokens; give it text")
    if encdec:
        cont.append(eos)
    if len(cont) > limit:
        raise DataError(f"{where}: {continuation[:40]!r}... has {len(cont)} tokens, more than the model's "
                        f"{limit}-token context; shorten it")
    return ctx, cont


def _scores(logits: Tensor, targets: Tensor, mask: Tensor) -> list[float]:
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None])[..., 0]
    return (logp.double() * mask).sum(dim=1).tolist()


def _right_padded(rows: Sequence[Sequence[int]], device: torch.device) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.as_tensor(list(r))
        mask[i, :len(r)] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def loglikelihoods(model: nn.Module, requests: Sequence[tuple[list[int], list[int]]], batch_size: int = 16
                   ) -> list[float]:
    """Summed log-probability of each request's continuation ids after its context ids."""
    encdec = model.cfg.arch == "encdec"
    limit = model.cfg.max_seq_len
    order = sorted(range(len(requests)), key=lambda i: -sum(map(len, requests[i])))
    out = [0.0] * len(requests)
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        batch = [requests[i] for i in order[start:start + batch_size]]
        if encdec:
            enc, enc_mask = _right_padded([ctx[-limit:] for ctx, _ in batch], device)
            start_id = model.cfg.decoder_start_id
            dec, dec_mask = _right_padded([[start_id, *cont[:-1]] for _, cont in batch], device)
            targets, _ = _right_padded([cont for _, cont in batch], device)
            scores = _scores(model(enc, dec, attention_mask=enc_mask), targets, dec_mask)
        else:
            seqs = [(ctx + cont)[-(limit + 1):] for ctx, cont in batch]
            ids, _ = _right_padded([s[:-1] for s in seqs], device)
            targets, _ = _right_padded([s[1:] for s in seqs], device)
            mask = torch.zeros_like(targets)
            for row, (s, (_, cont)) in enumerate(zip(seqs, batch, strict=True)):
                mask[row, len(s) - 1 - len(cont):len(s) - 1] = 1  # targets t predict token t + 1
            scores = _scores(model(ids), targets, mask)
        for i, score in zip(order[start:start + batch_size], scores, strict=True):
            out[i] = score
    return out
