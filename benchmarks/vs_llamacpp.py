"""Batch-1 greedy decode: lmforge vs llama.cpp (on lmforge's own GGUF export) vs transformers, same weights.

One Llama-family model of GPT-2-small size (97.5M parameters: 12 layers, d_model 768, 12 heads, vocab 8192, untied
head; random init, built in-process) is run three ways, each producing exactly N new tokens after the same prompt:
lmforge `generate_ids` (fp32, and its weight-only int8 / int4 `QuantLinear`s), llama.cpp through llama-cpp-python
on the file `lmforge export --format gguf --type f32|q8_0|q4_0` writes (the same `export_gguf`), and transformers
`generate` (fp32). Pairs: fp32 vs F32, int8 vs Q8_0, int4 vs Q4_0 (different schemes: Q8_0/Q4_0 keep one fp16
scale per block of 32 weights; lmforge int8 one scale per row, int4 a scale and zero point per group). All contenders
run in interleaved rounds in one process, with the same thread count; tok/s = N / wall time of the whole call
(the prompt's prefill included). The memory-read bandwidth (x.sum() over 512 MB) is measured in the same run, and
each contender's effective weight bandwidth is tok/s x the weight bytes one decode step reads (the token embedding,
only indexed, left out).

llama-cpp-python builds llama.cpp from source (about 5 minutes on 2 cores):

    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install -e '.[llamacpp]'
    python benchmarks/vs_llamacpp.py                  # the 97.5M model, 16-token prompt, 128 new tokens
    python benchmarks/vs_llamacpp.py --compile        # also lmforge's torch.compiled decode step

What the profile (torch profiler over the decode loop) shows on a 2-core Sapphire Rapids: eager fp32 loses time to
op calls (about 90 per layer), which the compiled step removes, so compiled lmforge streams weights about as fast as
llama.cpp F32. int8 spends most of its step in `_weight_int8pack_mm`, which widens int8 weights to bf16 where
llama.cpp multiplies int8 weights by int8-quantised activations with VNNI; the rest is QuantLinear's own ops around
the kernel (casts, scale and zero-point terms). int4 likewise in `_weight_int4pack_mm_for_cpu`. torch.compile does not
help them today: under it QuantLinear dequantises (the private kernels are not traceable).

Without llama-cpp-python installed the script says how to install it and exits 0. A virtual machine may list AMX
among its CPU flags without letting programs use it: there a GGML_NATIVE build dies with "Illegal instruction" on
Q8_0/Q4_0 (its AMX kernels); build without AMX instead: CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON
-DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_INT8=OFF".
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

INSTALL = ('llama-cpp-python is not installed; it builds llama.cpp from source (about 5 minutes): '
           'CMAKE_ARGS="-DGGML_NATIVE=ON" pip install -e \'.[llamacpp]\'')
# the size the issue measures: a Llama-family model with GPT-2 small's layers and width, 97.5M parameters
SPEC = common.ModelSpec(family="llama", vocab_size=8192, max_seq_len=512, n_layer=12, n_head=12, d_model=768)
PAIRS = (("fp32", "F32", "f32", None), ("int8", "Q8_0", "q8_0", 8), ("int4", "Q4_0", "q4_0", 4))
TARGET_FP32 = 0.8  # lmforge fp32 / llama.cpp F32, the target
TEXTS = ["the quick brown fox jumps over the lazy dog", "a tokenizer for the llama.cpp benchmark",
         "numbers like 12345 and 67890 split into digits"] * 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Batch-1 greedy decode tok/s: lmforge vs llama.cpp (its GGUF export) vs "
                                "transformers, fp32/F32, int8/Q8_0, int4/Q4_0, with the measured bandwidth bound.")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (default: 16)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens to generate, exactly this many (default: 128)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds; medians reported (default: 5)")
    p.add_argument("--threads", type=int, default=None, help="threads for torch and llama.cpp (default: torch's)")
    p.add_argument("--group-size", type=int, default=32, help="lmforge int4 group (default: 32, Q4_0's block)")
    p.add_argument("--layers", type=int, default=SPEC.n_layer, help=f"layers (default: {SPEC.n_layer})")
    p.add_argument("--d-model", type=int, default=SPEC.d_model,
                   help=f"width, heads of 64 (default: {SPEC.d_model}; a smaller model for a quick check)")
    p.add_argument("--vocab", type=int, default=SPEC.vocab_size, help=f"vocabulary (default: {SPEC.vocab_size})")
    p.add_argument("--no-transformers", action="store_true", help="leave transformers out")
    p.add_argument("--compile", action="store_true",
                   help="also time lmforge fp32 with its decode step under torch.compile (`generate --compile`)")
    p.add_argument("--seed", type=int, default=0, help="seed for the weights and the prompt (default: 0)")
    return p.parse_args(argv)


def llama_cpp_runner(path: Path, prompt: list[int], n_new: int, threads: int
                     ) -> tuple[Callable[[], list[int]], Callable[[], None]]:
    """llama.cpp greedy decode of `n_new` tokens after `prompt`, from an empty KV cache every call; and the function
    that frees the model (before the interpreter exits, when llama-cpp-python's own finaliser would fail)."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=len(prompt) + n_new, n_threads=threads, n_threads_batch=threads,
                          verbose=False)

    def run() -> list[int]:
        llm.reset()  # else generate reuses the prompt's cached keys and values from the last call
        out = []
        for tid in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            out.append(tid)
            if len(out) == n_new:
                return out
        return out
    return run, llm.close


