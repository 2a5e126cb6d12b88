"""`lmforge pretrain --objective clm|mlm|span`: one shared trainer, the objective picks batches and loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge.cli import main
from lmforge.config import PretrainConfig
from lmforge.config_loading import load_config
from lmforge.data.shards import prepare_shards
from lmforge.data.synthetic import WorldConfig, pretraining_documents
from lmforge.errors import ConfigError
from lmforge.model.encdec import EncDecLM
from lmforge.model.encoder import EncoderModel
from lmforge.tokenizer import train_tokenizer
from lmforge.train.pretrain import make_batches

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = {
    "mlm": ["--model.arch=encoder", "--model.n_layer=1", "--model.d_model=32", "--model.n_head=2"],
    "span": ["--model.arch=encdec", "--model.n_layer=1", "--model.d_model=32", "--model.n_head=2",
             "--model.head_dim=16", "--model.d_ff=64"],
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("world")
    docs = pretraining_documents(WorldConfig(n_documents=600))
    (root / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tok = train_tokenizer(docs, vocab_size=500, show_progress=False)
    prepare_shards([root / "c.jsonl"], tok, root / "shards", val_fraction=0.05, progress=False)
    return root / "shards"


@pytest.mark.parametrize("objective, cls", [("mlm", EncoderModel), ("span", EncDecLM)])
def test_objective_trains_its_architecture_and_loads(tmp_path: Path, shards: Path, objective: str, cls) -> None:
    out = tmp_path / objective
    args = ["pretrain", "--objective", objective, f"--data.dir={shards}", f"--train.out_dir={out}",
            "--model.vocab_size=500", "--model.max_seq_len=64", "--train.seq_len=64", "--train.batch_size=8",
            "--train.max_steps=30", "--train.warmup_steps=3", "--train.eval_every=15", "--train.log_every=5",
            "--train.lr=3e-3", "--train.progress=false", *SIZES[objective]]
    assert main(args) == 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0] - 0.5, losses  # the objective is being learned
    assert [r["step"] for r in records if "val_loss" in r] == [15, 30]
    model, tok = lmforge.load(out)
    assert isinstance(model, cls) and tok is not None and tok.vocab_size == 500
    # `lmforge generate` runs T5 as text-to-text and refuses an encoder with a clear message
    assert main(["generate", str(out), "--prompt", "capital: Velmora", "--max-new-tokens", "3"]) == (
        0 if objective == "span" else 2)


def test_mlm_batches_mask_only_what_they_score(shards: Path) -> None:
    from lmforge.data.shards import load_shards
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.from_file(shards)
    batches = make_batches("mlm", load_shards(shards).tokens("train"), 64, 8, 0, tok)
    b = batches.batch(3)
    scored = b["labels"] != -100
    assert 0.10 < scored.float().mean() < 0.20
    assert torch.equal(batches.batch(3)["input_ids"], b["input_ids"])  # a pure function of the index
    assert (b["input_ids"][:, 0] == tok.token_id("[CLS]")).all()


def test_objective_must_fit_the_architecture(shards: Path) -> None:
    with pytest.raises(ConfigError, match="objective 'mlm' trains a model.arch 'encoder'"):
        load_config(PretrainConfig, None, {"objective": 'mlm', "data.dir": str(shards)})
    with pytest.raises(ConfigError, match="objective 'clm'.*model.arch=decoder"):
        load_config(PretrainConfig, None, {"model.arch": 'encdec'})


def test_mlm_without_mask_token_is_a_clear_error(tmp_path: Path) -> None:
    import tokenizers

    from lmforge.data.shards import load_shards
    from lmforge.errors import DataError
    from lmforge.tokenizer import Tokenizer

    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|eos|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    docs = ["the king sat on the stone", "the moon rose over the river"] * 50
    backend.train_from_iterator(docs, trainer=trainer)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepare_shards([tmp_path / "c.jsonl"], Tokenizer(backend), tmp_path / "s", progress=False)
    with pytest.raises(DataError, match=r"no \[MASK\] token"):
        make_batches("mlm", load_shards(tmp_path / "s").tokens("train"), 16, 2, 0, Tokenizer(backend))
