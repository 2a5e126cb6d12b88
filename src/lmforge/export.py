"""`lmforge export RUN`: a run or checkpoint as a Hugging Face model dir, a peft adapter folder or a GGUF file.

What the run recorded in its config.yaml travels with the export: the chat template of an SFT, DPO or RL
run (as Jinja, with its stop tokens), the label names of a fine-tuned classifier, and the PEFT method, which
`--format hf` and `--format gguf` merge into the weights first and `--format peft` writes as a portable adapter folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.errors import ConfigError

if TYPE_CHECKING:
    from lmforge.manifest import CheckpointManifest

FORMATS = ("hf", "peft", "gguf")


@dataclass
class Exported:
    path: Path
    note: str  # one line for the user: what was written, and any caveat


def run_chat_template(manifest: CheckpointManifest, tokenizer: Any) -> Any:
    """The `ChatTemplate` a run trained with (an `hf` one read from its starting model's dir), or None."""
    name = manifest.run.get("template")
    if name is None or tokenizer is None:
        return None
    from lmforge.data.chat import get_chat_template

    return get_chat_template(name, tokenizer, manifest.base)


def _default_base_name(ckpt: Path, base: str | None) -> str:
    from lmforge.model.hf import is_hf_dir

    if base and is_hf_dir(base):
        return str(Path(base).resolve())
    found = f"its base {base!r} is not a Hugging Face model dir" if base else "it records no base model"
    raise ConfigError(f"{ckpt}: {found}, so the adapter cannot name one; pass --base-name NAME (a hub id, or the "
                      f"dir of `lmforge export {base or 'BASE'} --format hf --out DIR`)")


def _export_hf_dir_gguf(path: Path, out: str | Path, gguf_type: str) -> Exported:
    import lmforge
    from lmforge.gguf_export import export_gguf
    from lmforge.infer.chat_repl import optional_chat_template

    model, tokenizer = lmforge.load(path)
    template = optional_chat_template(str(path), tokenizer) if tokenizer is not None else None
    written = export_gguf(model, tokenizer, out, gguf_type, chat_template=template, name=path.resolve().name)
    chat = ", its chat template" if template is not None else ""
    return Exported(written, f"wrote a GGUF file ({gguf_type}{chat}) for llama.cpp -> {written}")


def export_run(checkpoint: str | Path, fmt: str, out: str | Path, base_name: str | None = None,
               gguf_type: str | None = None) -> Exported:
    """Export the run or checkpoint dir `checkpoint` as `fmt` (hf, peft or gguf, whose matrices are `gguf_type`)
    into `out`. For gguf, `checkpoint` may also be a Hugging Face model dir (its own chat template goes along)."""
    import lmforge
    from lmforge.checkpoint import read_manifest, resolve_checkpoint, tensor_bytes, write_dir
    from lmforge.config import LORA_METHODS
    from lmforge.model.hf import is_hf_dir
    from lmforge.peft.config import merge_peft

    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "gguf" and is_hf_dir(checkpoint):
        return _export_hf_dir_gguf(Path(checkpoint), out, gguf_type or "f32")
    ckpt = resolve_checkpoint(checkpoint)
    manifest = read_manifest(ckpt)
    peft = manifest.peft
    if fmt != "peft" and base_name is not None:
        raise ConfigError("--base-name names the base of a peft adapter folder; it goes with --format peft")
    if fmt != "gguf" and gguf_type is not None:
        raise ConfigError(f"--type {gguf_type} is the tensor type of a GGUF file; it goes with --format gguf")
    if fmt == "peft" and (peft is None or peft.method not in LORA_METHODS):
        trained = f"trained with --peft {peft.method}" if peft else "not trained with --peft"
        raise ConfigError(f"{ckpt} was {trained}; the peft format holds LoRA-family adapters ("
                          f"{', '.join(LORA_METHODS)}); use --format hf")
    if fmt in ("peft", "gguf") and manifest.task:
        raise ConfigError(f"{ckpt} is a '{manifest.task}' task model; the {fmt} format holds causal language models, "
                          "so use --format hf (which merges the adapter into the task model)")
    model, tokenizer = lmforge.load(ckpt)
    template = run_chat_template(manifest, tokenizer)
    if fmt == "hf":
        if peft is not None:
            model = merge_peft(model, peft)
        path = lmforge.export_hf(model, tokenizer, out, chat_template=template, labels=manifest.labels)
        merged = f" ({peft.method} merged into the weights)" if peft else ""
        chat = f", chat template {template.name}" if template is not None else ""
        return Exported(path, f"wrote a Hugging Face model{merged}{chat} -> {path}")
    if fmt == "gguf":
        from lmforge.gguf_export import export_gguf

        if peft is not None:
            model = merge_peft(model, peft)
        gguf_type = gguf_type or "f32"
        path = export_gguf(model, tokenizer, out, gguf_type, chat_template=template,
                           name=Path(checkpoint).resolve().name)
        merged = f" ({peft.method} merged into the weights)" if peft else ""
        chat = f", chat template {template.name}" if template is not None else ""
        return Exported(path, f"wrote a GGUF file ({gguf_type}){merged}{chat} for llama.cpp -> {path}")
    from lmforge.peft.export import export_peft

    base_name = base_name or _default_base_name(ckpt, manifest.base)
    path = write_dir(out, lambda tmp: export_peft(model, tokenizer, tmp, peft, base_name=base_name,
                                                  chat_template=template), tensor_bytes(model.state_dict()))
    caveat = ("; note: QLoRA trained against the NF4-quantised base, so on the full-precision base the outputs "
              "differ by the quantisation error") if peft.method == "qlora" else ""
    return Exported(path, f"wrote a peft {peft.method} adapter for base {base_name} -> {path}{caveat}")
