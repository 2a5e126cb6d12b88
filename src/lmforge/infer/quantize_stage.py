"""`lmforge quantize`: an lmforge checkpoint with int8 / packed-int4 weights (see `lmforge.infer.quant`).

The written config.yaml holds `model:` and `quant:`; a loader builds the fp32 model, swaps in empty QuantLinear shells
(`apply_quant_from_config`) and then loads model.safetensors, whose Linear weights are uint8 codes + fp32 scales +
uint8 zero points. A head tied to the embedding (GPT-2) is quantised with it by default (`quant.tied_embedding`):
its codes are stored once, under `lm_head.`, and the embedding looks its rows up there. Written into a temp dir and
renamed into place, like every checkpoint; nothing is pickled.
"""

from __future__ import annotations

from pathlib import Path

from lmforge.checkpoint import write_model_dir
from lmforge.errors import ConfigError
from lmforge.infer.quant import quant_config, quantize_model
from lmforge.manifest import CheckpointManifest
from lmforge.peft.lora import LoRALinear


def quantize_checkpoint(src: str | Path, out: str | Path, bits: int = 8, group_size: int = 64,
                        tied_embedding: bool = True) -> tuple[Path, dict]:
    """Load `src` (lmforge or HF dir), quantise its Linears (and a tied embedding/head pair, unless
    `tied_embedding=False` keeps it fp32), write an lmforge checkpoint at `out` atomically.
    Returns (out, the quantize_model report)."""
    import lmforge

    cfg = quant_config(bits, group_size, tied_embedding=tied_embedding)
    model, tokenizer = lmforge.load(src)
    if not hasattr(model, "blocks") or getattr(model.cfg, "arch", "decoder") != "decoder":
        raise ConfigError(f"{src}: quantize supports decoder LMs; this is a {type(model).__name__}")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ConfigError(f"{src} carries PEFT adapters; merge them first, then quantize the merged checkpoint")
    report = quantize_model(model, cfg)
    cfg = cfg.model_copy(update={"tied_embedding": report["tied_embedding"]})  # what was done: false when untied
    out = write_model_dir(Path(out), model, tokenizer, CheckpointManifest(model=model.cfg, quant=cfg))
    return out, report
