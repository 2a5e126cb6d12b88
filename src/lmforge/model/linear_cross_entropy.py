"""The language-model head and its cross-entropy in one pass over chunks of tokens (as Liger's fused linear
cross-entropy): the fp32 [tokens, vocab] logits never exist whole, only one chunk's at a time.

The forward computes each chunk's logits, its summed loss and, while the logits are at hand, their gradient
(softmax - one-hot) and from it the chunk's gradients of the hidden states and the head weight; the backward only
scales those by the incoming gradient. Nothing is recomputed, and the peak memory is one chunk's logits, not the
whole batch's: at GPT-2's 50k vocabulary, 16k tokens' fp32 logits alone would be 3.3 GB.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100
# logits per chunk (256 MB in fp32): a chunk of GPT-2's vocabulary is 1335 tokens. Each chunk re-reads and re-writes
# the whole [vocab, d] weight gradient, so small chunks cost more than the memory they save
CHUNK_ELEMENTS = 2**26


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
        rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        kept_all = bool((labels != IGNORE_INDEX).all())
        weight_in_use = weight.to(hidden.dtype)  # autocast's copy of an fp32 head, made here: no cast on the way back
        for start in range(0, hidden.shape[0], rows):
            h, target = hidden[start:start + rows], labels[start:start + rows]
            # log-softmax as logits - max - log(sum(exp(logits - max))), every pass in place on the chunk's logits
            logits = (h @ weight_in_use.t()).float()
            shifted = logits.sub_(logits.amax(-1, keepdim=True))
            kept = target != IGNORE_INDEX
            picked = target.clamp(min=0)[:, None]
            picked_shifted = shifted.gather(1, picked).squeeze(1)
            exp_shifted = shifted.exp_()
            sum_exp = exp_shifted.sum(-1, keepdim=True)
            total += ((sum_exp.log().squeeze(1) - picked_shifted) * kept).sum()
            if not (want_hidden or want_weight):
                continue
            grad_logits = exp_shifted.div_(sum_exp)  # softmax
            grad_logits.scatter_add_(1, picked, torch.full_like(grad_logits[:, :1], -1.0))
            if not kept_all:
                grad_logits.mul_(kept[:, None])
            grad_logits = grad_logits.to(hidden.dtype)
            if want_hidden:
                grad_hidden[start:start + rows] = grad_logits @ weight_in_use
            if want_weight and grad_logits.dtype == grad_weight.dtype:
                grad_weight.addmm_(grad_logits.t(), h)
            elif want_weight:
                grad_weight += (grad_logits.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        grad_hidden, grad_weight = ctx.saved_tensors
        return (None if grad_hidden is None else grad_hidden * grad_total.to(grad_hidden.dtype),
                None if grad_weight is None else (grad_weight * grad_total).to(ctx.weight_dtype), None)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    """sum over the `labels` [...] that are not IGNORE_INDEX of cross-entropy(hidden @ weight.T, label), in fp32;
    hidden [..., d], weight [vocab, d]. Under autocast the matmuls run in its dtype, as `nn.Linear`'s would."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        hidden = hidden.to(torch.get_autocast_dtype(device))
    with torch.autocast(device, enabled=False):
        return _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1))
