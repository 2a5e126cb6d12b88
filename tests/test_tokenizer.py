"""Tokenizer: lossless round trips, reserved special-token ids, HF interop, errors and the CLI."""

from __future__ import annotations

import errno
import json
import random
import threading
from pathlib import Path

import pytest
import tokenizers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli_checks import error_line, snapshot
from lmforge import tokenizer as tokenizer_module
from lmforge.cli import main
from lmforge.errors import ConfigError, DataError
from lmforge.tokenizer import (
    ASSISTANT,
    BOS,
    CLS,
    END_OF_TURN,
    EOS,
    MASK,
    NUM_SENTINELS,
    PAD,
    SEP,
    SPECIAL_TOKENS,
    SYSTEM,
    TOKENIZER_FILE,
    TRAINING_PRETOKEN_CAP,
    USER,
    Tokenizer,
    train_tokenizer,
)

WORDS = ("the quick brown fox jumps over a lazy dog while seven wise owls sing softly at night "
         "König naïve café Ärger straße déjà vu 東京 日本語 данные привет 😀 🚀 ☃ ∑ π").split()


def make_corpus(n: int, seed: int) -> list[str]:
    """Varied lines: words in several scripts, digits, punctuation, code and whitespace."""
    rng = random.Random(seed)
    extras = ["def f(x):\n    return x + 1", "a\tb\tc", "1234 + 5678 = 6912", "<p>hi</p>", "  spaced  out  ",
              "e\u0301 combining", "line\r\nbreak", "👨‍👩‍👧 family"]
    lines = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 12))]
        line = " ".join(words)
        if i % 7 == 0:
            line += " " + rng.choice(extras)
        if i % 11 == 0:
            line = line.upper()
        lines.append(f"{line} {rng.randint(0, 999)}.")
    return lines


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(make_corpus(300, seed=0), vocab_size=600, show_progress=False)


# ---- round trips -------------------------------------------------------------------------------

SPECIAL_LITERALS = st.sampled_from(
    [*SPECIAL_TOKENS[:10], SPECIAL_TOKENS[10], SPECIAL_TOKENS[-1], "<|endoftext|>", "<s>", "</s>", "<|eos",
     "[MASK", "<extra_id_100>"]
)
EXOTIC = st.sampled_from(
    ["😀", "👨‍👩‍👧", "🇺🇸", "e\u0301", "a\u0308\u0323", "\u200b", "\u200d", "\ufeff", "\u2028", "\t", "\r\n",
     "\x00", "\x1b[0m", "\x7f", "\u00a0", "   ", "\n\n", "\U0010ffff", "\ufffd", "Ġ", "Ċ"]
)
# Every Unicode category except surrogates (lone surrogates are not encodable text).
ANY_CHAR_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
MIXED = st.lists(st.one_of(ANY_CHAR_TEXT, SPECIAL_LITERALS, EXOTIC), max_size=8).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(s=st.one_of(ANY_CHAR_TEXT, MIXED))
def test_round_trip_any_unicode(tok: Tokenizer, s: str) -> None:
    ids = tok.encode(s)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == s


