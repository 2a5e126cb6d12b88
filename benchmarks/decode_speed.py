"""Decode speed at batch 1 with a KV cache: lmforge `generate_ids` vs transformers `generate`.

Both run greedy decoding of the same prompt with identical weights, producing exactly N new
tokens (lmforge: temperature 0, stop_at_eos False; transformers: do_sample False,
min_new_tokens = max_new_tokens = N, use_cache True), inside torch.inference_mode(), timed in
interleaved rounds. tok/s = N / wall time of the whole call (prefill included). The bandwidth
bound is the memory-read bandwidth measured in this run divided by the weight bytes one decode
step reads; "of bound" is the achieved fraction of it (at the demo size the weights fit in cache,
so per-token overhead, not bandwidth, is what limits both).

    python benchmarks/decode_speed.py                     # demo size (GPT-2 family)
    python benchmarks/decode_speed.py --size gpt2-small   # 124M parameters, random init
    python benchmarks/decode_speed.py --size gpt2-small --compile   # also the torch.compiled decode step
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from lmforge.cpu_threads import set_cpu_threads  # noqa: E402
from lmforge.eval.versus_hf import hf_greedy  # noqa: E402
from lmforge.infer.generate import SamplingConfig, generate_ids  # noqa: E402
from lmforge.infer.layout import (  # noqa: E402
    column_major_linears,
    is_column_major,
    last_level_cache_bytes,
    linear_weights,
)
from lmforge.infer.quant import QuantConfig, quantize_model  # noqa: E402

# batch-1 decode speed over transformers generate: the inference-engine issue's targets per preset
TARGETS = {"demo": 2.0, "gpt2-small": 1.3}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Batch-1 greedy decode tokens/s of lmforge generate_ids vs transformers generate "
        "(KV cache on both, identical weights and prompt), with the fraction of the "
        "memory-bandwidth bound measured in the same run.",
    )
    common.add_model_args(p)
    p.add_argument(
        "--prompt-len", type=int, default=16, help="prompt tokens, random ids from --seed (default: 16)"
    )
    p.add_argument(
        "--new-tokens", type=int, default=128, help="tokens to generate, exactly this many (default: 128)"
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="interleaved timing rounds; the reported rate is the median over rounds (default: 5)",
    )
    p.add_argument(
        "--warmup", type=int, default=1, help="untimed generate calls per contender first (default: 1)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads value (default: leave torch's default, one per core)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for the weights and the prompt (default: 0)")
    p.add_argument(
        "--quant",
        type=int,
        nargs="*",
        choices=[8, 4],
        default=[8, 4],
        help="also time lmforge with int8 / int4 weight-only quantised Linears (int4: group 64); "
        "--quant with no value skips them (default: 8 4)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time lmforge with its decode step under torch.compile (SamplingConfig.compile, `lmforge generate "
        "--compile`); the first call, which compiles, is timed on its own",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        set_cpu_threads(args.threads)
    spec = common.spec_from_args(args)
    n_new = args.new_tokens
    if args.prompt_len + n_new > spec.max_seq_len:
        raise SystemExit(
            f"prompt {args.prompt_len} + {n_new} new tokens exceed the context {spec.max_seq_len}"
        )

    hf, row_major = common.build_pair(spec, seed=args.seed)
    lm = column_major_linears(copy.deepcopy(row_major))  # as `lmforge generate` runs it
    converted = is_column_major(lm.lm_head.weight)
    g = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, spec.vocab_size, (1, args.prompt_len), generator=g)
    prompt_ids = prompt[0].tolist()
    mask = torch.ones_like(prompt)
    sampling = SamplingConfig(max_new_tokens=n_new, temperature=0.0, stop_at_eos=False)

    def lmforge_run(model: torch.nn.Module, compiled: bool = False):
        cfg = dataclasses.replace(sampling, compile=compiled)

        def run() -> list[int]:
            with torch.inference_mode():
                return generate_ids(model, prompt_ids, cfg, eos_id=None)
        return run

    run_lmforge = lmforge_run(lm)
    extra = {}
    if converted:
        extra["row-major"] = lmforge_run(row_major)
    if args.compile:
        extra["compiled"] = lmforge_run(lm, compiled=True)
        start = time.perf_counter()
        extra["compiled"]()
        compile_s = time.perf_counter() - start
    quantised = {}
    for bits in args.quant:
        q = copy.deepcopy(lm)
        quantize_model(q, QuantConfig(bits=bits, group_size=64, tied_embedding=True))
        quantised[f"int{bits}"] = q.eval()

    hf_run = hf_greedy(hf, prompt, mask, n_new)

    def run_hf() -> list[int]:
        return hf_run()[0, args.prompt_len :].tolist()

    ids_lm, ids_hf = run_lmforge(), run_hf()
    same = ids_lm == ids_hf
    first = next((i for i, (a, b) in enumerate(zip(ids_lm, ids_hf, strict=False)) if a != b), None)
    check = (
        "identical"
        if same
        else f"DIFFERENT (first mismatch at new token {first}; lengths {len(ids_lm)}/{len(ids_hf)})"
    )

    bandwidth = common.memory_bandwidth_gbs()
    with common.OtherLoad() as load:
        timings = common.time_alternating(
            {"transformers": run_hf, "lmforge": run_lmforge, **extra,
             **{k: lmforge_run(m) for k, m in quantised.items()}},
            warmup=args.warmup, rounds=args.rounds,
        )
    weight_bytes = common.decode_weight_bytes(lm)
    bound = bandwidth * 1e9 / weight_bytes  # tokens/s if every step only streamed its weights once

    print(
        f"\ndecode | {spec.describe()} | {common.num_params(lm) / 1e6:.2f}M params | batch 1, prompt "
        f"{args.prompt_len}, {n_new} new tokens, greedy, KV cache | {args.rounds} rounds (median)"
    )
    print(f"greedy token ids: {check} | transformers attention: {hf.config._attn_implementation}")
    print(
        f"memory read bandwidth (measured, x.sum() over 512 MB): {bandwidth:.1f} GB/s | weights read per "
        f"token: {weight_bytes / 1e6:.1f} MB | bound {common.fmt_rate(bound)} tok/s"
    )
    hdr = f"{'contender':<28}{'tok/s':>9}{'ms/token':>10}{'vs HF':>8}{'of bound':>10}{'spread':>8}"
    print(hdr)
    print("-" * len(hdr))
    base = n_new / timings["transformers"].median
    models = {"transformers": lm, "lmforge": lm, "row-major": lm, "compiled": lm, **quantised}  # weights each reads
    names = {"row-major": "  same, nn.Linear layout", "compiled": "  same, compiled"}
    labels = {"transformers": "transformers generate", "lmforge": "lmforge generate_ids",
              **{k: names[k] for k in extra}, **{k: f"lmforge generate_ids, {k}" for k in quantised}}
    for name in labels:
        t = timings[name]
        rate = n_new / t.median
        print(
            f"{labels[name]:<28}{common.fmt_rate(rate):>9}{t.median / n_new * 1e3:>10.2f}{rate / base:>7.2f}x"
            f"{rate * common.decode_weight_bytes(models[name]) / (bandwidth * 1e9):>10.1%}{t.spread:>8.0%}"
        )
    print("spread: (max - min) / median over rounds | of bound: tok/s x the bytes that contender reads per token / "
          "bandwidth")
    for k, q in quantised.items():
        same_q = lmforge_run(q)() == ids_lm
        print(f"{k}: weight-only, every Linear and the tied embedding/head quantised (codes stored once); "
              f"{common.decode_weight_bytes(q) / 1e6:.1f} MB float weights + codes read per token; greedy ids "
              f"{'identical to' if same_q else 'differ from'} fp32")
    linear_mb = sum(w.nbytes for w in linear_weights(row_major)) / 2**20
    print(f"lmforge weights as `lmforge generate` loads them (infer/layout.py): {linear_mb:.0f} MiB of Linear weights, "
          + ("column-major; 'same, nn.Linear layout' times the row-major weights as trained" if converted else
             f"below this CPU's {last_level_cache_bytes() / 2**20:.0f} MiB last-level cache, so row-major (they read "
             "faster from cache that way)"))
    if args.compile:
        print(f"compiled: torch.compile of the decode step (C++ wrapper); its first call took {compile_s:.1f} s")
    print(f"machine: {common.machine_line()}")
    print(load.describe())
    if not same:
        print(
            "note: greedy ids differ; with random weights near-tied logits can flip on rounding differences"
        )
    if spec != common.SIZES[args.size]:
        return  # the targets belong to the presets as they are
    goal = TARGETS[args.size]
    for name in ("lmforge", *(["compiled"] if args.compile else [])):  # the target compares fp32 with fp32
        ratio = (n_new / timings[name].median) / base
        verdict = "met" if ratio >= goal else "MISSED"
        print(f"target: {labels[name].strip()}, fp32 / transformers fp32 = {ratio:.3f}x (target >= {goal:g} for "
              f"--size {args.size}: {verdict})")


if __name__ == "__main__":
    main()
