"""Byte-level BPE tokenizer (HF `tokenizers`) with lmforge's special tokens reserved up front.

Every special token a later stage needs (chat roles, [MASK], T5 sentinels, ...) is in the
vocabulary from the first training run, so no stage ever resizes the embedding matrix.
The saved `tokenizer.json` is plain HF `tokenizers` format: `tokenizers.Tokenizer.from_file`
and `transformers.PreTrainedTokenizerFast(tokenizer_file=...)` load it as-is.

Training alone cuts runs of `TRAINING_PRETOKEN_CAP` characters or more into pieces before the
trainer sees them: `tokenizers`' BPE trainer merges inside one word in time quadratic in its length
(ten times the length, about a hundred times the time). Encoding keeps the plain byte-level
pre-tokenizer, so it is unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from lmforge.errors import ConfigError, DataError, one_line
from lmforge.io import atomic_write_text

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SYSTEM, USER, ASSISTANT, END_OF_TURN = "<|system|>", "<|user|>", "<|assistant|>", "<|end_of_turn|>"
MASK, CLS, SEP = "[MASK]", "[CLS]", "[SEP]"
NUM_SENTINELS = 100
SENTINELS = tuple(f"<extra_id_{i}>" for i in range(NUM_SENTINELS))
SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END_OF_TURN, MASK, CLS, SEP, *SENTINELS)

# Names other tokenizers use for the same roles, so HF checkpoints (e.g. GPT-2) get BOS/EOS too.
_ALIASES = {
    BOS: (BOS, "<s>", "<|endoftext|>", "<|begin_of_text|>", "[CLS]"),
    EOS: (EOS, "</s>", "<|endoftext|>", "<|end_of_text|>", "[SEP]"),
    PAD: (PAD, "<pad>", "[PAD]"),
}
TOKENIZER_FILE = "tokenizer.json"
TRAINING_PRETOKEN_CAP = 256  # characters; far longer than any useful token


class Tokenizer:
    """A thin, typed wrapper over `tokenizers.Tokenizer` exposing the ids lmforge needs."""

    def __init__(self, backend: HFTokenizer):
        self.backend = backend

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise DataError(f"tokenizer file not found: {path} (train one with `lmforge tokenizer train`)")
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as exc:  # tokenizers raises a bare Exception for any file it cannot read
            raise DataError(f"{path}: not a valid tokenizer.json ({one_line(exc)}); train one with "
                            "`lmforge tokenizer train` or use the tokenizer.json saved with the model") from None

    def save(self, directory: str | Path) -> Path:
        """Write `directory/tokenizer.json` atomically; a full disk is one line and leaves the old file."""
        return atomic_write_text(Path(directory) / TOKENIZER_FILE, self.backend.to_str())

    # -- ids ------------------------------------------------------------------------------------
    def token_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def _role_id(self, role: str) -> int | None:
        for name in _ALIASES[role]:
            tid = self.backend.token_to_id(name)
            if tid is not None:
                return tid
        return None

    @property
    def bos_id(self) -> int | None:
        return self._role_id(BOS)

    @property
    def eos_id(self) -> int | None:
        return self._role_id(EOS)

    @property
    def pad_id(self) -> int | None:
        return self._role_id(PAD)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    # -- text <-> ids ---------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts; HF `tokenizers` spreads the batch over all cores."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)


def require_same_vocab(a: Tokenizer, a_path: str | Path, b: Tokenizer, b_path: str | Path, why: str) -> None:
    """ConfigError naming both files when two tokenizers' vocabularies (token -> id) differ; `why` says who needs
    them equal (e.g. "distillation", "a reward model scoring this policy")."""
    from lmforge.errors import ConfigError

    vocab_a, vocab_b = a.backend.get_vocab(with_added_tokens=True), b.backend.get_vocab(with_added_tokens=True)
    if vocab_a != vocab_b:
        differ = len(set(vocab_a.items()) ^ set(vocab_b.items()))
        raise ConfigError(f"{why} needs one tokenizer, but {a_path} ({len(vocab_a)} tokens) and {b_path} "
                          f"({len(vocab_b)} tokens) differ in {differ} token->id entries")


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    min_frequency: int = 2,
    show_progress: bool = True,
) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style byte alphabet, so any Unicode string round-trips)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    minimum = len(alphabet) + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ConfigError(
            f"--vocab-size {vocab_size} is too small: the {len(alphabet)} byte symbols and the {len(SPECIAL_TOKENS)} "
            f"special tokens lmforge reserves take {minimum} ids before any merge; use --vocab-size {minimum} or more "
            "(e.g. 1024)"
        )
    if min_frequency < 0:
        raise ConfigError(f"--min-frequency must be >= 0, got {min_frequency}")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = _capped(byte_level)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        show_progress=show_progress,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    backend.pre_tokenizer = byte_level  # encoding never caps
    return Tokenizer(backend)


def _capped(byte_level: pre_tokenizers.PreTokenizer) -> pre_tokenizers.PreTokenizer:
    """`byte_level` after isolating each full `TRAINING_PRETOKEN_CAP` characters of a run of non-space (or of space)
    characters at least that long; text without such runs pre-tokenizes exactly as with `byte_level` alone."""
    cap = TRAINING_PRETOKEN_CAP
    pieces = pre_tokenizers.Split(Regex(rf"\S{{{cap}}}|\s{{{cap}}}"), behavior="isolated")
    return pre_tokenizers.Sequence([pieces, byte_level])
