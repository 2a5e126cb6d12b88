"""lmforge against transformers on the same weights, as a report section: greedy decode at batch 1 and batch 8,
prefill and time to first token.

The model is written with `export_hf` and read back with transformers' `AutoModelForCausalLM`, so both hold the
same fp32 weights. Each decode produces exactly N new tokens (EOS ignored on both sides); contenders run in
interleaved rounds and the medians are reported. transformers is a test/demo dependency, not a runtime one: without
it the section says so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from lmforge.eval.report import Section, markdown_table
from lmforge.eval.timing import time_alternating
from lmforge.infer.batched import generate_batch
from lmforge.infer.generate import SamplingConfig, generate_ids
from lmforge.model.decoder import DecoderLM
from lmforge.tokenizer import Tokenizer

TITLE = "Decode speed against transformers"


def hf_greedy(hf: torch.nn.Module, ids: Tensor, mask: Tensor, new_tokens: int) -> Callable[[], Tensor]:
    """transformers `generate`, greedy, exactly `new_tokens` new tokens after the (left-padded) `ids`."""
    def run() -> Tensor:
        with torch.inference_mode():
            return hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, use_cache=True, pad_token_id=0)
    return run


def left_pad(prompts: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    """[B, width] ids left-padded with 0 and the matching attention mask."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def speed_versus_transformers(model: DecoderLM, hf: torch.nn.Module, prompts: Sequence[Sequence[int]],
                              new_tokens: int = 64, prefill_len: int = 128, rounds: int = 5) -> dict:
    """Tokens/s of lmforge and transformers: decode at batch 1 (prompts[0]) and batch len(prompts), a prefill
    forward over `prefill_len` tokens, time to first token. Returns {rows: [(what, hf, lmforge, ratio)],
    same_rows (greedy outputs equal to transformers', of rows_compared), new_tokens, batch, prefill_len, rounds}."""
    greedy = SamplingConfig(max_new_tokens=new_tokens, temperature=0.0, stop_at_eos=False)
    first = list(prompts[0])
    one = torch.tensor([first])
    ids, mask = left_pad(prompts)
    long = torch.randint(0, model.cfg.vocab_size, (1, prefill_len), generator=torch.Generator().manual_seed(0))

    def forward(m: torch.nn.Module) -> Callable[[], object]:
        def run() -> object:
            with torch.inference_mode():
                return m(long)
        return run

    fns = {
        "hf1": hf_greedy(hf, one, torch.ones_like(one), new_tokens),
        "lm1": lambda: generate_ids(model, first, greedy),
        "hfB": hf_greedy(hf, ids, mask, new_tokens),
        "lmB": lambda: generate_batch(model, prompts, greedy),
        "hf_prefill": forward(hf), "lm_prefill": forward(model),
        "hf_ttft": hf_greedy(hf, long, torch.ones_like(long), 1),
        "lm_ttft": lambda: generate_ids(model, long[0].tolist(), SamplingConfig(max_new_tokens=1, temperature=0.0)),
    }
    t = time_alternating(fns, rounds=rounds)
    B = len(prompts)

    def rate(key: str, tokens: int) -> float:
        return tokens / t[key].median

    rows = [
        ("decode tok/s, batch 1", rate("hf1", new_tokens), rate("lm1", new_tokens)),
        (f"decode tok/s, batch {B}", rate("hfB", B * new_tokens), rate("lmB", B * new_tokens)),
        (f"prefill tok/s, {prefill_len} tokens", rate("hf_prefill", prefill_len), rate("lm_prefill", prefill_len)),
        (f"time to first token, ms ({prefill_len}-token prompt)", 1e3 * t["hf_ttft"].median,
         1e3 * t["lm_ttft"].median),
    ]
    rows = [(what, h, m, m / h if "tok/s" in what else h / m) for what, h, m in rows]
    ours = [fns["lm1"](), *fns["lmB"]()]
    theirs = [fns["hf1"]()[0, one.shape[1]:].tolist(), *fns["hfB"]()[:, ids.shape[1]:].tolist()]
    same = sum(a == b for a, b in zip(ours, theirs, strict=True))
    return {"rows": rows, "same_rows": same, "rows_compared": len(ours), "new_tokens": new_tokens, "batch": B,
            "prefill_len": prefill_len, "rounds": rounds}


def versus_section(model: DecoderLM, tokenizer: Tokenizer, work_dir: Path, texts: Sequence[str],
                   new_tokens: int = 64) -> Section:
    """The report section: `model` exported to `work_dir`, reloaded in transformers, both timed on `texts`."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        return Section(TITLE, "Not measured: transformers is not installed (`pip install transformers`).")
    from lmforge.model.hf import export_hf

    hf = AutoModelForCausalLM.from_pretrained(export_hf(model, tokenizer, work_dir), attn_implementation="sdpa")
    hf.generation_config.eos_token_id = None  # like stop_at_eos=False: EOS is a token like any other, not banned
    r = speed_versus_transformers(model.eval(), hf.eval(), [tokenizer.encode(t) for t in texts], new_tokens)
    table = markdown_table(["measurement", "transformers", "lmforge", "lmforge advantage"],
                           [(what, f"{h:,.1f}", f"{m:,.1f}", f"{ratio:.2f}x") for what, h, m, ratio in r["rows"]])
    same = f"{r['same_rows']} of {r['rows_compared']} identical (a near-tie can flip on rounding)"
    return Section(TITLE, "\n".join([
        f"The pretrained decoder and the same weights in transformers' `generate` (exported with `export_hf`), fp32, "
        f"greedy, exactly {r['new_tokens']} new tokens per row (prefill included in decode tok/s); batch {r['batch']}"
        f" holds prompts of different lengths, left-padded for transformers. Medians of {r['rounds']} interleaved "
        f"rounds, {torch.get_num_threads()} threads. Greedy outputs (batch 1 and each batched row): {same}.", "", table,
    ]))
