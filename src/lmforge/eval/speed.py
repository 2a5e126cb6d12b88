"""Decode speed with and without the KV cache, as a report section (table + plot).

Without the cache every new token re-runs the whole sequence, so its cost grows with the length: it is
only measured up to `no_cache_max` new tokens. Lengths that do not fit the model's context after the
prompt are skipped and named in the section.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from lmforge.eval.report import Section, markdown_table, plot_series
from lmforge.infer.generate import SamplingConfig, generate_ids
from lmforge.model.decoder import DecoderLM


def _timed(model: DecoderLM, prompt_ids: Sequence[int], n_new: int, use_cache: bool) -> tuple[float, list[int]]:
    cfg = SamplingConfig(max_new_tokens=n_new, temperature=0.0, stop_at_eos=False, use_cache=use_cache)
    t0 = time.perf_counter()
    ids = generate_ids(model, prompt_ids, cfg, eos_id=None)
    return time.perf_counter() - t0, ids


def kv_cache_scaling(
    model: DecoderLM,
    prompt_ids: Sequence[int],
    lengths: Sequence[int] = (64, 256, 1024),
    no_cache_max: int = 256,
    repeats: int = 3,
) -> dict:
    """Greedy batch-1 tokens/s with and without the KV cache for each number of new tokens in `lengths`.

    A length runs only if prompt + length fits `model.cfg.max_seq_len`; the no-cache path only up to
    `no_cache_max`. Cached and uncached runs alternate (median over `repeats` each, one warm-up first).
    Returns {context, prompt_len, no_cache_max, repeats, ran, skipped, rows}; each row holds new_tokens,
    cache_tok_s, no_cache_tok_s (None when not run), speedup (None likewise), same_ids (None likewise)."""
    context = model.cfg.max_seq_len
    prompt = list(prompt_ids)
    ran = [n for n in lengths if n >= 1 and len(prompt) + n <= context]
    skipped = [n for n in lengths if n not in ran]
    model.eval()
    if ran:
        _timed(model, prompt, min(ran), True)  # warm-up
        _timed(model, prompt, min(min(ran), no_cache_max), False)
    rows = []
    for n in ran:
        uncached = n <= no_cache_max
        cache_s, no_cache_s = [], []
        ids_cache = ids_plain = None
        for r in range(repeats):
            order = (True, False) if r % 2 == 0 else (False, True)
            for use_cache in order:
                if not use_cache and not uncached:
                    continue
                seconds, ids = _timed(model, prompt, n, use_cache)
                if use_cache:
                    cache_s.append(seconds)
                    ids_cache = ids
                else:
                    no_cache_s.append(seconds)
                    ids_plain = ids
        cache_rate = n / statistics.median(cache_s)
        plain_rate = n / statistics.median(no_cache_s) if uncached else None
        rows.append({
            "new_tokens": n,
            "cache_tok_s": cache_rate,
            "cache_spread": (max(cache_s) - min(cache_s)) / statistics.median(cache_s),
            "no_cache_tok_s": plain_rate,
            "speedup": cache_rate / plain_rate if plain_rate else None,
            "same_ids": ids_cache == ids_plain if uncached else None,
        })
    return {"context": context, "prompt_len": len(prompt), "no_cache_max": no_cache_max, "repeats": repeats,
            "threads": torch.get_num_threads(), "ran": ran, "skipped": skipped, "rows": rows}


def speed_section(results: dict, report_dir: str | Path) -> Section:
    """A report section for `kv_cache_scaling` results: a table and `kv_cache_scaling.png`."""
    report_dir = Path(report_dir)
    rows = results["rows"]

    def opt(v: float | None, fmt: str) -> str:
        return "not run" if v is None else format(v, fmt)

    table = markdown_table(
        ["new tokens", "KV cache tok/s", "no cache tok/s", "cache speedup", "same greedy ids"],
        [[r["new_tokens"], f"{r['cache_tok_s']:,.1f}", opt(r["no_cache_tok_s"], ",.1f"), opt(r["speedup"], ".2f"),
          "n/a" if r["same_ids"] is None else ("yes" if r["same_ids"] else "NO")] for r in rows],
    )
    series = {"KV cache": ([r["new_tokens"] for r in rows], [r["cache_tok_s"] for r in rows])}
    plain = [r for r in rows if r["no_cache_tok_s"] is not None]
    if plain:
        series["no cache (recompute)"] = ([r["new_tokens"] for r in plain], [r["no_cache_tok_s"] for r in plain])
    images = []
    if rows:
        plot_series(report_dir / "kv_cache_scaling.png", "greedy decode speed, batch 1", "new tokens",
                    "tokens/s", series, logy=True)
        images.append("kv_cache_scaling.png")
    ran = ", ".join(map(str, results["ran"])) or "none"
    notes = [
        f"Greedy decoding at batch 1 after a {results['prompt_len']}-token prompt, tokens/s = new tokens / wall "
        f"time of the whole call (prefill included), median of {results['repeats']} runs, "
        f"{results.get('threads', '?')} threads. Lengths run: {ran}.",
    ]
    if results["skipped"]:
        notes.append(f"Skipped (prompt + new tokens exceed the {results['context']}-token context): "
                     f"{', '.join(map(str, results['skipped']))}.")
    notes.append(f"Without the cache every step re-runs the whole sequence (quadratic total cost), so it runs only "
                 f"up to {results['no_cache_max']} new tokens.")
    return Section("Decode speed: KV cache vs none", " ".join(notes) + "\n\n" + table, images)
