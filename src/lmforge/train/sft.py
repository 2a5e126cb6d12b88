"""Supervised fine-tuning on conversations: loss on the assistant's tokens only, one conversation per row.

JSONL lines are `{"messages": [...]}` (OpenAI format) or `{"prompt": ..., "response": ...}`, rendered by a
chat template (lmforge's role tokens, Llama-2, Alpaca, or a Hugging Face Jinja template).
"""

from __future__ import annotations

from functools import partial

from lmforge.config import PeftConfig, StrictModel, TrainConfig
from lmforge.data.chat import get_chat_template
from lmforge.data.sampler import shuffled_batches
from lmforge.data.sft import read_sft
from lmforge.data.task_data import collate
from lmforge.errors import ConfigError
from lmforge.manifest import CheckpointManifest
from lmforge.peft.config import apply_peft, save_adapter_files
from lmforge.train.console import report
from lmforge.train.objectives import causal_lm_loss
from lmforge.train.stage_setup import load_decoder, pad_id_of, require_fits
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
    model, tokenizer = load_decoder(config.base, "sft")
    require_fits(model, config.base, config.max_len, config.max_len)  # rows hold max_len + 1 tokens; it reads max_len
    template = get_chat_template(config.template, tokenizer, config.base)
    data = read_sft(config.train_file, tokenizer, template, config.max_len, skip_bad_lines=config.skip_bad_lines)
    if data.skipped:
        report(f"skipped {data.skipped} bad lines of {config.train_file}")
    pad_id = pad_id_of(tokenizer)
    batch_at = shuffled_batches(data.examples, config.train.batch_size, config.train.seed,
                                partial(collate, pad_id=pad_id))
    val = None
    if config.eval_file:
        held_out = read_sft(config.eval_file, tokenizer, template, config.max_len,
                            skip_bad_lines=config.skip_bad_lines).examples
        val_batch = shuffled_batches(held_out, config.train.batch_size, 0, partial(collate, pad_id=pad_id))(0)

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
