"""The actions of `lmforge calc`: each has its options (`*_options`, added to its sub-command by `lmforge.cli`) and
its command (`cmd_calc_*`), which prints the figures as text, or every one of them as JSON with `--json`."""

from __future__ import annotations

import json
from typing import Any

from jsonargparse import ArgumentParser, Namespace

GB = 1e9
UNITS = (("GB", 1e9), ("MB", 1e6), ("kB", 1e3), ("bytes", 1))


def _unit(largest: float, at_least: float = 10) -> tuple[str, float]:
    """The unit bytes up to `largest` read best in: the largest unit it holds `at_least` of (10 in a table: one
    decimal still shows small entries)."""
    return next((unit, size) for unit, size in UNITS if largest >= at_least * size or size == 1)


def _duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds:,.3g} s"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:,.3g} hours"
    return f"{seconds / 86400:,.4g} days"


def linear_options(p: ArgumentParser) -> None:
    p.add_argument("--n", type=int, required=True, help="rows of X (tokens), e.g. --n 16384")
    p.add_argument("--d-in", type=int, required=True, help="input features (rows of W), e.g. --d-in 32768")
    p.add_argument("--d-out", type=int, required=True, help="output features (columns of W), e.g. --d-out 8192")
    p.add_argument("--json", action="store_true", help="print every figure as one JSON object, e.g. --json")


def cmd_calc_linear(args: Namespace) -> None:
    from lmforge.calc.flops import LinearFigures
    from lmforge.errors import ConfigError

    for name in ("n", "d_in", "d_out"):
        if args[name] < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {args[name]}")
    layer = LinearFigures(args.n, args.d_in, args.d_out)
    if args.json:
        print(json.dumps(layer.as_dict()))
        return
    n, d_in, d_out = layer.n, layer.d_in, layer.d_out
    print(f"linear layer X [{n}, {d_in}] x W [{d_in}, {d_out}], no bias")
    print(f"  parameters    {layer.params:,} (D_in x D_out)")
    print(f"  forward       {layer.forward_flops:.4g} FLOPs (2 x N x D_in x D_out)")
    print(f"  backward      {layer.backward_flops:.4g} FLOPs (4 x N x D_in x D_out: 2 for W's gradient, 2 for X's)")
    print(f"  total         {layer.total_flops:.4g} FLOPs (6 x tokens x parameters)")
    print(f"  activations   {layer.activations:,} (N x D_out); gradients {layer.params:,}; Adam states "
          f"{2 * layer.params:,}")
    print(f"  memory        {layer.memory_bytes:,} bytes = {layer.memory_bytes / GB:.2f} GB in fp32 "
          "(4 x (4 x params + activations))")


def model_options(p: ArgumentParser) -> None:
    p.add_argument("source", help="a preset (gpt3-175b, llama-65b, demo), an lmforge run or checkpoint dir, or a "
                                  "config YAML with a model section, e.g. llama-65b or runs/demo/pretrain")
    p.add_argument("--seq", type=int, default=None,
                   help="tokens per sequence, e.g. --seq 1024 (default: the model's context)")
    p.add_argument("--batch", type=int, default=1,
                   help="sequences per training step (activations) and in the KV cache, e.g. --batch 8 (default: 1)")
    p.add_argument("--tokens", type=float, default=None,
                   help="training tokens D for 6ND and the training time, e.g. --tokens 1.4e12 (default: 20 per "
                        "parameter, Chinchilla's compute-optimal ratio)")
    p.add_argument("--accelerator", default="H100",
                   help="the accelerator the training time assumes: V100, A100, H100, H200, MI300X, L4, e.g. "
                        "--accelerator A100 (default: H100)")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16",
                   help="whose peak FLOP/s the training time assumes, e.g. --precision fp16 (default: bf16)")
    p.add_argument("--mfu", type=float, default=0.4,
                   help="model FLOPs utilisation assumed, in (0, 1], e.g. --mfu 0.5 (default: 0.4)")
    p.add_argument("--devices", type=int, default=1, help="accelerators training together, e.g. --devices 2048 "
                                                          "(default: 1)")
    p.add_argument("--lora-r", type=int, default=64,
                   help="LoRA / QLoRA rank, adapters on every Linear in the blocks, e.g. --lora-r 16 (default: 64, "
                        "as QLoRA's 65B runs)")
    p.add_argument("--context", type=int, default=None,
                   help="tokens per sequence in the KV cache, e.g. --context 4096 (default: --seq)")
    p.add_argument("--json", action="store_true", help="print every figure as one JSON object, e.g. --json")


