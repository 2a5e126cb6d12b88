"""Task fine-tuning: a backbone + a task head (or the LM itself for text2text) -> the shared trainer.

classify: sequence labels (from [CLS] for encoders, the last token for decoders); tokens: one label per
word (NER-style); span: extractive QA start/end; text2text: T5-style input -> target (or a decoder
trained on `input SEP target` with loss on the target only).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from lmforge.config import FinetuneConfig
from lmforge.data import task_data
from lmforge.data.sampler import shuffled_batches
from lmforge.errors import ConfigError
from lmforge.infer.generate import SamplingConfig, generate_ids
from lmforge.infer.generate_encdec import generate_encdec
from lmforge.manifest import CheckpointManifest
from lmforge.model import build_model, build_task_model
from lmforge.model.heads import best_span
from lmforge.peft.config import apply_peft_to_task_model, save_adapter_files
from lmforge.tokenizer import Tokenizer
from lmforge.train.console import report
from lmforge.train.objectives import IGNORE_INDEX, causal_lm_loss, seq2seq_loss
from lmforge.train.stage_setup import load_with_tokenizer, pad_id_of
from lmforge.train.task_losses import classification_loss, span_qa_loss, token_classification_loss
from lmforge.train.trainer import TrainResult, train

Example = task_data.Example


@dataclass
class FinetuneResult:
    train: TrainResult
    metrics: dict[str, float]  # on eval_file (empty without one)
    labels: list[str] | None


def read_examples(config: FinetuneConfig, path: str, tokenizer: Tokenizer, arch: str,
                  labels: list[str] | None) -> tuple[list[Example], list[str] | None]:
    """The task's examples from a JSONL file, laid out for the backbone's architecture."""
    common = dict(truncate=config.truncate, arch=arch)
    if config.task == "classify":
        return task_data.read_classification(path, tokenizer, config.max_len, labels, **common)
    if config.task == "tokens":
        return task_data.read_token_classification(path, tokenizer, config.max_len, labels, **common)
    if config.task == "span":
        return task_data.read_span_qa(path, tokenizer, config.max_len, **common), None
    return task_data.read_text2text(path, tokenizer, config.max_len, **common), None


def task_loss(task: str, arch: str):
    if task == "text2text":
        return seq2seq_loss if arch == "encdec" else causal_lm_loss
    return {"classify": classification_loss, "tokens": token_classification_loss, "span": span_qa_loss}[task]


@torch.inference_mode()
def evaluate_task(model: torch.nn.Module, tokenizer: Tokenizer, task: str, examples: list[Example],
                  pad_id: int, batch_size: int = 32) -> dict[str, float]:
    """Accuracy-style metrics on held-out examples: classify -> accuracy; tokens -> accuracy over labelled
    words; span -> exact match of (start, end); text2text -> exact match of the greedy output."""
    model.eval()
    if task == "text2text":
        return {"exact_match": _text2text_exact_match(model, tokenizer, examples)}
    correct = total = 0
    for i in range(0, len(examples), batch_size):
        batch = task_data.collate(examples[i:i + batch_size], pad_id)
        out = model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        if task == "classify":
            correct += int((out.argmax(-1) == batch["labels"]).sum())
            total += len(batch["labels"])
        elif task == "tokens":
            labelled = batch["labels"] != IGNORE_INDEX
            correct += int((out.argmax(-1)[labelled] == batch["labels"][labelled]).sum())
            total += int(labelled.sum())
        else:
            start, end = best_span(out[0], out[1], allowed=batch["attention_mask"].bool())
            correct += int(((start == batch["start_positions"]) & (end == batch["end_positions"])).sum())
            total += len(start)
    return {"accuracy" if task != "span" else "exact_match": correct / max(total, 1)}


def _text2text_exact_match(model: torch.nn.Module, tokenizer: Tokenizer, examples: list[Example]) -> float:
    eos = tokenizer.eos_id
    hits = 0
    for ex in examples:
        labels = [t for t in ex["labels"] if t != IGNORE_INDEX]
        cfg = SamplingConfig(max_new_tokens=len(labels) + 4, temperature=0.0)
        if model.cfg.arch == "encdec":
            out = generate_encdec(model, ex["input_ids"], cfg, eos)
        else:  # the prompt is everything before the first labelled position, plus the separator
            prompt_len = ex["labels"].index(labels[0]) + 1
            out = generate_ids(model, ex["input_ids"][:prompt_len], cfg, eos)
        hits += out == labels[:-1]  # the target without its EOS (generation stops there)
    return hits / max(len(examples), 1)


def finetune(config: FinetuneConfig, resume: bool = False, accept_config_change: bool = False) -> FinetuneResult:
    """Fine-tune config.base on config.train_file; evaluate on config.eval_file when given."""
    if not config.base or not config.train_file:
        raise ConfigError("finetune needs a base model (--base DIR) and training data (--train-file FILE)")
    backbone, tokenizer = load_with_tokenizer(config.base, "fine-tuning on text")
    arch = backbone.cfg.arch
    if config.task in ("classify", "tokens", "span") and arch == "encdec":
        raise ConfigError(f"--task {config.task} needs an encoder or decoder backbone; {config.base} is an "
                          "encoder-decoder (use --task text2text)")
    if config.task == "text2text" and arch == "encoder":
        raise ConfigError(f"--task text2text needs a model that generates; {config.base} is an encoder")
    if config.from_scratch:  # the same architecture with fresh weights: the no-pretraining baseline
        torch.manual_seed(config.train.seed)
        backbone = build_model(backbone.cfg)
    pad_id = pad_id_of(tokenizer)
    examples, labels = read_examples(config, config.train_file, tokenizer, arch, config.labels)
    eval_examples = None
    if config.eval_file:
        eval_examples, _ = read_examples(config, config.eval_file, tokenizer, arch, labels)
    torch.manual_seed(config.train.seed)
    model = build_task_model(config.task, backbone, len(labels) if labels else None, config.dropout)
    if config.peft is not None:
        report(apply_peft_to_task_model(model, config.peft))
    run_config = CheckpointManifest.of_run("finetune", config, model=backbone.cfg, task=config.task, peft=config.peft,
                                           labels=labels, num_labels=len(labels) if labels else None)
    batch_at = shuffled_batches(examples, config.train.batch_size, config.train.seed,
                                partial(task_data.collate, pad_id=pad_id))
    val = None
    if eval_examples:  # validation loss on the first eval examples, for the loss curve
        val_batch = task_data.collate(eval_examples[:config.train.batch_size], pad_id)

        def val() -> list[dict[str, torch.Tensor]]:
            return [val_batch]
    final_eval = partial(evaluate_task, tokenizer=tokenizer, task=config.task, examples=eval_examples,
                         pad_id=pad_id) if eval_examples else None
    result = train(model, config.train, batch_at, task_loss(config.task, arch), run_config=run_config,
                   tokenizer=tokenizer, val_batches=val, resume=resume, accept_config_change=accept_config_change,
                   perplexity=config.task == "text2text", final_eval=final_eval)
    if config.peft is not None:
        save_adapter_files(model, config.peft, config.train.out_dir)
    return FinetuneResult(result, result.eval_metrics, labels)
