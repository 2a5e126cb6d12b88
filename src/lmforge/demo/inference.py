"""Demo stage: inference. Decode speed with and without the KV cache, weight-only int8/int4 quantisation of
the pretrained decoder (size on disk, validation perplexity, decode speed) and speculative decoding with the
distilled student as the draft."""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

import lmforge
from lmforge.checkpoint import WEIGHTS_FILE, resolve_checkpoint
from lmforge.data.batches import PackedBatches
from lmforge.demo import StageResult
from lmforge.demo.verdicts import quantisation_note, speculative_note
from lmforge.eval.report import Section, markdown_table
from lmforge.eval.speed import kv_cache_scaling, speed_section
from lmforge.eval.versus_hf import versus_section
from lmforge.infer.generate import SamplingConfig, generate_ids
from lmforge.infer.layout import column_major_linears
from lmforge.infer.quantize_stage import quantize_checkpoint
from lmforge.infer.speculative import speculative_generate
from lmforge.train.objectives import causal_lm_loss

if TYPE_CHECKING:
    from lmforge.demo import DemoData, DemoPlan


PROMPTS = ("Question: What is the capital of", "One morning,", "Question: A coin is heads up.",
           "Question: Take the last letters of the words in", "In Velmoran, the word for",
           "Question: What is 12 plus 7?", "Once", "The people of")


@torch.inference_mode()
def validation_perplexity(model: torch.nn.Module, data: DemoData, seq_len: int, batches: int = 8) -> float:
    val = PackedBatches(data.shards.tokens("val"), seq_len, 8, seed=0, shuffle=False)
    n = min(batches, val.num_batches_per_epoch)
    return math.exp(sum(causal_lm_loss(model, val.batch(i)).mean().item() for i in range(n)) / n)


@torch.inference_mode()
def decode_tokens_per_s(model: torch.nn.Module, prompt: list[int], new_tokens: int = 64) -> float:
    cfg = SamplingConfig(max_new_tokens=new_tokens, temperature=0.0, stop_at_eos=False)
    generate_ids(model, prompt, cfg)  # warm-up
    start = time.perf_counter()
    generate_ids(model, prompt, cfg)
    return new_tokens / (time.perf_counter() - start)


def run(plan: DemoPlan, data: DemoData, pretrained: Path, draft: Path, out_dir: Path,
        report_dir: Path) -> StageResult:
    """Sections on the `pretrained` decoder's inference, and its quantised checkpoints; `draft` (a smaller decoder)
    drafts for speculative decoding."""
    fp32, tokenizer = lmforge.load(pretrained)
    column_major_linears(fp32)  # as `lmforge generate` runs it
    prompt = tokenizer.encode("Question: What is the capital of")
    seq_len = plan.decoder.max_seq_len
    fp32_bytes = (resolve_checkpoint(pretrained) / WEIGHTS_FILE).stat().st_size
    fp32_decode, decode, quantised = decode_tokens_per_s(fp32, prompt), {}, {}
    rows = [("fp32", f"{fp32_bytes / 2**20:.2f}", "1.00x", f"{validation_perplexity(fp32, data, seq_len):.3f}",
             f"{fp32_decode:,.0f}")]
    for bits in (8, 4):
        path, _ = quantize_checkpoint(pretrained, out_dir / f"int{bits}", bits=bits, group_size=64)
        quantised[f"int{bits} (quantised base)"] = path
        model, _ = lmforge.load(path)
        size = (path / WEIGHTS_FILE).stat().st_size
        decode[f"int{bits}"] = decode_tokens_per_s(model, prompt)
        rows.append((f"int{bits}" + (" (group 64)" if bits == 4 else " (per channel)"), f"{size / 2**20:.2f}",
                     f"{fp32_bytes / size:.2f}x", f"{validation_perplexity(model, data, seq_len):.3f}",
                     f"{decode[f'int{bits}']:,.0f}"))
    speed = speed_section(kv_cache_scaling(fp32, prompt, lengths=(32, 64, 128, 192)), report_dir)
    versus = versus_section(fp32, tokenizer, out_dir / "hf-export", PROMPTS)
    return StageResult([versus, speed, quantisation_section(rows, fp32_decode, decode),
                        speculative_section(fp32, lmforge.load(draft)[0], tokenizer, plan)], checkpoints=quantised)


