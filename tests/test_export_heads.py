"""Fine-tuned task models exported as transformers' task classes: logits within 1e-4 (fp32, eval mode) on a
right-padded batch, as transformers pools it (the last token that is not pad_token_id); other heads refused."""

from __future__ import annotations

import json

import pytest
import torch

import lmforge
from parity_helpers import perturb

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer  # noqa: E402

from lmforge.config import EncoderConfig, ModelConfig  # noqa: E402
from lmforge.data.task_data import read_classification  # noqa: E402
from lmforge.errors import ConfigError  # noqa: E402
from lmforge.model import build_model  # noqa: E402
from lmforge.model.heads import SequenceClassifier, SpanQAHead, TokenClassifier  # noqa: E402
from lmforge.model.value_heads import build_reward_model  # noqa: E402
from lmforge.tokenizer import train_tokenizer  # noqa: E402

ATOL = 1e-4
TEXTS = ["the cat sat on the mat", "a dog ran", "the sun is hot and the sea is blue"]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS * 10, vocab_size=400, show_progress=False)


def _backbone(arch: str, vocab: int):
    torch.manual_seed(0)
    if arch == "bert":
        cfg = EncoderConfig(vocab_size=vocab, max_seq_len=32, n_layer=2, n_head=4, d_model=32, d_ff=64)
    else:
        cfg = ModelConfig(family=arch, vocab_size=vocab, max_seq_len=32, n_layer=2, n_head=4, d_model=32,
                          **({"n_kv_head": 2} if arch == "llama" else {}))
    return build_model(cfg)


@pytest.mark.parametrize(("arch", "head", "auto"), [
    ("bert", SequenceClassifier, AutoModelForSequenceClassification),
    ("bert", TokenClassifier, AutoModelForTokenClassification),
    ("gpt2", SequenceClassifier, AutoModelForSequenceClassification),
    ("llama", SequenceClassifier, AutoModelForSequenceClassification),
    ("gpt_neox", SequenceClassifier, AutoModelForSequenceClassification),  # its LM head is named embed_out
])
def test_task_model_exports_with_the_same_logits(tmp_path, tok, arch, head, auto):
    model = head(_backbone(arch, tok.vocab_size), 3).eval()
    perturb(model, 0.2)
    out = lmforge.export_hf(model, tok, tmp_path / "export", labels=["neg", "neu", "pos"])
    theirs, info = auto.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert theirs.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": "neg"}) + "\n" for t in TEXTS))
    examples, _ = read_classification(data, tok, 32, arch="encoder" if arch == "bert" else "decoder")
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert [hf_tok(t)["input_ids"] for t in TEXTS] == [e["input_ids"] for e in examples]  # lmforge's layout
    batch = hf_tok(TEXTS, padding=True, return_tensors="pt")  # right padding with the pad token
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        ours = model(batch["input_ids"], attention_mask=batch["attention_mask"])
        hf_logits = theirs.eval()(**batch).logits
    keep = batch["attention_mask"].bool() if head is TokenClassifier else slice(None)
    assert (ours[keep] - hf_logits[keep]).abs().max() <= ATOL


@pytest.mark.parametrize(("arch", "build"), [
    ("gpt2", lambda b: SpanQAHead(b)), ("bert", lambda b: SpanQAHead(b)), ("llama", lambda b: TokenClassifier(b, 2)),
    ("gpt2", build_reward_model),
])
def test_other_heads_are_refused_naming_what_is_supported(tmp_path, tok, arch, build):
    model = build(_backbone(arch, tok.vocab_size))
    with pytest.raises(ConfigError, match=r"cannot export a \w+ with an? \w+ backbone.*supported: sequence") as err:
        lmforge.export_hf(model, tok, tmp_path / "export")
    assert "\n" not in str(err.value) and not (tmp_path / "export").exists()
