"""BERT Hugging Face interop: lmforge's EncoderModel and transformers agree both ways.

Every model is built in-process from random init, every parameter perturbed so biases and norms
matter (no downloads). Parity means max abs diff <= 1e-4 in fp32, eval mode, over the non-padding
positions of a batch with padding and token_type_ids mixing 0 and 1.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from parity_helpers import perturb

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    BertForPreTraining,
    BertForSequenceClassification,
    BertModel,
    BertTokenizer,
)

from lmforge.config import EncoderConfig  # noqa: E402
from lmforge.errors import CheckpointError, ConfigError  # noqa: E402
from lmforge.model.encoder import EncoderModel  # noqa: E402
from lmforge.model.hf import HFHead  # noqa: E402
from lmforge.model.hf_bert import config_from_hf_bert, export_hf_bert, load_hf_bert, wordpiece_tokenizer  # noqa: E402

ATOL = 1e-4
VOCAB, B, T = 300, 3, 20


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)



def _hf_config(**kw) -> BertConfig:
    kw = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
              max_position_embeddings=64, type_vocab_size=2) | kw
    return BertConfig(**kw)


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ids; row 1 and 2 padded at the end; segments A (0) then B (1)."""
    ids = torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 13:] = 0
    mask[2, 6:] = 0
    types = torch.zeros(B, T, dtype=torch.long)
    types[:, 4:] = 1
    return ids, types, mask


