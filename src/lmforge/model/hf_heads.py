"""Fine-tuned task models exported as transformers' task classes, with the same logits.

A sequence classifier on BERT becomes `BertForSequenceClassification` (pooler + `classifier`), on a decoder its
family's class, e.g. `GPT2ForSequenceClassification` / `LlamaForSequenceClassification` (a bias-free `score` on the last
token that is not `pad_token_id`, which is lmforge's last real token with right padding); a token classifier
on BERT becomes `BertForTokenClassification`. Other heads are refused. The exported tokenizer lays inputs out
as lmforge's task data did: [CLS] text [SEP] for BERT (`export_hf_bert`), text EOS for a decoder.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from lmforge.errors import ConfigError
from lmforge.model.heads import SequenceClassifier, TokenClassifier
from lmforge.model.hf import HFHead, export_hf, hf_model_type_of, with_eos_template
from lmforge.model.hf_bert import export_hf_bert
from lmforge.model.hf_families import HF_CLASS_PREFIX
from lmforge.tokenizer import Tokenizer

SUPPORTED = ("sequence classifiers on BERT or a decoder family (BertForSequenceClassification, "
             "GPT2ForSequenceClassification, LlamaForSequenceClassification, and Mistral's, Qwen2's, Qwen3's, "
             "GPTNeoX's) and token classifiers on BERT (BertForTokenClassification)")


def _label_config(num_labels: int, labels: list[str] | None) -> dict:
    if labels is not None and len(labels) != num_labels:
        raise ConfigError(f"{len(labels)} label names for a head with {num_labels} outputs")
    names = labels if labels is not None else [f"LABEL_{i}" for i in range(num_labels)]
    return {"id2label": dict(enumerate(names)), "label2id": {name: i for i, name in enumerate(names)}}


def export_task_model(model: nn.Module, tokenizer: Tokenizer | None, path: str | Path,
                      labels: list[str] | None = None) -> Path:
    """Write a fine-tuned task model (`lmforge.model.heads`) as the matching transformers class; `labels` names
    its outputs (config.json's id2label), as the fine-tuning run recorded them."""
    backbone = getattr(model, "backbone", None)
    arch = getattr(getattr(backbone, "cfg", None), "arch", None)
    kind = {SequenceClassifier: "Sequence", TokenClassifier: "Token"}.get(type(model))
    if kind is not None and arch == "encoder":
        tensors = {f"classifier.{k}": v for k, v in model.classifier.state_dict().items()}
        head = HFHead(f"BertFor{kind}Classification", tensors, _label_config(model.num_labels, labels))
        return export_hf_bert(backbone, tokenizer, path, head)
    if kind == "Sequence" and arch == "decoder":
        family = HF_CLASS_PREFIX[hf_model_type_of(backbone.cfg)]
        head = HFHead(f"{family}ForSequenceClassification", {"score.weight": model.classifier.weight},
                      _label_config(model.num_labels, labels))
        return export_hf(backbone, None if tokenizer is None else with_eos_template(tokenizer), path, head=head)
    what = type(model).__name__ + (f" with a{'n' if arch[0] in 'aeiou' else ''} {arch} backbone" if arch else "")
    raise ConfigError(f"cannot export a {what} to Hugging Face format; supported: {SUPPORTED}")
