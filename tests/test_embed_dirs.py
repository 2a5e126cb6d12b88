"""`lmforge.embed(texts, model=DIR)` on sentence-transformers directories of BERT models.

A small random BERT is saved by sentence-transformers with each pooling (cls, mean, max), with and without a
Normalize module and with a max_seq_length that truncates, and written by hand in the older format (boolean pooling
flags, do_lower_case); lmforge's embeddings must match `SentenceTransformer(DIR).encode` (cosine >= 0.9999, 1e-5
absolute). Directories lmforge cannot run get one line naming what it supports.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge.errors import LmforgeError

WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "far", "away", "a", "big", "red", "ball", "##s", "##ing"]
TEXTS = ["the cat sat on the mat", "A BIG red ball!", "Dogs running far away", "", "the " * 30 + "end",
         "ünïcödé cafés"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer BERT with a cased WordPiece vocabulary (no capitals), as `save_pretrained` writes it."""
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz!", *WORDS]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = transformers.BertTokenizerFast.from_pretrained(str(path), do_lower_case=False)  # from vocab.txt
    assert tokenizer("the cat")["input_ids"] == [2, vocab.index("the"), vocab.index("cat"), 3]
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64)
    transformers.BertModel(config).eval().save_pretrained(path)
    return path


def sentence_transformers_dir(bert_dir: Path, out: Path, pooling: str, normalize: bool, max_seq_length: int) -> Path:
    st = pytest.importorskip("sentence_transformers")
    try:
        from sentence_transformers.sentence_transformer import modules as st_modules  # >= 6
    except ImportError:
        from sentence_transformers import models as st_modules
    modules = [st_modules.Transformer(str(bert_dir), max_seq_length=max_seq_length), st_modules.Pooling(32, pooling)]
    modules += [st_modules.Normalize()] if normalize else []
    st.SentenceTransformer(modules=modules, device="cpu").save(str(out))
    return out


@pytest.mark.parametrize("pooling, normalize, max_seq_length", [("mean", True, 16), ("cls", False, 64),
                                                                ("max", True, 64), ("mean", False, 8)])
def test_matches_sentence_transformers(bert_dir: Path, tmp_path: Path, pooling: str, normalize: bool,
                                       max_seq_length: int) -> None:
    st = pytest.importorskip("sentence_transformers")
    path = sentence_transformers_dir(bert_dir, tmp_path / "st", pooling, normalize, max_seq_length)
    reference = torch.from_numpy(st.SentenceTransformer(str(path), device="cpu").encode(TEXTS))
    ours = lmforge.embed(TEXTS, model=path, batch_size=4)
    assert ours.shape == reference.shape == (len(TEXTS), 32)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    cosine = torch.nn.functional.cosine_similarity(ours, reference, dim=1)
    assert cosine.min().item() >= 0.9999, cosine.tolist()
    one = lmforge.embed(TEXTS[0], model=path)
    assert one.shape == (32,)
    torch.testing.assert_close(one, ours[0], atol=1e-5, rtol=0)


def write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def plain_dir(bert_dir: Path, out: Path, pooling: dict, modules: tuple[str, ...] = ("Transformer", "Pooling"),
              lower: bool = False) -> Path:
    """A sentence-transformers dir written by hand as versions < 6 wrote them: one boolean per pooling mode, and
    max_seq_length and do_lower_case in sentence_bert_config.json."""
    shutil.copytree(bert_dir, out)
    paths = {"Transformer": "", "Pooling": "1_Pooling", "Normalize": "2_Normalize", "Dense": "2_Dense"}
    entries = [{"idx": i, "name": str(i), "path": paths[kind], "type": f"sentence_transformers.models.{kind}"}
               for i, kind in enumerate(modules)]
    write_json(out / "modules.json", entries)
    write_json(out / "1_Pooling" / "config.json", {"word_embedding_dimension": 32, **pooling})
    write_json(out / "sentence_bert_config.json", {"max_seq_length": 16, "do_lower_case": lower})
    return out


def test_legacy_pooling_config_is_read(bert_dir: Path, tmp_path: Path) -> None:
    """The older format: cls pooling is the [CLS] hidden state, and the text is lowercased first."""
    path = plain_dir(bert_dir, tmp_path / "legacy", {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False},
                     lower=True)
    model, tok = lmforge.load(bert_dir)
    ids = torch.tensor([tok.backend.encode("the cat sat").ids])  # with [CLS] and [SEP]
    ours = lmforge.embed(["The CAT sat", *TEXTS], model=path)
    torch.testing.assert_close(ours[0], model.hidden(ids)[0, 0], atol=1e-6, rtol=0)
    assert tok.backend.encode("The CAT sat").ids != ids[0].tolist()  # the tokenizer alone is cased
    st = pytest.importorskip("sentence_transformers")
    reference = torch.from_numpy(st.SentenceTransformer(str(path), device="cpu").encode(["The CAT sat", *TEXTS]))
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("change, message", [
    (lambda d: plain_dir(d[0], d[1], {"pooling_mode": "lasttoken"}), "pooling 'lasttoken'"),
    (lambda d: plain_dir(d[0], d[1], {"pooling_mode_weightedmean_tokens": True}), "pooling 'weightedmean'"),
    (lambda d: plain_dir(d[0], d[1], {"pooling_mode": "mean"}, ("Transformer", "Pooling", "Dense")), "Dense"),
    (lambda d: plain_dir(d[0], d[1], {"pooling_mode": "mean"}, ("Transformer",)), "Transformer"),
    (lambda d: shutil.copytree(d[0], d[1]), "modules.json"),
    (lambda d: write_json(plain_dir(d[0], d[1], {"pooling_mode": "mean"}) / "config_sentence_transformers.json",
                          {"default_prompt_name": "query", "prompts": {"query": "query: "}}), "default_prompt_name"),
    (lambda d: write_json(plain_dir(d[0], d[1], {"pooling_mode": "mean"}) / "modules.json",
                          [{"path": "..", "type": "Transformer"}, {"path": "1_Pooling", "type": "Pooling"}]),
     "leaves the directory"),
])
def test_unsupported_directory_is_one_line(bert_dir: Path, tmp_path: Path, change, message: str) -> None:
    path = tmp_path / "st"
    change((bert_dir, path))
    with pytest.raises(LmforgeError, match=message) as info:
        lmforge.embed(["x"], model=path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    if "pooling" in message:
        assert "cls, mean or max" in str(info.value)


def test_non_bert_model_is_refused(bert_dir: Path, tmp_path: Path) -> None:
    path = plain_dir(bert_dir, tmp_path / "roberta", {"pooling_mode": "mean"})
    config = json.loads((path / "config.json").read_text())
    write_json(path / "config.json", {**config, "model_type": "roberta"})
    with pytest.raises(LmforgeError, match="model_type 'roberta'") as info:
        lmforge.embed(["x"], model=path)
    assert "'bert'" in str(info.value) and "\n" not in str(info.value)
