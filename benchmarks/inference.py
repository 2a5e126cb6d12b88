"""Inference benchmarks: lmforge vs transformers on the same weights, plus lmforge's own speed features.

Tables (all greedy, exactly N new tokens, inside torch.inference_mode(), contenders timed in interleaved
rounds, medians with spread = (max - min) / median):

1. decode tokens/s at batch 1 (lmforge generate_ids vs HF generate) and batch 8 (lmforge generate_batch vs HF
   generate on a left-padded batch of ragged prompts), with the fraction of the memory-bandwidth bound at
   batch 1 (tok/s x weight bytes read per token / read bandwidth measured in this run);
2. prefill tokens/s (one forward over a --prefill-len prompt) and time to first token (generate, 1 new token);
3. KV cache vs none at 64/256/1024 new tokens (lmforge, batch 1; no-cache recomputes the whole sequence each
   step, so it runs only up to --no-cache-max);
4. speculative vs plain greedy: a random-init draft >= 4x smaller and the target as its own draft (every draft
   token accepted); the trained pair is in benchmarks/speculative.py;
5. int8 / int4 weight-only quantisation vs fp32: decode speed and weight bytes.

The model is the demo's GPT-2 decoder (vocab 1024, 4 layers, 6 heads, d_model 192) with 1024 + 64 positions so
the 1024-token runs fit (--ctx overrides).

    python benchmarks/inference.py
    python benchmarks/inference.py --json kv.json     # also save the KV-cache scaling numbers
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from lmforge.config import ModelConfig  # noqa: E402
from lmforge.cpu_threads import set_cpu_threads  # noqa: E402
from lmforge.eval.speed import kv_cache_scaling  # noqa: E402
from lmforge.eval.versus_hf import hf_greedy, left_pad  # noqa: E402
from lmforge.infer.generate import SamplingConfig, generate_ids  # noqa: E402
from lmforge.infer.layout import column_major_linears  # noqa: E402
from lmforge.infer.quant import QuantConfig, quantize_model  # noqa: E402
from lmforge.infer.speculative import speculative_generate  # noqa: E402
from lmforge.model.decoder import DecoderLM  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="lmforge inference benchmarks (decode batch 1/8, prefill, time to first token, KV cache "
        "scaling, speculative decoding, int8/int4) against transformers on identical weights.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    common.add_model_args(p)
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens for the decode runs (random ids)")
    p.add_argument("--new-tokens", type=int, default=128,
                   help="new tokens per decode run (batch 1/8, speculative, quantised)")
    p.add_argument("--batch", type=int, default=8, help="batch size of the batched decode table")
    p.add_argument("--prefill-len", type=int, default=256, help="prompt tokens for prefill and time to first token")
    p.add_argument("--kv-lengths", type=int, nargs="+", default=[64, 256, 1024],
                   help="new-token counts of the KV cache vs none table (lengths beyond the context are skipped)")
    p.add_argument("--no-cache-max", type=int, default=256,
                   help="longest run without the KV cache (its cost grows quadratically)")
    p.add_argument("--num-draft", type=int, default=4, help="draft tokens proposed per speculative round")
    p.add_argument("--group-size", type=int, default=64, help="int4 quantisation group size")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per table (median reported)")
    p.add_argument("--kv-repeats", type=int, default=3, help="repeats per length in the KV cache table")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads value; None keeps torch's own (one per core)")
    p.add_argument("--seed", type=int, default=0, help="seed for the weights and prompts")
    p.add_argument("--json", type=Path, default=None, help="save the KV-cache scaling results to this JSON file")
    return p.parse_args(argv)


def table(header: list[str], rows: list[list[str]], first: int = 34) -> None:
    widths = [first] + [max(9, len(h) + 2) for h in header[1:]]
    line = "".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths, strict=True)))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))


def state_bytes(model: nn.Module) -> int:
    seen = {t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}
    return sum(seen.values())


def greedy(n: int, use_cache: bool = True) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=n, temperature=0.0, stop_at_eos=False, use_cache=use_cache)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        set_cpu_threads(args.threads)
    spec = common.spec_from_args(args)
    if args.ctx is None:
        spec = replace(spec, max_seq_len=max(spec.max_seq_len, max(args.kv_lengths) + 64, args.prefill_len + 1))
    n_new, B = args.new_tokens, args.batch
    hf, lm = common.build_pair(spec, seed=args.seed)
    column_major_linears(lm)  # as `lmforge generate` runs it
    g = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, spec.vocab_size, (1, args.prompt_len), generator=g)
    prompt_ids = prompt[0].tolist()
    ones = torch.ones_like(prompt)

    def lm_gen(model: DecoderLM, n: int = n_new) -> Callable[[], list[int]]:
        return lambda: generate_ids(model, prompt_ids, greedy(n))

    def hf_gen(ids: torch.Tensor, mask: torch.Tensor, n: int = n_new) -> Callable[[], torch.Tensor]:
        return hf_greedy(hf, ids, mask, n)

    bandwidth = common.memory_bandwidth_gbs()
    print(f"\ninference | {spec.describe()} | {common.num_params(lm) / 1e6:.2f}M params | greedy | "
          f"{args.rounds} interleaved rounds, medians | spread = (max - min) / median")
    print(f"machine: {common.machine_line()}")
    fp32_bytes = common.decode_weight_bytes(lm)
    bound = bandwidth * 1e9 / fp32_bytes
    print(f"memory read bandwidth (measured, x.sum() over 512 MB): {bandwidth:.1f} GB/s | fp32 weights read per "
          f"token: {fp32_bytes / 1e6:.2f} MB | bandwidth bound at batch 1: {common.fmt_rate(bound)} tok/s")

    # --- 1. decode, batch 1 and batch B -----------------------------------------------------------------------
    same1 = lm_gen(lm)() == hf_gen(prompt, ones)()[0, args.prompt_len:].tolist()
    fns: dict[str, Callable[[], object]] = {"hf1": hf_gen(prompt, ones), "lm1": lm_gen(lm)}
    lens = [max(1, args.prompt_len - (i * args.prompt_len) // (2 * B)) for i in range(B)]  # ragged, >= half
    prompts = [torch.randint(0, spec.vocab_size, (n,), generator=g).tolist() for n in lens]
    padded, pmask = left_pad(prompts)  # left padding for HF
    width = padded.shape[1]
    fns["hfB"] = hf_gen(padded, pmask)
    batch_note = ""
    try:
        from lmforge.infer.batched import generate_batch

        out = generate_batch(lm, prompts, greedy(n_new), eos_id=None)
        if len(out) != B or any(len(o) != n_new for o in out):
            raise RuntimeError(f"returned {[len(o) for o in out]} tokens per row, expected {n_new} each")
        fns["lmB"] = lambda: generate_batch(lm, prompts, greedy(n_new), eos_id=None)
        hf_rows = hf_gen(padded, pmask)()[:, width:].tolist()
        solo = sum(o == generate_ids(lm, pr, greedy(n_new)) for o, pr in zip(out, prompts, strict=True))
        hf_same = sum(a == b for a, b in zip(out, hf_rows, strict=True))
        batch_note = f"batch-{B} greedy rows equal to lmforge batch 1: {solo}/{B}, to HF padded batch: {hf_same}/{B}"
    except Exception as err:  # the batched path is optional: report why it is missing
        batch_note = f"lmforge generate_batch: not available ({type(err).__name__}: {err})"
    with common.OtherLoad() as load:
        t = common.time_alternating(fns, rounds=args.rounds)
    print(f"\n[1] decode | prompt {args.prompt_len} (batch {B}: ragged {min(lens)}-{max(lens)}, HF left-padded), "
          f"{n_new} new tokens, KV cache | tok/s = all new tokens / wall time (prefill included)")
    rows = []
    labels = {"hf1": "transformers generate, batch 1", "lm1": "lmforge generate_ids, batch 1",
              "hfB": f"transformers generate, batch {B}", "lmB": f"lmforge generate_batch, batch {B}"}
    for key in ("hf1", "lm1", "hfB", "lmB"):
        if key not in t:
            rows.append([labels[key], "n/a", "n/a", "n/a", "n/a", "n/a"])
            continue
        b = B if key.endswith("B") else 1
        rate = b * n_new / t[key].median
        base = (b * n_new / t["hf" + key[2:]].median)
        frac = f"{rate / bound:.1%}" if b == 1 else "-"
        rows.append([labels[key], common.fmt_rate(rate), f"{t[key].median / n_new * 1e3:.2f}", f"{rate / base:.2f}x",
                     frac, f"{t[key].spread:.0%}"])
    table(["contender", "tok/s", "ms/step", "vs HF", "of bound", "spread"], rows)
    print(f"batch-1 greedy ids vs HF: {'identical' if same1 else 'DIFFERENT'} | {batch_note}")
    print("of bound: tok/s x weight bytes per token / measured bandwidth (batch 1 only)")
    print(load.describe())

    # --- 2. prefill and time to first token ---------------------------------------------------------------------
    P = args.prefill_len
    long = torch.randint(0, spec.vocab_size, (1, P), generator=g)
    long_ids, long_mask = long[0].tolist(), torch.ones_like(long)

    def fwd(model: nn.Module) -> Callable[[], object]:
        def run() -> object:
            with torch.inference_mode():
                return model(long)
        return run

    fns = {"hf_prefill": fwd(hf), "lm_prefill": fwd(lm), "hf_ttft": hf_gen(long, long_mask, 1),
           "lm_ttft": lambda: generate_ids(lm, long_ids, greedy(1))}
    with common.OtherLoad() as load:
        t = common.time_alternating(fns, rounds=args.rounds)
    print(f"\n[2] prefill: one forward over a {P}-token prompt (batch 1) | time to first token: generate with 1 new "
          "token (prefill + pick)")
    table(["contender", "prefill tok/s", "prefill ms", "TTFT ms", "spread"], [
        [name, common.fmt_rate(P / t[f"{k}_prefill"].median), f"{t[f'{k}_prefill'].median * 1e3:.2f}",
         f"{t[f'{k}_ttft'].median * 1e3:.2f}", f"{max(t[f'{k}_prefill'].spread, t[f'{k}_ttft'].spread):.0%}"]
        for name, k in (("transformers", "hf"), ("lmforge", "lm"))])
    print(load.describe())

    # --- 3. KV cache vs none ------------------------------------------------------------------------------------
    with common.OtherLoad() as load:
        kv = kv_cache_scaling(lm, prompt_ids, lengths=args.kv_lengths, no_cache_max=args.no_cache_max,
                              repeats=args.kv_repeats)
    print(f"\n[3] KV cache vs none | lmforge generate_ids, batch 1, prompt {args.prompt_len}, context {kv['context']} "
          f"| no-cache recomputes the whole sequence per token: run only up to {args.no_cache_max} new tokens")
    table(["new tokens", "cache tok/s", "no-cache tok/s", "speedup", "same ids", "spread"], [
        [str(r["new_tokens"]), common.fmt_rate(r["cache_tok_s"]),
         "not run" if r["no_cache_tok_s"] is None else common.fmt_rate(r["no_cache_tok_s"]),
         "-" if r["speedup"] is None else f"{r['speedup']:.1f}x",
         "-" if r["same_ids"] is None else ("yes" if r["same_ids"] else "NO"), f"{r['cache_spread']:.0%}"]
        for r in kv["rows"]], first=12)
    if kv["skipped"]:
        print(f"skipped (beyond the context): {kv['skipped']}")
    print(load.describe())
    if args.json:
        args.json.write_text(json.dumps({"machine": common.machine_line(), "model": spec.describe(), **kv}, indent=2))
        print(f"KV-cache scaling saved to {args.json}")

    # --- 4. speculative decoding --------------------------------------------------------------------------------
    torch.manual_seed(args.seed + 1)
    dcfg = ModelConfig(vocab_size=spec.vocab_size, max_seq_len=spec.max_seq_len, n_layer=1, n_head=2,
                       d_model=max(16, spec.d_model // 4))
    draft = DecoderLM(dcfg).float().eval()
    ratio = common.num_params(lm) / common.num_params(draft)
    plain = generate_ids(lm, prompt_ids, greedy(n_new))
    stats = {}
    for name, d in (("small", draft), ("self", lm)):
        ids, stats[name] = speculative_generate(lm, d, prompt_ids, greedy(n_new), num_draft=args.num_draft)
        stats[name].same = ids == plain
    fns = {"plain": lm_gen(lm),
           "small": lambda: speculative_generate(lm, draft, prompt_ids, greedy(n_new), num_draft=args.num_draft),
           "self": lambda: speculative_generate(lm, lm, prompt_ids, greedy(n_new), num_draft=args.num_draft)}
    with common.OtherLoad() as load:
        t = common.time_alternating(fns, rounds=args.rounds)
    print(f"\n[4] speculative vs plain greedy | batch 1, {n_new} new tokens, {args.num_draft} draft tokens per round "
          f"| random-init draft: 1 layer, d_model {dcfg.d_model}, {ratio:.1f}x fewer params than the target")
    base = n_new / t["plain"].median
    rows = [["plain greedy (generate_ids)", common.fmt_rate(base), "1.00x", "-", str(n_new), "yes",
             f"{t['plain'].spread:.0%}"]]
    for key, label in (("small", "speculative, small random draft"), ("self", "speculative, draft=target (bound)")):
        s, rate = stats[key], n_new / t[key].median
        rows.append([label, common.fmt_rate(rate), f"{rate / base:.2f}x", f"{s.acceptance_rate:.0%}",
                     str(s.target_forwards), "yes" if s.same else "NO", f"{t[key].spread:.0%}"])
    table(["contender", "tok/s", "vs plain", "accepted", "target fwds", "same ids", "spread"], rows)
    print("both models have random weights, whose greedy output soon repeats itself, so the acceptance rate here "
          "shows the mechanics (forwards saved, identical ids), not a real draft's; benchmarks/speculative.py "
          "measures a target and a distilled draft trained on the synthetic world. draft=target accepts everything: "
          "the fewest target forwards, paid for with full-size draft forwards")
    print(load.describe())

    # --- 5. int8 / int4 ---------------------------------------------------------------------------------------
    models = {"fp32": lm}
    reports = {}
    for bits in (8, 4):
        q = copy.deepcopy(lm)
        reports[bits] = quantize_model(q, QuantConfig(bits=bits, group_size=args.group_size, tied_embedding=True))
        models[f"int{bits}"] = q.eval()
    same = {k: generate_ids(m, prompt_ids, greedy(n_new)) == plain for k, m in models.items()}
    with common.OtherLoad() as load:
        t = common.time_alternating({k: lm_gen(m) for k, m in models.items()}, rounds=args.rounds)
    print(f"\n[5] weight-only quantisation | lmforge generate_ids, batch 1, {n_new} new tokens | int4 group "
          f"{args.group_size}; decode steps run PyTorch's weight-only int8/int4 CPU kernels (bf16 activations)")
    base = n_new / t["fp32"].median
    rows = []
    for k, m in models.items():
        rate, dbytes = n_new / t[k].median, common.decode_weight_bytes(m)
        rows.append([k, common.fmt_rate(rate), f"{rate / base:.2f}x", f"{state_bytes(m) / 1e6:.2f}",
                     f"{dbytes / 1e6:.2f}", f"{rate * dbytes / (bandwidth * 1e9):.1%}",
                     "yes" if same[k] else "no", f"{t[k].spread:.0%}"])
    table(["weights", "tok/s", "vs fp32", "state MB", "read MB/tok", "of bound", "=fp32 ids", "spread"], rows,
          first=10)
    print(f"quantised modules: {len(reports[8]['modules'])} Linears (a tied embedding/head among them, stored once); "
          "'=fp32 ids': greedy output identical to fp32 (rounding may flip near-tied logits)")
    print(load.describe())


if __name__ == "__main__":
    main()