def first_difference(a: list[int], b: list[int]) -> str:
    diff = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
    return "identical" if diff is None and len(a) == len(b) else f"differ from new token {diff}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if importlib.util.find_spec("llama_cpp") is None:
        print(INSTALL)
        return 0
    import gguf

    from lmforge.cpu_threads import set_cpu_threads
    from lmforge.eval.versus_hf import hf_greedy
    from lmforge.gguf_export import export_gguf
    from lmforge.infer.generate import SamplingConfig, generate_ids
    from lmforge.infer.layout import column_major_linears
    from lmforge.infer.quant import QuantConfig, quantize_model
    from lmforge.tokenizer import train_tokenizer

    if args.threads:
        set_cpu_threads(args.threads)
    threads = torch.get_num_threads()
    spec = dataclasses.replace(SPEC, n_layer=args.layers, d_model=args.d_model, n_head=args.d_model // 64,
                               vocab_size=args.vocab)
    n_new = args.new_tokens
    hf, row_major = common.build_pair(spec, seed=args.seed)
    lm = column_major_linears(copy.deepcopy(row_major))  # as `lmforge generate` runs it
    tokenizer = train_tokenizer(TEXTS, vocab_size=512, show_progress=False)
    prompt = torch.randint(0, tokenizer.vocab_size, (args.prompt_len,),
                           generator=torch.Generator().manual_seed(args.seed)).tolist()
    sampling = SamplingConfig(max_new_tokens=n_new, temperature=0.0, stop_at_eos=False)

    def lmforge_run(model: torch.nn.Module, compiled: bool = False) -> Callable[[], list[int]]:
        cfg = dataclasses.replace(sampling, compile=compiled)

        def run() -> list[int]:
            with torch.inference_mode():
                return generate_ids(model, prompt, cfg, eos_id=None)
        return run

    runs: dict[str, Callable[[], list[int]]] = {}
    weight_bytes: dict[str, int] = {}
    closers = []
    tmp = tempfile.TemporaryDirectory(prefix="lmforge-vs-llamacpp-")
    for ours, theirs, qtype, bits in PAIRS:
        model = lm
        if bits is not None:
            model = copy.deepcopy(lm)
            quantize_model(model, QuantConfig(bits=bits, group_size=args.group_size))
        runs[ours], weight_bytes[ours] = lmforge_run(model.eval()), common.decode_weight_bytes(model)
        path = export_gguf(row_major, tokenizer, Path(tmp.name) / f"{qtype}.gguf", qtype)
        runs[theirs], close = llama_cpp_runner(path, prompt, n_new, threads)
        closers.append(close)
        read = [t for t in gguf.GGUFReader(path).tensors if t.name != "token_embd.weight"]  # only indexed
        weight_bytes[theirs] = sum(int(t.n_bytes) for t in read)
    if args.compile:
        runs["fp32 compiled"], weight_bytes["fp32 compiled"] = lmforge_run(lm, compiled=True), weight_bytes["fp32"]
        start = time.perf_counter()
        runs["fp32 compiled"]()
        compile_s = time.perf_counter() - start
    if not args.no_transformers:
        hf_run = hf_greedy(hf, torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long), n_new)
        runs["transformers"] = lambda: hf_run()[0, len(prompt):].tolist()
        weight_bytes["transformers"] = weight_bytes["fp32"]

    ids = {name: run() for name, run in runs.items()}  # also the warm-up
    bandwidth = common.memory_bandwidth_gbs()
    with common.OtherLoad() as load:
        timings = common.time_alternating(runs, warmup=0, rounds=args.rounds)
    for close in closers:
        close()
    tmp.cleanup()
    rate = {name: n_new / t.median for name, t in timings.items()}

    print(f"\nbatch-1 greedy decode | {spec.describe()}, untied head | {common.num_params(lm) / 1e6:.1f}M params | "
          f"prompt {args.prompt_len}, {n_new} new tokens | {args.rounds} interleaved rounds (median) | "
          f"{threads} threads each")
    print(f"memory read bandwidth (measured, x.sum() over 512 MB): {bandwidth:.1f} GB/s")
    header = f"{'contender':<22}{'tok/s':>8}{'ms/token':>10}{'MB/token':>10}{'GB/s':>7}{'of bw':>7}{'spread':>8}"
    print(header)
    print("-" * len(header))
    for name, t in timings.items():
        label = name if name == "transformers" else f"llama.cpp {name}" if name.isupper() else f"lmforge {name}"
        gbs = rate[name] * weight_bytes[name] / 1e9
        print(f"{label:<22}{common.fmt_rate(rate[name]):>8}{t.median / n_new * 1e3:>10.2f}"
              f"{weight_bytes[name] / 1e6:>10.1f}{gbs:>7.1f}{gbs / bandwidth:>7.0%}{t.spread:>8.0%}")
    print("MB/token: weights one decode step reads (token embedding left out) | GB/s: tok/s x MB/token | "
          "spread: (max - min) / median")
    for ours, theirs, _, _ in PAIRS:
        print(f"lmforge {ours} / llama.cpp {theirs} = {rate[ours] / rate[theirs]:.2f}x | greedy ids: "
              f"{first_difference(ids[ours], ids[theirs])}")
    if "fp32 compiled" in rate:
        print(f"lmforge fp32 compiled / llama.cpp F32 = {rate['fp32 compiled'] / rate['F32']:.2f}x (first call, "
              f"which compiles: {compile_s:.1f} s)")
    if "transformers" in rate:
        print(f"transformers fp32 / llama.cpp F32 = {rate['transformers'] / rate['F32']:.2f}x | greedy ids vs "
              f"lmforge fp32: {first_difference(ids['transformers'], ids['fp32'])}")
    ratio = max(rate[name] for name in ("fp32", "fp32 compiled") if name in rate) / rate["F32"]
    print(f"target: lmforge fp32 >= {TARGET_FP32}x llama.cpp F32: {ratio:.3f}x, "
          f"{'met' if ratio >= TARGET_FP32 else 'MISSED'}")
    print(f"machine: {common.machine_line()}")
    print(load.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