def _assert_close(ours: torch.Tensor, theirs: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    diff = (ours - theirs) if mask is None else (ours - theirs)[mask.bool()]
    assert diff.abs().max().item() <= ATOL, f"max abs diff {diff.abs().max().item():.2e} > {ATOL}"


def _save(hf_model, tmp_path):
    perturb(hf_model, 0.2)  # at 0.05 the gelu / gelu_new gap sits near the tolerance
    hf_model.eval().save_pretrained(tmp_path)
    return tmp_path


# ---------------------------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("act", ["gelu", "gelu_new", "relu"])
def test_masked_lm_parity(tmp_path, act) -> None:
    hf = BertForMaskedLM(_hf_config(hidden_act=act))
    ours, tok, extra = load_hf_bert(_save(hf, tmp_path))
    assert tok is None and extra == {}
    ids, types, mask = _inputs()
    with torch.no_grad():
        out = hf(input_ids=ids, token_type_ids=types, attention_mask=mask, output_hidden_states=True)
        _assert_close(ours.hidden(ids, types, mask), out.hidden_states[-1], mask)
        _assert_close(ours(ids, types, mask), out.logits, mask)


def test_bert_model_parity_without_mlm_head(tmp_path) -> None:
    """A bare BertModel has a pooler but no MLM head: it loads, the head stays at init."""
    hf = BertModel(_hf_config())
    ours, _, extra = load_hf_bert(_save(hf, tmp_path))
    assert extra == {}
    assert ours.mlm_bias.abs().max() == 0 and torch.all(ours.mlm_norm.weight == 1)
    ids, types, mask = _inputs()
    with torch.no_grad():
        out = hf(input_ids=ids, token_type_ids=types, attention_mask=mask)
        h = ours.hidden(ids, types, mask)
        _assert_close(h, out.last_hidden_state, mask)
        _assert_close(ours.pooled(h), out.pooler_output)


def test_sequence_classification_parity(tmp_path) -> None:
    hf = BertForSequenceClassification(_hf_config(num_labels=3))
    ours, _, extra = load_hf_bert(_save(hf, tmp_path))
    assert extra["num_labels"] == 3 and extra["classifier.weight"].shape == (3, 64)
    ids, types, mask = _inputs()
    with torch.no_grad():
        theirs = hf(input_ids=ids, token_type_ids=types, attention_mask=mask).logits
        pooled = ours.pooled(ours.hidden(ids, types, mask))
        _assert_close(F.linear(pooled, extra["classifier.weight"], extra["classifier.bias"]), theirs)


def test_pretraining_checkpoint_turns_on_nsp(tmp_path) -> None:
    hf = BertForPreTraining(_hf_config())
    ours, _, _ = load_hf_bert(_save(hf, tmp_path))
    assert ours.cfg.nsp
    ids, types, mask = _inputs()
    with torch.no_grad():
        out = hf(input_ids=ids, token_type_ids=types, attention_mask=mask)
        h = ours.hidden(ids, types, mask)
        _assert_close(ours(ids, types, mask), out.prediction_logits, mask)
        _assert_close(ours.nsp_logits(ours.pooled(h)), out.seq_relationship_logits)


def test_unprefixed_and_tf_style_names(tmp_path) -> None:
    """Weights without `bert.`, LayerNorm gamma/beta (TF conversions) and a saved decoder bias all load."""
    hf = BertForMaskedLM(_hf_config())
    _save(hf, tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    renamed = {}
    for name, tensor in weights.items():
        name = name.removeprefix("bert.").replace("LayerNorm.weight", "LayerNorm.gamma")
        renamed[name.replace("LayerNorm.bias", "LayerNorm.beta")] = tensor
    renamed["cls.predictions.decoder.bias"] = renamed.pop("cls.predictions.bias")
    renamed["embeddings.position_ids"] = torch.arange(64)[None]
    save_file(renamed, tmp_path / "model.safetensors")
    ours, _, _ = load_hf_bert(tmp_path)
    ids, types, mask = _inputs()
    with torch.no_grad():
        _assert_close(ours(ids, types, mask), hf(input_ids=ids, token_type_ids=types, attention_mask=mask).logits,
                      mask)


def test_missing_and_unexpected_weights(tmp_path) -> None:
    _save(BertForMaskedLM(_hf_config()), tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights.pop("bert.encoder.layer.1.output.dense.weight")
    weights["bert.encoder.layer.0.adapter.weight"] = torch.zeros(2)
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"blocks\.1\.mlp\.down\.weight.*bert\.encoder\.layer\.0\.adapter"):
        load_hf_bert(tmp_path)


def test_partial_head_is_an_error(tmp_path) -> None:
    _save(BertForMaskedLM(_hf_config()), tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights.pop("cls.predictions.transform.LayerNorm.bias")
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"mlm_norm\.bias"):
        load_hf_bert(tmp_path)


@pytest.mark.parametrize(("field", "value"), [
    ("position_embedding_type", "relative_key"),
    ("hidden_act", "mish"),
    ("is_decoder", True),
    ("tie_word_embeddings", False),
])
def test_unsupported_config_names_the_field(field, value) -> None:
    hf = {**_hf_config().to_dict(), field: value}
    with pytest.raises(ConfigError, match=rf"{field}={value!r}"):
        config_from_hf_bert(hf)


def test_config_mapping() -> None:
    cfg = config_from_hf_bert(_hf_config(hidden_act="gelu_new", layer_norm_eps=1e-7, type_vocab_size=3).to_dict())
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layer, cfg.n_head, cfg.ff_dim) == (VOCAB, 64, 2, 4, 128)
    assert (cfg.max_seq_len, cfg.type_vocab_size, cfg.activation, cfg.norm_eps) == (64, 3, "gelu_tanh", 1e-7)
    with pytest.raises(ConfigError, match="n_head"):
        config_from_hf_bert({**_hf_config().to_dict(), "num_attention_heads": 5})


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def _ours(**kw) -> EncoderModel:
    cfg = EncoderConfig(vocab_size=VOCAB, max_seq_len=64, n_layer=2, n_head=4, d_model=64, d_ff=128, **kw)
    model = EncoderModel(cfg)
    perturb(model, 0.2)
    return model.eval()


def _load_clean(cls, path):
    hf, info = cls.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return hf.eval()


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "relu"])
def test_export_masked_lm_round_trip(tmp_path, act) -> None:
    model = _ours(activation=act)
    export_hf_bert(model, None, tmp_path)
    hf = _load_clean(BertForMaskedLM, tmp_path)
    ids, types, mask = _inputs()
    with torch.no_grad():
        out = hf(input_ids=ids, token_type_ids=types, attention_mask=mask, output_hidden_states=True)
        _assert_close(model(ids, types, mask), out.logits, mask)
        _assert_close(model.hidden(ids, types, mask), out.hidden_states[-1], mask)
    back, _, _ = load_hf_bert(tmp_path)
    assert back.cfg == model.cfg
    for key, tensor in model.state_dict().items():
        if not key.startswith("pooler"):  # BertForMaskedLM has no pooler: left out, reloaded at init
            assert torch.equal(back.state_dict()[key], tensor), key


def test_export_with_classifier(tmp_path) -> None:
    model = _ours()
    classifier = torch.nn.Linear(64, 5)
    head = HFHead("BertForSequenceClassification", {f"classifier.{k}": v for k, v in classifier.state_dict().items()},
                  {"num_labels": 5})
    export_hf_bert(model, None, tmp_path, head)
    hf = _load_clean(BertForSequenceClassification, tmp_path)
    assert hf.config.num_labels == 5
    ids, types, mask = _inputs()
    with torch.no_grad():
        ours = classifier(model.pooled(model.hidden(ids, types, mask)))
        _assert_close(ours, hf(input_ids=ids, token_type_ids=types, attention_mask=mask).logits)
    _, _, extra = load_hf_bert(tmp_path)
    assert extra["num_labels"] == 5 and torch.equal(extra["classifier.weight"], classifier.weight.detach())


def test_export_nsp_as_pretraining(tmp_path) -> None:
    model = _ours(nsp=True)
    export_hf_bert(model, None, tmp_path)
    hf = _load_clean(BertForPreTraining, tmp_path)
    ids, types, mask = _inputs()
    with torch.no_grad():
        out = hf(input_ids=ids, token_type_ids=types, attention_mask=mask)
        _assert_close(model(ids, types, mask), out.prediction_logits, mask)
        _assert_close(model.nsp_logits(model.pooled(model.hidden(ids, types, mask))), out.seq_relationship_logits)
    assert load_hf_bert(tmp_path)[0].cfg.nsp


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------

