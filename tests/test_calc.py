"""`lmforge calc`: the seed's linear layer by hand, parameters and FLOPs against the real models (torch's FLOP counter
on a CPU forward and backward), model-state memory against a real optimizer step, the seeds' memory figures, the KV
cache against lmforge's own, and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lmforge.calc.accelerators import find_accelerator, training_seconds
from lmforge.calc.flops import count_model
from lmforge.calc.memory import (
    REGIMES,
    activation_bytes,
    kv_cache_bytes,
    lora_params,
    nf4_bytes,
    training_memory,
)
from lmforge.calc.presets import PRESETS
from lmforge.cli import main
from lmforge.config import EncDecConfig, EncoderConfig, ModelConfig, PeftConfig, TrainConfig
from lmforge.model import build_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: fastest on one thread

TINY = {
    "gpt2": ModelConfig(family="gpt2", vocab_size=64, max_seq_len=16, n_layer=3, n_head=2, d_model=16),
    "llama": ModelConfig(family="llama", vocab_size=64, max_seq_len=16, n_layer=3, n_head=4, n_kv_head=2,
                         d_model=16),
    "encoder": EncoderConfig(vocab_size=64, max_seq_len=16, n_layer=3, n_head=2, d_model=16),
    "encdec": EncDecConfig(vocab_size=64, n_layer=3, n_decoder_layer=2, n_head=2, head_dim=8, d_model=16, d_ff=32),
}
GB = 1e9


def test_the_seeds_linear_layer(capsys: pytest.CaptureFixture[str]) -> None:
    """Seed 000: N = 16384, D_in = 32768, D_out = 8192; forward 2·N·D_in·D_out, backward 4·N·D_in·D_out, memory
    4 x (4 x params + activations) bytes in fp32."""
    assert main(["calc", "linear", "--n", "16384", "--d-in", "32768", "--d-out", "8192", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    params = 32768 * 8192
    assert figures["params"] == params == 268_435_456
    assert figures["forward_flops"] == 2 * 16384 * params == 8_796_093_022_208
    assert figures["backward_flops"] == 4 * 16384 * params == 17_592_186_044_416
    assert figures["total_flops"] == 6 * 16384 * params
    assert figures["activations"] == 16384 * 8192
    assert figures["memory_bytes_fp32"] == 4 * (4 * params + 16384 * 8192) == 4_831_838_208


@pytest.mark.parametrize("arch", list(TINY))
def test_parameters_and_flops_equal_the_real_models(arch: str) -> None:
    """Counted on a one-block meta model and scaled by depth, they equal torch's FLOP counter on the real CPU model
    (attention on its math path, whose multiplies the counter sees) for forward and backward, exactly."""
    cfg = TINY[arch]
    count = count_model(cfg, seq_len=16)
    torch.manual_seed(0)
    model = build_model(cfg)
    assert count.params == sum(p.numel() for p in model.parameters())
    assert sum(row.params * row.count for row in count.rows) == count.params  # every parameter in one row
    ids = torch.randint(0, 64, (1, 16))
    forward, training = FlopCounterMode(display=False), FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH):
        with forward:
            model(ids, ids) if arch == "encdec" else model(ids)
        with training:
            (model(ids, ids) if arch == "encdec" else model(ids)).sum().backward()
    assert count.forward_flops == forward.get_total_flops()
    assert count.forward_flops + count.backward_flops == training.get_total_flops()


def test_per_layer_flops_by_hand() -> None:
    """GPT-2 tiny, T = 16, d = 16, V = 64: each projection 2·T·d·d, the MLP's 2·T·d·4d, attention's scores and
    weighted values 2 x 2·T·T·d, the head 2·T·d·V."""
    rows = {row.name: row for row in count_model(TINY["gpt2"], seq_len=16).rows}
    T, d, V = 16, 16, 64
    assert rows["blocks.*.attn.q"].forward_flops == 2 * T * d * d and rows["blocks.*.attn.q"].count == 3
    assert rows["blocks.*.mlp.up"].forward_flops == 2 * T * d * 4 * d
    assert rows["blocks.*.attn [bmm]"].forward_flops == 2 * 2 * T * T * d
    assert rows["lm_head"].forward_flops == 2 * T * d * V and rows["lm_head"].params == 0  # tied to tok_emb
    assert rows["tok_emb"].params == V * d


def test_model_state_memory_equals_a_real_adam_step() -> None:
    """fp32 weights, gradients and Adam moments as a real AdamW step allocates them (the per-tensor `step` counters,
    one scalar each, left out): tolerance 0 bytes. LoRA's trained parameters and QLoRA's NF4 base bytes equal
    lmforge's own adapted model's."""
    from lmforge.peft.lora import apply_lora, base_nbytes
    from lmforge.train.trainer import build_optimizer

    cfg = TINY["llama"]
    count = count_model(cfg)
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = build_optimizer(model, TrainConfig())
    model(torch.randint(0, 64, (2, 16))).sum().backward()
    optimizer.step()
    real = {
        "weights": sum(p.numel() * p.element_size() for p in model.parameters()),
        "gradients": sum(p.grad.numel() * p.grad.element_size() for p in model.parameters()),
        "optimizer_states": sum(state[key].numel() * state[key].element_size()
                                for state in optimizer.state.values() for key in ("exp_avg", "exp_avg_sq")),
    }
    memory = training_memory(cfg, count, REGIMES["fp32"], tokens=32)
    assert {key: getattr(memory, key) for key in real} == real

    targets = ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"]  # every block Linear
    lora = build_model(cfg)
    apply_lora(lora, PeftConfig(method="lora", r=4, targets=targets))
    assert lora_params(count, 4) == sum(p.numel() for p in lora.parameters() if p.requires_grad)
    qlora = build_model(cfg)
    apply_lora(qlora, PeftConfig(method="qlora", r=4, targets=targets, qlora_double_quant=True))
    assert base_nbytes(qlora) == sum(layer.count * nf4_bytes(layer.d_in * layer.d_out)
                                     for layer in count.linears if layer.in_block)


def test_the_seeds_memory_figures() -> None:
    """Seed 000: full fine-tuning of a 65B model in fp16 mixed precision needs 1,000-1,400 GB: the model states alone
    (16 bytes per parameter) are the low end, activations of a batch take it up. Seed 001: QLoRA cuts fine-tuning
    a 65B model from 780 GB (16-bit weights and gradients, fp32 Adam: 12 bytes per parameter) to 48 GB (rank 64 on
    every block Linear, NF4 base, activation checkpointing, 512 tokens)."""
    cfg = PRESETS["llama-65b"]
    count = count_model(cfg)
    assert 65.2e9 < count.params < 65.3e9  # Touvron et al.: 65.2B
    mixed = training_memory(cfg, count, REGIMES["fp16-mixed"], tokens=2048)
    states = mixed.total - mixed.activations
    assert states == 16 * count.params and 1000 * GB < states < mixed.total < 1400 * GB
    seven = training_memory(cfg, count, REGIMES["fp16-mixed"], tokens=7 * 2048)
    assert 1350 * GB < seven.total < 1450 * GB  # the top of the range: ~7 sequences of 2048 tokens
    full_16bit = training_memory(cfg, count, REGIMES["bf16"], tokens=0)
    assert full_16bit.total == 12 * count.params and 780 * GB < full_16bit.total < 790 * GB
    qlora = training_memory(cfg, count, REGIMES["bf16"], tokens=512, method="qlora", checkpointing=True, lora_r=64)
    assert 40 * GB < qlora.total < 48 * GB
    assert 174e9 < count_model(PRESETS["gpt3-175b"]).params < 176e9


def test_activation_estimate_is_korthikantis_34sbh_for_gpt() -> None:
    """A GPT layer with dropout keeps 34·s·b·h bytes in 16-bit (Korthikanti et al. 2022, fused attention); the head
    adds its inputs and the logits. Checkpointing keeps far less."""
    cfg = ModelConfig(family="gpt2", vocab_size=64, max_seq_len=16, n_layer=3, n_head=2, d_model=16, dropout=0.1)
    head = 2 * 16 * 2 + 64 * (2 + 4)
    assert activation_bytes(cfg, tokens=10, bytes_per_value=2, checkpointing=False) == 10 * (34 * 16 * 3 + head)
    assert activation_bytes(cfg, 10, 2, checkpointing=True) < activation_bytes(cfg, 10, 2, checkpointing=False)


def test_kv_cache_equals_lmforges_cache() -> None:
    cfg = TINY["llama"]
    cache = build_model(cfg).new_cache(batch_size=3, max_len=16, dtype=torch.bfloat16)
    assert kv_cache_bytes(cfg, batch=3, context=16) == sum(t.numel() * t.element_size()
                                                          for t in cache.keys + cache.values)


def test_training_time_by_hand() -> None:
    h100 = find_accelerator("h100")
    assert training_seconds(1e21, h100, "bf16", mfu=0.5, devices=2) == pytest.approx(1e21 / (989e12 * 0.5 * 2))


def test_calc_model_of_a_checkpoint_and_a_config_prints_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                             ) -> None:
    import yaml

    import lmforge

    cfg = TINY["gpt2"]
    lmforge.save(build_model(cfg), None, tmp_path / "ckpt")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"model": cfg.model_dump(mode="json")}))
    for source in (tmp_path / "ckpt", tmp_path / "c.yaml"):
        assert main(["calc", "model", str(source), "--tokens", "1e6", "--accelerator", "A100", "--json"]) == 0
        figures = json.loads(capsys.readouterr().out)
        assert figures["model"]["params"] == 11152
        assert figures["compute"]["six_nd"] == 6 * 11152 * 1e6
        assert len(figures["memory"]["setups"]) == 7 and figures["kv_cache"]["bytes_16bit"] > 0
    assert main(["calc", "model", "llama-65b"]) == 0
    out = capsys.readouterr().out
    assert "65,285,660,672 parameters" in out and "qlora" in out and "GB" in out


def test_unknown_accelerator_lists_the_known_ones(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["calc", "model", "demo", "--accelerator", "TPU9"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown accelerator 'TPU9'" in err
    assert all(name in err for name in ("A100", "H100", "H200", "MI300X", "L4"))


@pytest.mark.parametrize("argv, message", [
    (["calc", "model", "nowhere"], "neither a preset"),
    (["calc", "model", "demo", "--batch", "0"], "--batch must be positive"),
    (["calc", "model", "demo", "--seq", "100000"], "--seq 100000 must be between 1 and the model's context"),
    (["calc", "model", "demo", "--accelerator", "V100"], "V100 does not support bf16; pick --precision fp16 or fp32"),
    (["calc", "linear", "--n", "0", "--d-in", "2", "--d-out", "3"], "--n must be at least 1"),
])
def test_bad_calc_input_is_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
