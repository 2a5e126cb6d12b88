"""Demo stage: reasoning, agents and retrieval (issue 15). The pretrained decoder is fine-tuned on the format data
(`lmforge.data.format_data`: step-by-step and direct answers, ReAct, CodeAct, grounded QA; a run of its own, apart
from alignment's SFT, so earlier sections keep their meaning), then measured on held-out prompts: the share of
well-formed replies per format, the prompting methods (`demo.prompting_study`), and ReAct, CodeAct and RAG
(`demo.agents_study`).

Which model each method runs on: plain-text prompting (shots, many-shot, repetition) on the pretrained decoder,
whose pretraining text is the world's "Question: ... Answer:" format; chat-turn prompting, CoT, the agents and RAG
on the format-SFT chat model, the only one that knows their formats."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import lmforge
from lmforge.data.chat import get_chat_template
from lmforge.data.format_data import SFT_FILE, write_format_data
from lmforge.data.formats import well_formed_direct, well_formed_step_by_step
from lmforge.demo.accuracy import accuracy_cell
from lmforge.demo.agents_study import agent_section, build_index, rag_section, read_arithmetic
from lmforge.demo.prompting_study import STANDARD, TAUGHT, base_section, chat_section, fits_twice, read_problems
from lmforge.demo.training import short_run
from lmforge.eval.report import Section, markdown_table
from lmforge.train.sft import SFTConfig, sft

if TYPE_CHECKING:
    from lmforge.demo import DemoData, DemoPlan

SFT_LR = 1e-3


def run(plan: DemoPlan, data: DemoData, pretrained: Path, out_dir: Path, report_dir: Path) -> list[Section]:
    size = plan.reasoning
    work = out_dir / "reasoning"
    files = write_format_data(plan.world, data.dir / "formats", size["conversations"], size["eval"])
    sft(SFTConfig(base=str(pretrained), train_file=str(files[SFT_FILE]), max_len=plan.decoder.max_seq_len,
                  train=short_run(work / "format-sft", size["sft_steps"], SFT_LR)))
    chat_model, tokenizer = lmforge.load(work / "format-sft")
    base, _ = lmforge.load(pretrained)
    chat = get_chat_template("lmforge", tokenizer)
    chat_model.eval()
    base.eval()

    problems = read_problems(files["formats_eval_reasoning"], size["reasoning_per_set"],
                             fits_twice(tokenizer, chat, plan.decoder.max_seq_len, size["new_tokens"]),
                             size["new_tokens"])
    prompting, runs = chat_section(chat_model, tokenizer, chat, problems, work / "prompting")
    shots = base_section(base, chat_model, tokenizer, chat, problems, runs[STANDARD], work / "prompting", report_dir)
    index = build_index(files["rag_docs"])
    arithmetic = read_arithmetic(files["formats_eval_arithmetic"], size["agent_per_set"])
    agents, well_formed = agent_section(chat_model, tokenizer, chat, arithmetic, index, work / "agents")
    rag_questions = [json.loads(line) for line in files["rag_questions"].read_text().splitlines()]
    rag, grounded = rag_section(chat_model, tokenizer, chat, index, rag_questions, work / "rag")
    well_formed = {
        "direct (the question alone)": [well_formed_direct(c) for c in runs[STANDARD].completions()],
        "step by step (the question and \"Let's think step by step.\")":
            [well_formed_step_by_step(c) for c in runs[TAUGHT].completions()],
        "ReAct (calculator and search offered)": well_formed["react"],
        "CodeAct": well_formed["codeact"],
        "grounded QA (answer and citation)": grounded}
    return [formats_section(size, well_formed), prompting, shots, agents, rag]


def formats_section(size: dict[str, int], well_formed: dict[str, list[bool]]) -> Section:
    rows = [(name, len(checks), accuracy_cell(checks)) for name, checks in well_formed.items()]
    return Section("Reasoning formats taught by SFT", "\n".join([
        f"The pretrained decoder fine-tuned for {size['sft_steps']} steps on {size['conversations']} synthetic "
        "conversations that teach the formats (`lmforge.data.format_data`): a rationale ending \"The answer is X.\" "
        "when asked to think step by step and the answer alone otherwise, ReAct transcripts (Thought / Action: "
        "tool[input] / Observation / Final answer) with a calculator and a document search, CodeAct (a fenced "
        "Python block, its printed output the observation) and grounded QA with a numbered citation. It is a run "
        "of its own: the post-training SFT above never saw these formats. Well-formed = the reply or transcript "
        "has the format's exact shape (`lmforge.data.formats.well_formed_*`), on held-out prompts whose questions "
        "no training text holds (in-domain and out-of-domain together; the prompts of the tables below):", "",
        markdown_table(["format", "held-out prompts", "well-formed [95% CI]"], rows), "",
        "Which model each method runs on: plain-text prompting (the shots curve, many-shot, repetition) on the "
        "pretrained decoder, whose pretraining text is the world's `Question: ... Answer:` format; chat-turn "
        "prompting (standard, few-shot, CoT, zero-shot CoT, self-consistency, Auto-CoT, repetition), ReAct, CodeAct "
        "and RAG on this format-SFT chat model, the only one of the run that knows their formats.",
    ]))
