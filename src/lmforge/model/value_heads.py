"""Scalar heads on a decoder's final hidden states: a reward model r(x, y) and a policy with a value head V(s).

The decoder is kept as a submodule (`backbone` / `policy`), so a checkpoint holds its keys under that prefix plus
the head's own (`score.weight`; `value.weight`, `value.bias`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lmforge.errors import ConfigError
from lmforge.model.decoder import DecoderLM
from lmforge.model.heads import last_token_index


class RewardModel(nn.Module):
    """r(x, y) (Ouyang et al. 2022, sec. 3.5): a linear `score` on the final hidden state of each row's last real
    token (right padding; causal attention means that token has read the whole prompt and response)."""

    def __init__(self, backbone: DecoderLM):
        super().__init__()
        self.backbone = backbone
        self.score = nn.Linear(backbone.cfg.d_model, 1, bias=False)  # a bias cancels in r_c - r_r: never trained
        nn.init.normal_(self.score.weight, 0.0, backbone.cfg.init_std)
        if backbone.lm_head.weight is not backbone.tok_emb.weight:  # an untied LM head is unused: freeze it,
            backbone.lm_head.requires_grad_(False)  # so DDP does not wait for its gradient

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Rewards [B]."""
        hidden = self.backbone.hidden(input_ids)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(mask)]
        return self.score(last).squeeze(-1)


def build_reward_model(backbone: nn.Module) -> RewardModel:
    """The reward model on `backbone` (what `build_task_model("reward", backbone)` returns)."""
    if not isinstance(backbone, DecoderLM):
        raise ConfigError(f"a reward model needs a decoder backbone, got {type(backbone).__name__}")
    return RewardModel(backbone)


class PolicyWithValue(nn.Module):
    """The policy DecoderLM plus a scalar value head on its final hidden states (shared trunk, as PPO-RLHF):
    forward(input_ids) -> (logits [B, T, V], values [B, T]). The head starts at zero (V = 0)."""

    def __init__(self, policy: DecoderLM):
        super().__init__()
        self.policy = policy
        self.value = nn.Linear(policy.cfg.d_model, 1)
        nn.init.zeros_(self.value.weight)
        nn.init.zeros_(self.value.bias)

    def forward(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        hidden = self.policy.hidden(input_ids)
        return self.policy.lm_head(hidden), self.value(hidden).squeeze(-1)