def quantisation_section(rows: list[tuple], fp32_decode: float, decode: dict[str, float]) -> Section:
    return Section("Weight-only quantisation", "\n".join([
        "The pretrained decoder's Linear weights and its tied token embedding / head (codes stored once, under the "
        "head) quantised with min-max affine scaling (Delta = (max - min) / (2^b - 1)); decode steps run PyTorch's "
        "weight-only int8/int4 CPU kernels on bf16 activations, larger inputs are dequantised. The learned "
        "positions, norms and biases stay fp32. Perplexity on the validation split; decode speed = greedy, batch 1, "
        "64 new tokens with the KV cache.", "",
        markdown_table(["weights", "model.safetensors (MiB)", "smaller than fp32", "validation perplexity",
                        "decode tokens/s"], rows), "",
        quantisation_note(fp32_decode, decode),
    ]))


@torch.inference_mode()
def step_ms(model: torch.nn.Module, new_tokens: int, context: int = 32, repeats: int = 50) -> float:
    """Milliseconds of one cached forward over `new_tokens` tokens after `context` cached ones."""
    cache = model.new_cache(1, context + new_tokens)
    model(torch.zeros(1, context, dtype=torch.long), cache=cache)
    step = torch.zeros(1, new_tokens, dtype=torch.long)
    times = []
    for _ in range(repeats):
        cache.length = context
        start = time.perf_counter()
        model(step, cache=cache, keep_last=new_tokens)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def speculative_section(target: torch.nn.Module, draft: torch.nn.Module, tokenizer, plan: DemoPlan) -> Section:
    """Greedy speculative decoding with the distilled student (from the post-training stage) as the draft, and the
    cost model that explains the wall clock: per round, m draft steps plus one (m + 1)-token target step buy on
    average (1 - a^(m+1)) / (1 - a) tokens at acceptance rate a (Leviathan et al. 2023, eq. 1)."""
    m = 4
    column_major_linears(draft)
    prompts = PROMPTS[:5]
    cfg = SamplingConfig(max_new_tokens=plan.speculative_tokens, temperature=0.0)
    warm = tokenizer.encode(prompts[0])  # first calls pay one-off allocations: keep them out of the timing
    generate_ids(target, warm, cfg, tokenizer.eos_id)
    speculative_generate(target, draft, warm, cfg, num_draft=m, eos_id=tokenizer.eos_id, min_confidence=0.0)
    plain_time = spec_time = 0.0
    identical, proposed, accepted, target_forwards, plain_forwards = 0, 0, 0, 0, 0
    for text in prompts:
        ids = tokenizer.encode(text)
        start = time.perf_counter()
        plain = generate_ids(target, ids, cfg, tokenizer.eos_id)
        plain_time += time.perf_counter() - start
        start = time.perf_counter()
        fast, stats = speculative_generate(target, draft, ids, cfg, num_draft=m, eos_id=tokenizer.eos_id,
                                            min_confidence=0.0)
        spec_time += time.perf_counter() - start
        identical += fast == plain
        proposed, accepted = proposed + stats.proposed, accepted + stats.accepted
        target_forwards, plain_forwards = target_forwards + stats.target_forwards, plain_forwards + stats.plain_forwards
    size = sum(p.numel() for p in target.parameters()) / sum(p.numel() for p in draft.parameters())
    rate = accepted / max(proposed, 1)
    t_step, t_verify, t_draft = step_ms(target, 1), step_ms(target, m + 1), step_ms(draft, 1)
    per_round = (1 - rate ** (m + 1)) / (1 - rate) if rate < 1 else m + 1.0
    predicted = per_round * t_step / (m * t_draft + t_verify)
    return Section("Speculative decoding", "\n".join([
        f"Target: the pretrained decoder; draft: the distilled student ({size:.1f}x fewer parameters), proposing {m} "
        f"tokens per round (fixed, so the cost model below applies as written); greedy, up to "
        f"{plan.speculative_tokens} new tokens on {len(prompts)} prompts.", "",
        markdown_table(["what", "value"], [
            ("outputs identical to plain greedy decoding", f"{identical} of {len(prompts)}"),
            ("draft tokens accepted", f"{accepted} of {proposed} ({rate:.1%})"),
            ("target forwards", f"{target_forwards} (plain decoding: {plain_forwards})"),
            ("wall clock", f"{spec_time:.2f} s vs {plain_time:.2f} s plain ({plain_time / spec_time:.2f}x)"),
            ("one target step / one draft step / one target step over m + 1 tokens",
             f"{t_step:.2f} / {t_draft:.2f} / {t_verify:.2f} ms"),
            ("speedup the cost model predicts", f"{predicted:.2f}x"),
        ]), "",
        speculative_note(plain_time / spec_time, t_draft / t_step, t_verify / t_step),
    ]))
