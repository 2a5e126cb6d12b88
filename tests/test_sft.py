"""`lmforge sft`: conversations in, assistant-only loss through the shared trainer, a loadable decoder out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge.cli import main
from lmforge.config import EncoderConfig, ModelConfig
from lmforge.data.instructions import write_instruction_data
from lmforge.data.synthetic import WorldConfig, pretraining_documents
from lmforge.errors import ConfigError
from lmforge.model import build_model
from lmforge.tokenizer import train_tokenizer
from lmforge.train.sft import SFTConfig, sft

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sft")
    files = write_instruction_data(WorldConfig(), root / "data", n_sft=200, n_pref=40, n_eval=20)
    tok = train_tokenizer(pretraining_documents(WorldConfig(n_documents=400)), vocab_size=500, show_progress=False)
    torch.manual_seed(0)
    lmforge.save(build_model(ModelConfig(vocab_size=500, max_seq_len=256, n_layer=1, n_head=2, d_model=32)), tok,
                 root / "base")
    lmforge.save(build_model(EncoderConfig(vocab_size=500, n_layer=1, n_head=2, d_model=32)), tok, root / "enc")
    return {**files, "base": root / "base", "enc": root / "enc"}


def test_sft_learns_the_assistant_turns_and_reloads(setup: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "sft"
    assert main(["sft", "--base", str(setup["base"]), "--train-file", str(setup["sft_train"]),
                 "--train.max_steps=40", "--train.lr=3e-3", "--train.log_every=5", "--train.warmup_steps=4",
                 f"--train.out_dir={out}", "--train.progress=false"]) == 0
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert losses[-1] < losses[0] - 1.0, losses
    model, tok = lmforge.load(out)
    assert model.cfg.arch == "decoder" and tok.vocab_size == 500


def test_sft_refuses_an_encoder_and_missing_inputs(setup: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="sft needs a decoder language model; .*enc holds a EncoderModel"):
        sft(SFTConfig(base=str(setup["enc"]), train_file=str(setup["sft_train"])))
    with pytest.raises(ConfigError, match="--train-file"):
        sft(SFTConfig(base=str(setup["base"])))
