"""train.activation_checkpointing: every block of a decoder, encoder or encoder-decoder recomputes its forward in
the backward, and the gradients equal those of the plain forward within 1e-6 (dropout on: the RNG is replayed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmforge.config import EncDecConfig, EncoderConfig, ModelConfig
from lmforge.model import build_model
from lmforge.model.activation_checkpointing import CheckpointableBlock, set_activation_checkpointing
from lmforge.train.objectives import causal_lm_loss
from lmforge.train.trainer import train
from test_trainer import small_setup

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: fastest on one thread

MODELS = {
    "gpt2": ModelConfig(family="gpt2", vocab_size=64, max_seq_len=16, n_layer=2, n_head=2, d_model=16, dropout=0.1),
    "llama": ModelConfig(family="llama", vocab_size=64, max_seq_len=16, n_layer=2, n_head=2, n_kv_head=1,
                         d_model=16, dropout=0.1),
    "encoder": EncoderConfig(vocab_size=64, max_seq_len=16, n_layer=2, n_head=2, d_model=16, dropout=0.1),
    "encdec": EncDecConfig(vocab_size=64, n_layer=2, n_head=2, head_dim=8, d_model=16, d_ff=32, dropout=0.1),
}


def loss_and_grads(model: torch.nn.Module, arch: str) -> tuple[float, dict[str, torch.Tensor]]:
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the dropout masks
    logits = model(ids, ids.flip(1)) if arch == "encdec" else model(ids)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", list(MODELS))
def test_checkpointed_blocks_recompute_and_give_the_same_gradients(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(MODELS[arch]).train()
    plain_loss, plain = loss_and_grads(model, arch)
    blocks = [m for m in model.modules() if isinstance(m, CheckpointableBlock)]
    forwards = {"n": 0}
    for block in blocks:
        block.register_forward_pre_hook(lambda *_: forwards.__setitem__("n", forwards["n"] + 1))
    assert set_activation_checkpointing(model, True) == len(blocks) == (4 if arch == "encdec" else 2)
    checkpointed_loss, checkpointed = loss_and_grads(model, arch)
    assert forwards["n"] == 2 * len(blocks), "the blocks' forwards were not recomputed in the backward"
    assert checkpointed_loss == pytest.approx(plain_loss, abs=1e-6)
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        assert torch.allclose(grad, checkpointed[name], rtol=0, atol=1e-6), name
    with torch.no_grad():  # evaluation does not recompute anything
        forwards["n"] = 0
        ids = torch.ones(1, 4, dtype=torch.long)
        model(ids, ids) if arch == "encdec" else model(ids)
        assert forwards["n"] == len(blocks)


def test_trainer_switches_it_on_and_trains_to_the_same_weights(tmp_path: Path, shards_dir: Path) -> None:
    weights = {}
    for flag in (False, True):
        model, tcfg, batches, config = small_setup(shards_dir, tmp_path / str(flag), max_steps=3,
                                                   activation_checkpointing=flag, device="cpu")
        train(model, tcfg, batches.batch, causal_lm_loss, run_config=config)
        assert all(block.checkpoint_activations == flag for block in model.blocks)
        weights[flag] = model.state_dict()
    for name, tensor in weights[False].items():
        assert torch.allclose(tensor, weights[True][name], rtol=0, atol=1e-6), name


@pytest.mark.parametrize("method", ["qlora", "dora", "adapter", "prefix", "prompt", "topk"])
def test_peft_models_get_the_same_gradients(method: str) -> None:
    """PEFT modules inside the blocks (adapters, prefixes, NF4 bases) and frozen blocks recompute alike."""
    from lmforge.config import PeftConfig
    from lmforge.peft.config import apply_peft

    torch.manual_seed(0)
    model = build_model(MODELS["gpt2"]).train()
    apply_peft(model, PeftConfig(method=method, r=2, prefix_len=3, prompt_len=3, reparam_hidden=8))
    _, plain = loss_and_grads(model, "gpt2")
    set_activation_checkpointing(model, True)
    _, checkpointed = loss_and_grads(model, "gpt2")
    assert plain and plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        assert torch.allclose(grad, checkpointed[name], rtol=0, atol=1e-6), name