def cmd_calc_model(args: Namespace) -> None:
    from lmforge.calc.accelerators import find_accelerator
    from lmforge.calc.figures import model_figures
    from lmforge.calc.presets import model_config_of

    find_accelerator(args.accelerator)  # an unknown name is refused before the model is read
    cfg = model_config_of(args.source)
    figures = model_figures(cfg, seq=args.seq, batch=args.batch, tokens=args.tokens, accelerator=args.accelerator,
                            precision=args.precision, mfu=args.mfu, devices=args.devices, lora_r=args.lora_r,
                            context=args.context)
    print(json.dumps(figures) if args.json else "\n".join(describe(args.source, figures)))


def describe(name: str, figures: dict[str, Any]) -> list[str]:
    """`model_figures` as the lines `lmforge calc model` prints."""
    model, flops, compute = figures["model"], figures["flops"], figures["compute"]
    family = f" ({model['family']})" if "family" in model else ""
    lines = [f"{name}: {model['arch']}{family}, {model['layers']} layers, d_model {model['d_model']}, "
             f"{model['heads']} heads, vocabulary {model['vocab_size']}: {model['params']:,} parameters",
             f"FLOPs of one sequence of {flops['seq_len']} tokens, matrix multiplies as the forward runs them "
             "(backward: 2 x forward):",
             f"  {'module':<34}{'x':>5}{'parameters each':>18}{'forward FLOPs each':>20}"]
    lines += [f"  {row['name']:<34}{row['count']:>5}{row['params']:>18,}{row['forward_flops']:>20.4g}"
              for row in flops["layers"]]
    ratio = flops["training_per_token"] / flops["six_n_per_token"]
    lines += [f"  forward {flops['forward_per_sequence']:.4g}, backward {flops['backward_per_sequence']:.4g} per "
              f"sequence; training {flops['training_per_token']:.4g} FLOPs per token (6N = "
              f"{flops['six_n_per_token']:.4g}; counted / 6N = {ratio:.3f}: attention's T x T terms)",
              f"compute for D = {compute['tokens']:.4g} tokens: 6ND = {compute['six_nd']:.4g} FLOPs; counted "
              f"{compute['counted']:.4g}"]
    memory = figures["memory"]
    unit, size = _unit(max(setup["total"] for setup in memory["setups"]))
    lines += [f"training memory with Adam, one step of {memory['batch']} x {memory['seq_len']} tokens ({unit}; "
              f"LoRA / QLoRA: rank {memory['lora_r']} on every block Linear, {memory['lora_params']:,} trained "
              "parameters):",
              f"  {'method':<7}{'precision':<12}{'ckpt':<6}{'weights':>9}{'grads':>9}{'master':>9}{'Adam':>9}"
              f"{'activ.':>9}{'total':>9}"]
    for s in memory["setups"]:
        lines.append(f"  {s['method']:<7}{s['precision']:<12}{'yes' if s['activation_checkpointing'] else 'no':<6}"
                     + "".join(f"{s[k] / size:>9.1f}" for k in ("weights", "gradients", "master_weights",
                                                             "optimizer_states", "activations", "total")))
    lines += [f"  {name}: {text}" for name, text in memory["regimes"].items()]
    lines.append("  activations: tensors autograd keeps per block (fused attention; Korthikanti et al. 2022), "
                 "estimated; QLoRA: block Linears in NF4 (double quantisation), the rest 16-bit")
    if figures["kv_cache"] is not None:
        kv = figures["kv_cache"]
        kv_unit, kv_size = _unit(kv["bytes_16bit"], at_least=1)
        lines.append(f"KV cache (16-bit) of {kv['batch']} x {kv['context']} tokens: "
                     f"{kv['bytes_16bit'] / kv_size:.3g} {kv_unit}")
    t = figures["training_time"]
    lines.append(f"training time: {t['flops']:.4g} FLOPs on {t['devices']} x {t['accelerator']} at {t['mfu']:.0%} of "
                 f"{t['peak_tflops']:g} {t['precision']} TFLOP/s: {_duration(t['seconds'])}")
    return lines
