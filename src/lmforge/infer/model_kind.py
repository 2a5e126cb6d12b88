"""Which verbs a loaded model works with, so that a verb given the wrong kind of model says where it belongs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmforge.errors import LmforgeError

if TYPE_CHECKING:
    from torch.nn import Module

    from lmforge.tokenizer import Tokenizer

KIND_NAMES = {"decoder": "a decoder (GPT, Llama)", "encoder": "an encoder (BERT)",
              "encdec": "an encoder-decoder (T5)"}
# the verbs that take each kind of model, as a user would call them
KIND_VERBS = {
    "decoder": "lmforge generate, chat, serve, eval, sft, dpo, reward, ppo, grpo, distill, quantize, export",
    "encoder": "lmforge finetune --base DIR (--task classify, tokens or span) and lmforge export",
    "encdec": "lmforge generate (text to text), eval tasks, finetune --base DIR --task text2text, and export",
    "task": "lmforge export (a fine-tuned task model: its head scores text, it does not write it)",
}


def model_kind(model: Module) -> str:
    """decoder, encoder or encdec; `task` for a backbone with a task head (classifier, tagger, QA, reward)."""
    if hasattr(model, "backbone"):
        return "task"
    return getattr(getattr(model, "cfg", None), "arch", None) or "task"


def require_kind(model: Module, source: str, verb: str, kinds: tuple[str, ...]) -> str:
    """The model's kind; an LmforgeError (one line: what `verb` needs, which verbs this model works with) when it
    is not one of `kinds`."""
    kind = model_kind(model)
    if kind not in kinds:
        what = KIND_NAMES.get(kind, f"a task model ({type(model).__name__})")
        needs = " or ".join(KIND_NAMES[k] for k in kinds)
        raise LmforgeError(f"{source} holds {what}, and `{verb}` needs {needs}; this model works with: "
                           f"{KIND_VERBS[kind]}")
    return kind


def load_for_verb(source: str, verb: str, kinds: tuple[str, ...],
                  base: str | None = None) -> tuple[Module, Tokenizer, str]:
    """(model, tokenizer, kind) of `source` (`base`: a peft folder's base) for a verb that reads text with a model
    of one of `kinds`; an LmforgeError when it has no tokenizer or is of another kind."""
    import lmforge

    model, tokenizer = lmforge.load(source, base=base)
    if tokenizer is None:
        raise LmforgeError(f"{source} has no tokenizer.json; `{verb}` reads text and needs one")
    return model, tokenizer, require_kind(model, source, verb, kinds)
