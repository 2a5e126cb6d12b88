"""The demo's parts without running it: stages share nothing but returned values, its budgets are step counts,
`--precision auto` follows a rule, and the report's interpreting sentences follow the figures."""

from __future__ import annotations

import ast
import json
from collections import defaultdict
from pathlib import Path

import pytest

import lmforge.demo
from lmforge.cpu_info import cpu_flags
from lmforge.data.formats import THINK_TRIGGER
from lmforge.demo import demo_plan
from lmforge.demo.accuracy import accuracy_cell, compare, effects_line
from lmforge.demo.agents_study import read_arithmetic
from lmforge.demo.decoder import auto_precision, pretrain_config
from lmforge.demo.prompting_study import read_problems
from lmforge.demo.verdicts import (
    early_loss_note,
    logp_change_note,
    paired_accuracy_note,
    pretraining_note,
    quantisation_note,
    serving_note,
    speculative_note,
)
from lmforge.eval.stats import mcnemar_exact, wilson_interval

DEMO_DIR = Path(lmforge.demo.__file__).parent
STAGES = ("decoder", "alignment", "inference", "evaluation", "peft", "families", "positions", "reasoning", "scale")


def parsed(name: str) -> ast.Module:
    path = DEMO_DIR / f"{name}.py"
    return ast.parse(path.read_text(), filename=str(path))


def test_no_two_demo_modules_name_the_same_run_directory() -> None:
    """A directory name written as `path / "name"` in two demo modules means one reads what the other wrote;
    checkpoints and data travel as returned values instead (file names such as metrics.jsonl are conventions)."""
    modules = defaultdict(set)
    for name in ("__init__", *STAGES):
        for node in ast.walk(parsed(name)):
            if (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant)
                    and isinstance(node.right.value, str) and "." not in node.right.value):
                modules[node.right.value].add(name)
    assert {d: sorted(m) for d, m in modules.items() if len(m) > 1} == {}


def test_no_demo_stage_imports_another_stage_or_a_private_name() -> None:
    imports = [(name, node.module, alias.name) for name in STAGES for node in ast.walk(parsed(name))
               if isinstance(node, ast.ImportFrom) and node.module for alias in node.names]
    assert [i for i in imports if i[1].removeprefix("lmforge.demo.") in STAGES or i[2].startswith("_")] == []


@pytest.mark.parametrize("quick", [True, False])
def test_decoder_trains_the_plans_fixed_step_budget(quick: bool, tmp_path: Path) -> None:
    plan = demo_plan(quick)
    config = pretrain_config(plan, tmp_path / "shards", tmp_path / "run", "fp32")
    assert config.train.max_steps == plan.decoder_steps > 0
    assert config.train.batch_size == plan.batch_size


def test_auto_precision_is_bf16_only_with_bf16_instructions(tmp_path: Path) -> None:
    sapphire_rapids = "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
    zen4 = "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n"
    cascade_lake = "flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni\n"
    zen3 = "flags\t\t: fpu sse2 avx2 fma\n"
    for text, expected in ((sapphire_rapids, ("bf16", "AMX bf16 tiles")), (zen4, ("bf16", "AVX512-BF16")),
                           (cascade_lake, ("fp32", "no bf16")), (zen3, ("fp32", "no bf16"))):
        (tmp_path / "cpuinfo").write_text(f"processor\t: 0\n{text}\nprocessor\t: 1\n{text}")
        chosen, why = auto_precision(cpu_flags(tmp_path / "cpuinfo"))
        assert chosen == expected[0] and expected[1] in why
    assert cpu_flags(tmp_path / "missing") == set() and auto_precision(set())[0] == "fp32"


def test_quantisation_note_follows_the_decode_speeds() -> None:
    slower = quantisation_note(1000.0, {"int8": 300.0, "int4": 1020.0})
    both = quantisation_note(1000.0, {"int8": 1500.0, "int4": 2000.0})
    mixed = quantisation_note(1000.0, {"int8": 900.0, "int4": 1800.0})
    assert len({slower, both, mixed}) == 3
    assert "int8 0.30x" in slower and "int4 1.02x" in slower and slower.startswith("No quantised model")
    assert "int8 1.50x" in both and "int4 2.00x" in both and "not" not in both
    assert mixed.startswith("int4") and "int8 0.90x" in mixed


def test_speculative_note_follows_the_speedup() -> None:
    paid, lost = speculative_note(1.6, 0.2, 1.1), speculative_note(0.6, 1.03, 1.87)
    assert "did not pay" in lost and "0.60x" in lost and "1.03" in lost
    assert "did not" not in paid and "1.60x" in paid
    assert "did not pay" in speculative_note(1.03, 0.5, 1.2)  # inside the noise: no claim of a gain


def test_serving_note_follows_the_throughput_ratios() -> None:
    met = serving_note({"1": {"vs_sequential": 1.0, "vs_best_transformers": 9.0},
                        "8": {"vs_sequential": 3.5, "vs_best_transformers": 2.4}})
    part = serving_note({"8": {"vs_sequential": 3.0, "vs_best_transformers": 2.5},
                         "32": {"vs_sequential": 4.0, "vs_best_transformers": 1.5}})
    missed = serving_note({"8": {"vs_sequential": 1.2, "vs_best_transformers": 0.8}})
    alone = serving_note({"1": {"vs_sequential": 0.9}, "4": {"vs_sequential": 2.1}})
    assert "3.50x at 8 clients" in met and "met the 2x target" in met and "2.40x at 8 clients" in met
    assert "1 clients" not in met  # one client is no test of batching
    assert "only in part" in part and "1.50x at 32 clients" in part
    assert "missed the 2x target" in missed and "0.80x at 8 clients" in missed
    assert "2.10x at 4 clients" in alone and "target" not in alone


