"""lmforge: the whole life of a language model in one small PyTorch codebase.

    model, tokenizer = lmforge.load("runs/demo/pretrain")    # lmforge run/checkpoint dir or HF dir
    lmforge.save(model, tokenizer, "my-model")
    lmforge.export_hf(model, tokenizer, "my-model-hf")       # loads in transformers.AutoModelForCausalLM
"""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"
__all__ = ["load", "save", "export_hf"]


def load(path: str | Path):
    """(model, tokenizer) from an lmforge checkpoint/run dir or a Hugging Face dir
    (config.json + *.safetensors [+ tokenizer.json]); tokenizer is None when the dir has none."""
    from lmforge.checkpoint import load_checkpoint
    from lmforge.model.hf import is_hf_dir, load_hf

    return load_hf(path) if is_hf_dir(path) else load_checkpoint(path)


def save(model, tokenizer, path: str | Path) -> Path:
    """Write an lmforge checkpoint dir (config.yaml + model.safetensors [+ tokenizer.json])."""
    from lmforge.checkpoint import save as save_checkpoint

    return save_checkpoint(model, tokenizer, path)


def export_hf(model, tokenizer, path: str | Path) -> Path:
    """Write a Hugging Face dir that transformers' AutoModelForCausalLM loads with the same logits."""
    from lmforge.model.hf import export_hf as _export

    return _export(model, tokenizer, path)