@pytest.mark.parametrize("text", ["", " ", "hello", "a" * 500, "😀" * 20, "\x00\x01\x02", "Ärger\n\tstraße"])
def test_round_trip_examples(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch([text, text + "!"]) == [tok.encode(text), tok.encode(text + "!")]


# ---- special tokens ---------------------------------------------------------------------------


def test_special_token_list_is_complete() -> None:
    assert SPECIAL_TOKENS[:10] == (BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END_OF_TURN, MASK, CLS, SEP)
    assert len(SPECIAL_TOKENS) == 10 + NUM_SENTINELS == 110
    assert SPECIAL_TOKENS[10:] == tuple(f"<extra_id_{i}>" for i in range(100))
    assert len(set(SPECIAL_TOKENS)) == len(SPECIAL_TOKENS)


@pytest.mark.parametrize(
    "corpus, vocab_size",
    [(make_corpus(150, seed=1), 400), (["completely different text " * 3, "zzz yyy xxx 123"] * 40, 900)],
)
def test_special_tokens_have_fixed_ids(corpus: list[str], vocab_size: int) -> None:
    t = train_tokenizer(corpus, vocab_size=vocab_size, show_progress=False)
    for i, token in enumerate(SPECIAL_TOKENS):
        assert t.token_id(token) == i, token
        assert t.backend.id_to_token(i) == token
        assert t.decode([i]) == token
    assert (t.bos_id, t.eos_id, t.pad_id) == (0, 1, 2)
    # the whole byte alphabet is present too, and the vocabulary never exceeds what was asked for
    assert len(SPECIAL_TOKENS) + 256 <= t.vocab_size <= vocab_size


def test_special_ids_survive_save_and_load(tok: Tokenizer, tmp_path: Path) -> None:
    path = tok.save(tmp_path)
    assert path == tmp_path / TOKENIZER_FILE
    for loaded in (Tokenizer.from_file(path), Tokenizer.from_file(tmp_path)):
        assert [loaded.token_id(s) for s in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
        assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (0, 1, 2)
        assert loaded.vocab_size == tok.vocab_size
        assert loaded.encode("the <|eos|> owl") == tok.encode("the <|eos|> owl")


@pytest.mark.parametrize("literal", [BOS, EOS, PAD, USER, END_OF_TURN, MASK, CLS, SEP, "<extra_id_7>"])
def test_special_token_literal_maps_to_its_id(tok: Tokenizer, literal: str) -> None:
    """As in HF tokenizers/transformers (and so chat templates rendered as text), a special token's
    literal in text is that special id; text still round-trips."""
    special_id = tok.token_id(literal)
    assert special_id is not None and special_id < len(SPECIAL_TOKENS)
    for text in (literal, f"before {literal} after", f"{literal}{literal}"):
        ids = tok.encode(text)
        assert ids.count(special_id) == text.count(literal), (text, ids)
        assert tok.decode(ids) == text
    assert tok.decode([special_id], skip_special_tokens=True) == ""


def test_hf_aliases_resolve_bos_eos() -> None:
    """A tokenizer with GPT-2's single <|endoftext|> token gets BOS and EOS from the alias table."""
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<|endoftext|>": 0, "hi": 1}, unk_token="hi"))
    t = Tokenizer(backend)
    assert (t.bos_id, t.eos_id, t.pad_id) == (0, 0, None)


# ---- Hugging Face interop -------------------------------------------------------------------

PARITY_TEXTS = [
    "the quick brown fox",
    "König naïve café 東京 😀 🚀",
    "  leading and trailing spaces  ",
    "def f(x):\n\treturn x + 1\n",
    "UPPER lower 12345 !?.,;",
    "",
]


def test_saved_file_loads_in_hf_tokenizers_and_transformers(tok: Tokenizer, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    path = tok.save(tmp_path)
    raw = tokenizers.Tokenizer.from_file(str(path))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    assert raw.get_vocab_size(with_added_tokens=True) == tok.vocab_size
    assert len(fast) == tok.vocab_size
    for text in PARITY_TEXTS:
        ids = tok.encode(text)
        assert raw.encode(text, add_special_tokens=False).ids == ids, text
        assert fast(text, add_special_tokens=False)["input_ids"] == ids, text
        assert fast.encode(text, add_special_tokens=False) == ids, text
        assert raw.decode(ids) == text
        assert fast.decode(ids) == text
    for i, special in enumerate(SPECIAL_TOKENS[:10]):
        assert raw.token_to_id(special) == i
        assert fast.convert_tokens_to_ids(special) == i


def test_hf_loaders_treat_special_literals_like_lmforge(tok: Tokenizer, tmp_path: Path) -> None:
    path = tok.save(tmp_path)
    raw = tokenizers.Tokenizer.from_file(str(path))
    text = "a <|eos|> b"
    assert raw.encode(text, add_special_tokens=False).ids == tok.encode(text)


# ---- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab_size", [0, 100, 256 + len(SPECIAL_TOKENS) - 1])
def test_vocab_size_too_small(vocab_size: int) -> None:
    minimum = 256 + len(SPECIAL_TOKENS)
    with pytest.raises(ConfigError, match=rf"--vocab-size {vocab_size} is too small") as info:
        train_tokenizer(["some text"], vocab_size=vocab_size, show_progress=False)
    assert str(minimum) in str(info.value)


def test_smallest_vocab_size_is_accepted() -> None:
    minimum = 256 + len(SPECIAL_TOKENS)
    t = train_tokenizer(["some text here"] * 5, vocab_size=minimum, show_progress=False)
    assert t.vocab_size == minimum
    assert t.decode(t.encode("any text ☃")) == "any text ☃"


def test_from_file_missing(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / TOKENIZER_FILE
    with pytest.raises(DataError, match="tokenizer file not found") as info:
        Tokenizer.from_file(missing)
    assert str(missing) in str(info.value)
    # a directory without a tokenizer.json names the file it looked for
    with pytest.raises(DataError) as info:
        Tokenizer.from_file(tmp_path)
    assert str(tmp_path / TOKENIZER_FILE) in str(info.value)


# ---- CLI ----------------------------------------------------------------------------------------


def test_cli_tokenizer_train(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    txt = tmp_path / "a.txt"
    txt.write_text("\n".join(make_corpus(60, seed=3)), encoding="utf-8")
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t}) for t in make_corpus(60, seed=4)) + "\n", encoding="utf-8")
    out = tmp_path / "tok"
    rc = main(["tokenizer", "train", "--input", str(txt), str(jsonl), "--vocab-size", "500", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "61 documents" in printed  # one .txt document + 60 JSONL lines
    t = Tokenizer.from_file(out / TOKENIZER_FILE)
    assert len(SPECIAL_TOKENS) + 256 < t.vocab_size <= 500
    assert [t.token_id(s) for s in SPECIAL_TOKENS[:10]] == list(range(10))
    assert t.decode(t.encode("the lazy owl 😀")) == "the lazy owl 😀"
    # a merge learned from the corpus: a frequent word is shorter than its byte count
    assert len(t.encode("the quick brown fox")) < len(b"the quick brown fox")


def test_cli_tokenizer_train_missing_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.txt"
    out = tmp_path / "tok"
    rc = main(["tokenizer", "train", "--input", str(missing), "--vocab-size", "500", "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert str(missing) in err
    assert "Traceback" not in err
    assert not (out / TOKENIZER_FILE).exists()


def train_cli(*inputs: Path, vocab_size: int = 500, out: Path) -> int:
    return main(["tokenizer", "train", "--input", *map(str, inputs), "--vocab-size", str(vocab_size),
                 "--out", str(out)])


@pytest.mark.parametrize("vocab_size", [10, 100, 256 + len(SPECIAL_TOKENS) - 1])
def test_cli_vocab_size_below_the_reserved_tokens(tmp_path: Path, vocab_size: int,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.txt").write_text("some text", encoding="utf-8")
    assert train_cli(tmp_path / "a.txt", vocab_size=vocab_size, out=tmp_path / "tok") == 2
    message = error_line(capsys.readouterr().err)
    assert f"--vocab-size {vocab_size}" in message and str(256 + len(SPECIAL_TOKENS)) in message
    assert not (tmp_path / "tok").exists()


def test_negative_min_frequency_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"--min-frequency must be >= 0, got -1"):
        train_tokenizer(["some text"], vocab_size=400, min_frequency=-1, show_progress=False)


@pytest.mark.parametrize("out", ["a.txt", "a.txt/sub"])
def test_cli_out_naming_an_existing_file(tmp_path: Path, out: str, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "a.txt"
    corpus.write_text("\n".join(make_corpus(20, seed=1)), encoding="utf-8")
    assert train_cli(corpus, out=tmp_path / out) == 2
    message = error_line(capsys.readouterr().err)
    assert str(corpus) in message and "directory" in message
    assert corpus.read_text(encoding="utf-8") == "\n".join(make_corpus(20, seed=1))


@pytest.mark.parametrize(("name", "content", "problem"), [
    ("empty.txt", "", "no text in"), ("blank.jsonl", '{"text": ""}\n{"text": ""}\n', "no text in"),
    ("nothing.jsonl", "\n\n", "no documents in"),
])
def test_cli_tokenizer_train_refuses_an_empty_corpus(tmp_path: Path, name: str, content: str, problem: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / name).write_text(content, encoding="utf-8")
    assert train_cli(tmp_path / name, out=tmp_path / "tok") == 2
    message = error_line(capsys.readouterr().err)
    assert problem in message and str(tmp_path / name) in message
    assert not (tmp_path / "tok").exists()


@pytest.mark.parametrize("content", [b"not json", b"{}", b'{"model": {"type": "BPE", "vocab": 5}}', b"\xff\xfe"])
def test_garbage_tokenizer_file_is_a_data_error(tmp_path: Path, content: bytes) -> None:
    (tmp_path / TOKENIZER_FILE).write_bytes(content)
    with pytest.raises(DataError) as info:
        Tokenizer.from_file(tmp_path)
    message = str(info.value)
    assert str(tmp_path / TOKENIZER_FILE) in message and "\n" not in message


def test_cli_tokenizer_train_disk_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """ENOSPC half-way through writing tokenizer.json: one line naming --out and the bytes needed; the tokenizer
    that was there stays, and no temporary file is left."""
    corpus = tmp_path / "a.txt"
    corpus.write_text("\n".join(make_corpus(100, seed=2)), encoding="utf-8")
    out = tmp_path / "tok"
    assert train_cli(corpus, vocab_size=400, out=out) == 0
    before = snapshot(out)

    def write_half(self: Path, data: bytes) -> int:
        with open(self, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", write_half)
    capsys.readouterr()
    assert train_cli(corpus, vocab_size=600, out=out) == 2
    message = error_line(capsys.readouterr().err)
    assert str(out) in message and "no space left" in message and "bytes" in message
    assert snapshot(out) == before


# ---- long runs of one character (training time must stay linear) --------------------------------


def test_long_runs_reach_the_trainer_in_capped_pieces() -> None:
    """A token can only be learned inside one pre-token, so no learned token is longer than the cap (uncapped,
    a run of 5000 'a's teaches tokens of 4096 'a's, and training time grows with the square of the run)."""
    runs = ["x " + "a" * 5000 + " y", "\n" * 3000, "word " + "-" * 2000]
    t = train_tokenizer(runs * 2, vocab_size=600, show_progress=False)
    longest = max(t.backend.get_vocab(with_added_tokens=False), key=len)
    assert len(longest) <= TRAINING_PRETOKEN_CAP, len(longest)
    assert "a" * 64 in t.backend.get_vocab()  # the run's pieces are still learned from


def test_training_on_a_one_megabyte_run_finishes() -> None:
    """Hang guard (not a timing test): uncapped, the quadratic trend puts this at about half an hour; capped, it takes
    well under a second."""
    done = []
    worker = threading.Thread(target=lambda: done.append(train_tokenizer(["a" * 1_000_000], 400, show_progress=False)),
                              daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert done, "training on a 1 MB run of one character did not finish in 60 s"


def test_the_cap_changes_neither_normal_text_nor_encoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """On text without long runs the capped training learns the same tokenizer as an uncapped one, and the saved
    tokenizer encodes with the plain byte-level pre-tokenizer (a long run stays one pre-token)."""
    corpus = make_corpus(300, seed=0)
    capped = train_tokenizer(corpus, vocab_size=600, show_progress=False)
    monkeypatch.setattr(tokenizer_module, "TRAINING_PRETOKEN_CAP", 50_000)
    loose = train_tokenizer(corpus, vocab_size=600, show_progress=False)
    assert capped.backend.to_str() == loose.backend.to_str()
    assert json.loads(capped.backend.to_str())["pre_tokenizer"]["type"] == "ByteLevel"
    assert len(capped.backend.pre_tokenizer.pre_tokenize_str("a" * 1000)) == 1
    text = " ".join(corpus[:20])
    assert capped.encode(text) == loose.encode(text)