def test_early_loss_note_compares_the_printed_means() -> None:
    lower = early_loss_note([2.0, 1.5, 1.0, 1.0, 1.0], [2.5, 2.0, 1.0, 1.0, 1.0])
    higher = early_loss_note([2.5, 1.0, 1.0, 1.0, 1.0], [2.0, 1.5, 1.0, 1.0, 1.0])
    same = early_loss_note([2.00001, 1.0, 1.0, 1.0, 1.0], [2.0, 1.0, 1.0, 1.0, 1.0])
    assert "lower than" in lower and "2.000 vs 2.500" in lower
    assert "higher than" in higher and "the same" in same and "2.000 vs 2.000" in same


def test_pretraining_note_says_raised_only_when_the_pretrained_score_is_higher() -> None:
    assert "did not raise" not in pretraining_note("sentiment", "accuracy", scratch=0.6, pretrained=0.8)
    assert "did not raise" in pretraining_note("sentiment", "accuracy", scratch=0.8, pretrained=0.8)
    assert "did not raise" in pretraining_note("sentiment", "accuracy", scratch=0.8, pretrained=0.6)


def test_paired_accuracy_note_claims_a_change_only_when_mcnemar_finds_one() -> None:
    sft = [True] * 30 + [False] * 70
    worse = [False] * 30 + [False] * 70  # 30 discordant items, all SFT's: p ~ 2e-9
    noisy = [True] * 27 + [False] * 3 + [False] * 70  # 3 discordant: p = 0.25
    better = [True] * 30 + [True] * 20 + [False] * 50
    assert paired_accuracy_note("DPO", "SFT", mcnemar_exact(sft, worse), 100).startswith("DPO was less accurate")
    assert paired_accuracy_note("DPO", "SFT", mcnemar_exact(sft, better), 100).startswith("DPO was more accurate")
    note = paired_accuracy_note("DPO", "SFT", mcnemar_exact(sft, noisy), 100)
    assert "within noise" in note and "-3.0%" in note and "p = 0.25" in note and "accurate than" not in note


def test_logp_change_note_follows_the_signs() -> None:
    fell = logp_change_note("DPO", -3.5, -20.25)
    assert "lowered the held-out chosen replies' log-prob by 3.50" in fell
    assert "lowered the rejected ones' by 20.25" in fell
    assert "raised the held-out chosen replies' log-prob by 0.40" in logp_change_note("DPO", 0.4, -9.0)


def test_reasoning_problems_ask_per_set_and_demonstrate_only_in_domain(tmp_path: Path) -> None:
    """The prompting tables ask `per_set` problems of each task and set; every demonstration pool, the
    out-of-domain questions' included, holds the task's in-domain problems only (the seeds' OOD setting)."""
    records = [{"task": task, "set": where, "question": f"{task} {where} {i}?", "answer": str(i), "rationale": "r"}
               for task in ("coin", "sum") for where in ("in_domain", "ood") for i in range(3)]
    path = tmp_path / "reasoning.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    problems = read_problems(path, 2)
    assert [q.example.question for q in problems.questions] == [
        f"{task} {where} {i}?" for task in ("coin", "sum") for where in ("in_domain", "ood") for i in range(2)]
    assert sorted(problems.pools) == ["coin (in_domain)", "coin (ood)", "sum (in_domain)", "sum (ood)"]
    for key, pool in problems.pools.items():
        assert [e.question for e in pool] == [f"{key.split()[0]} in_domain {i}?" for i in range(3)]
    assert all(q.example.question.endswith(THINK_TRIGGER) for q in problems.with_trigger())
    fitting = read_problems(path, 2, lambda question: not question.endswith(" 0?"))  # too long to ask twice
    assert [q.example.question for q in fitting.questions][:2] == ["coin in_domain 1?", "coin in_domain 2?"]
    assert fitting.pools == problems.pools
    arithmetic = tmp_path / "arithmetic.jsonl"
    arithmetic.write_text("".join(json.dumps({"set": s, "question": f"{s} {i}"}) + "\n"
                                  for s in ("in_domain", "ood") for i in range(4)))
    assert [r["question"] for r in read_arithmetic(arithmetic, 1)] == ["in_domain 0", "ood 0"]


def test_reasoning_cells_carry_wilson_intervals_and_claims_need_mcnemar() -> None:
    low, high = wilson_interval(7, 10)
    assert accuracy_cell([True] * 7 + [False] * 3) == f"70.0% [{low:.1%}, {high:.1%}]"
    never, always = [False] * 10, [True] * 10
    found = compare("CoT", "standard", never, always)
    assert found.p_value == f"{mcnemar_exact(never, always).p_value:.3g}" and float(found.p_value) < 0.05
    assert found.difference == "+100.0%" and "CoT was more accurate than standard" in found.note
    noise = compare("CoT", "standard", never, [True] + [False] * 9)
    assert float(noise.p_value) >= 0.05 and "within noise" in noise.note
    line = effects_line([found, noise])
    held, absent = line.split("Not seen at this scale")
    assert "CoT against standard" in held and "CoT against standard" in absent
    assert effects_line([noise]).startswith("No comparison here showed an effect")
