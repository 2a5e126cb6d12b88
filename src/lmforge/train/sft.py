"""Supervised fine-tuning on conversations: loss on the assistant's tokens only, one conversation per row.

JSONL lines are `{"messages": [...]}` (OpenAI format) or `{"prompt": ..., "response": ...}`, rendered by a
chat template (lmforge's role tokens, Llama-2, Alpaca, or a Hugging Face Jinja template).
"""

from __future__ import annotations

import lmforge
from lmforge.config import PeftConfig, StrictModel, TrainConfig
from lmforge.data.chat import get_chat_template
from lmforge.data.sft import read_sft
from lmforge.errors import ConfigError
from lmforge.manifest import CheckpointManifest
from lmforge.peft.config import apply_peft, save_adapter_files
from lmforge.train.console import report
from lmforge.train.finetune import shuffled_batches
from lmforge.train.objectives import causal_lm_loss
from lmforge.train.trainer import TrainResult, train


class SFTConfig(StrictModel):
    base: str = ""  # the pretrained decoder: lmforge run/checkpoint dir or Hugging Face dir
    train_file: str = ""
    eval_file: str | None = None  # conversations for the validation loss
    template: str = "lmforge"  # lmforge | llama2 | alpaca | hf (the base dir's tokenizer_config.json)
    max_len: int = 256
    skip_bad_lines: bool = False
    peft: PeftConfig | None = None  # parameter-efficient SFT (LoRA, QLoRA, adapters, prefix, ...)
    train: TrainConfig = TrainConfig(out_dir="runs/sft", max_steps=300, lr=1e-3, min_lr=1e-4, warmup_steps=20,
                                     batch_size=16, eval_every=100, save_every=100)


def sft(config: SFTConfig, resume: bool = False, accept_config_change: bool = False) -> TrainResult:
    """Fine-tune config.base on config.train_file's conversations; the result loads with `lmforge.load`."""
    if not config.base or not config.train_file:
        raise ConfigError("sft needs a base model (--base DIR) and conversations (--train-file FILE)")
    model, tokenizer = lmforge.load(config.base)
    if tokenizer is None:
        raise ConfigError(f"{config.base} has no tokenizer.json; SFT on text needs one")
    if model.cfg.arch != "decoder":
        raise ConfigError(f"sft trains a decoder (GPT/Llama); {config.base} is an {model.cfg.arch}")
    if config.max_len > model.cfg.max_seq_len:  # rows hold up to max_len + 1 tokens; the model reads max_len
        raise ConfigError(f"--max-len {config.max_len} exceeds the context of {config.base} "
                          f"({model.cfg.max_seq_len} tokens); use --max-len {model.cfg.max_seq_len} or less")
    template = get_chat_template(config.template, tokenizer, config.base)
    data = read_sft(config.train_file, tokenizer, template, config.max_len, skip_bad_lines=config.skip_bad_lines)
    if data.skipped:
        report(f"skipped {data.skipped} bad lines of {config.train_file}")
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    batch_at = shuffled_batches(data.examples, config.train.batch_size, config.train.seed, pad_id)
    val = None
    if config.eval_file:
        held_out = read_sft(config.eval_file, tokenizer, template, config.max_len,
                            skip_bad_lines=config.skip_bad_lines).examples
        val_batch = shuffled_batches(held_out, config.train.batch_size, 0, pad_id)(0)

        def val() -> list:
            return [val_batch]

    if config.peft is not None:
        report(apply_peft(model, config.peft))
    model.train()
    run_config = CheckpointManifest.of_run("sft", config, model=model.cfg, peft=config.peft)
    result = train(model, config.train, batch_at, causal_lm_loss, run_config=run_config, tokenizer=tokenizer,
                   val_batches=val, resume=resume, accept_config_change=accept_config_change)
    if config.peft is not None:
        save_adapter_files(model, config.peft, config.train.out_dir)
    return result
