"""Log-probabilities of given tokens under a causal LM, and the frozen reference they are compared with:
what DPO, PPO, GRPO and the KL terms share."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def token_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """log p(targets[b, t] | ...) from logits [B, T, V] aligned with targets [B, T] (computed in fp32)."""
    return torch.gather(F.log_softmax(logits.float(), dim=-1), -1, targets.unsqueeze(-1)).squeeze(-1)


def response_logprobs(model: nn.Module, input_ids: Tensor, response_mask: Tensor) -> Tensor:
    """Per-token log-probs [B, T-1] of input_ids[:, 1:] under `model`, zeroed where response_mask[:, 1:]
    is False (the prompt and padding). `response_mask` [B, T] marks the tokens the policy wrote."""
    logits = model(input_ids[:, :-1])
    logps = token_logprobs(logits, input_ids[:, 1:])
    return logps * response_mask[:, 1:].to(logps.dtype)


def sequence_logprob(model: nn.Module, input_ids: Tensor, response_mask: Tensor) -> Tensor:
    """Sum of the response tokens' log-probs, one number per row [B] (log pi(y | x))."""
    return response_logprobs(model, input_ids, response_mask).sum(-1)


def frozen_copy(policy: nn.Module) -> nn.Module:
    """The reference policy: a copy of the starting policy, in eval mode, without gradients."""
    return copy.deepcopy(policy).eval().requires_grad_(False)