VOCAB_TXT = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "##s", ",", "!", "the", "cafe",
             "café", "東", "Hello", "un", "##believ", "##able", "."]
TEXTS = ["Hello worlds, the Café 東京!", "unbelievable.", "  the\tworld  ", ""]


@pytest.mark.parametrize("lower", [True, False])
def test_vocab_txt_tokenizer_matches_transformers(tmp_path, lower) -> None:
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB_TXT) + "\n")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": lower}))
    ours = wordpiece_tokenizer(tmp_path).backend
    theirs = BertTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert ours.encode(text).ids == theirs(text)["input_ids"], text
    pair_ours, pair_theirs = ours.encode("hello", "the world"), theirs("hello", "the world")
    assert (pair_ours.ids, pair_ours.type_ids) == (pair_theirs["input_ids"], pair_theirs["token_type_ids"])


def test_tokenizer_travels_with_export(tmp_path) -> None:
    """vocab.txt-only dir -> lmforge Tokenizer -> exported tokenizer.json that AutoTokenizer loads."""
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB_TXT) + "\n")
    tok = wordpiece_tokenizer(tmp_path)
    out = export_hf_bert(_ours(), tok, tmp_path / "export")
    theirs = AutoTokenizer.from_pretrained(out)
    assert theirs.pad_token == "[PAD]" and theirs.mask_token == "[MASK]"
    for text in TEXTS:
        assert theirs(text)["input_ids"] == tok.backend.encode(text).ids
    pair = theirs("hello", "the world")
    assert pair["token_type_ids"] == tok.backend.encode("hello", "the world").type_ids == [0, 0, 0, 1, 1, 1]
    _, back, _ = load_hf_bert(out)
    assert back.pad_id == 0 and back.encode_batch(TEXTS) == tok.encode_batch(TEXTS)
    small = EncoderModel(EncoderConfig(vocab_size=10, max_seq_len=8, n_layer=1, n_head=1, d_model=8))
    with pytest.raises(ConfigError, match="vocab_size"):
        export_hf_bert(small, tok, tmp_path / "small")



def _bpe_tokenizer():
    """lmforge's own byte-level BPE (as `lmforge tokenizer train` makes it): [CLS]/[SEP]/[MASK]/<|pad|> reserved."""
    from lmforge.tokenizer import train_tokenizer

    texts = ["the cat sat on the mat", "a dog ran in the park", "the sun is hot and the sea is blue"] * 10
    return train_tokenizer(texts, vocab_size=400, show_progress=False)


def test_exported_tokenizer_adds_cls_and_sep_as_lmforge_does(tmp_path) -> None:
    """The exported tokenizer.json carries BERT's template post-processor: transformers' tokenizer gives the ids
    lmforge feeds the model ([CLS] text [SEP], pairs [CLS] a [SEP] b [SEP] with segments 0/1), and the fill-mask
    pipeline picks lmforge's top-1 token."""
    from transformers import pipeline

    from lmforge.data.task_data import read_classification, read_span_qa

    tok = _bpe_tokenizer()
    model = EncoderModel(EncoderConfig(vocab_size=tok.vocab_size, max_seq_len=32, n_layer=2, n_head=4, d_model=64,
                                       d_ff=128)).eval()
    perturb(model, 0.5)
    out = export_hf_bert(model, tok, tmp_path / "export")
    assert json.loads((out / "tokenizer.json").read_text())["post_processor"] is not None
    theirs = AutoTokenizer.from_pretrained(out)
    data = tmp_path / "cls.jsonl"
    data.write_text(json.dumps({"text": "the cat sat", "label": "a"}) + "\n")
    (example,), _ = read_classification(data, tok, 32, arch="encoder")
    assert theirs("the cat sat")["input_ids"] == example["input_ids"]
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"context": "the dog ran", "question": "who ran", "answer": "dog",
                                "answer_start": 4}) + "\n")
    (example,) = read_span_qa(data, tok, 32, arch="encoder")
    pair = theirs("who ran", "the dog ran")
    assert (pair["input_ids"], pair["token_type_ids"]) == (example["input_ids"], example["token_type_ids"])

    text = "the cat [MASK] on the mat"
    ids = torch.tensor([[tok.token_id("[CLS]"), *tok.encode(text), tok.token_id("[SEP]")]])
    with torch.no_grad():
        logits = model(ids)[0, ids[0].tolist().index(tok.token_id("[MASK]"))]
    top2 = logits.topk(2)
    assert top2.values[0] - top2.values[1] > 0.05  # a clear winner, so float noise cannot flip it
    (best,) = pipeline("fill-mask", model=str(out), tokenizer=str(out), top_k=1)(text)
    assert best["token"] == top2.indices[0].item()
