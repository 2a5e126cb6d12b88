"""`--peft` in the sft and finetune stages, reloading adapted checkpoints, and `lmforge merge`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge.cli import main
from lmforge.config import EncoderConfig, ModelConfig
from lmforge.data.instructions import write_instruction_data
from lmforge.data.shards import prepare_shards
from lmforge.data.synthetic import WorldConfig, pretraining_documents
from lmforge.data.synthetic_tasks import write_task_data
from lmforge.model import build_model
from lmforge.tokenizer import train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("peft")
    files = write_instruction_data(WorldConfig(), root / "instr", n_sft=120, n_pref=20, n_eval=10)
    files.update(write_task_data(WorldConfig(), root / "tasks", n_train=200, n_test=50))
    tok = train_tokenizer(pretraining_documents(WorldConfig(n_documents=300)), vocab_size=500, show_progress=False)
    torch.manual_seed(0)
    lmforge.save(build_model(ModelConfig(family="llama", vocab_size=500, max_seq_len=256, n_layer=2, n_head=2,
                                         d_model=32)), tok, root / "llama")
    lmforge.save(build_model(EncoderConfig(vocab_size=500, n_layer=1, n_head=2, d_model=32)), tok, root / "bert")
    return {**files, "llama": root / "llama", "bert": root / "bert"}


@pytest.mark.parametrize("method", ["lora", "qlora", "prefix", "svd-diag"])
def test_sft_with_peft_trains_only_the_method_and_reloads(world: dict[str, Path], tmp_path: Path, method: str) -> None:
    out = tmp_path / method
    assert main(["sft", "--base", str(world["llama"]), "--train-file", str(world["sft_train"]), "--peft", method,
                 "--peft.r=4", "--train.max_steps=6", "--train.lr=1e-2", f"--train.out_dir={out}",
                 "--train.progress=false"]) == 0
    base, _ = lmforge.load(world["llama"])
    tuned, _ = lmforge.load(out)  # rebuilds the method's modules from config.yaml, then loads every tensor
    x = torch.randint(0, 500, (2, 12))
    with torch.no_grad():
        assert not torch.allclose(base(x), tuned(x), atol=1e-6)  # the adaptation is in the checkpoint
    base_params, tuned_params = dict(base.named_parameters()), dict(tuned.named_parameters())
    shared = base_params.keys() & tuned_params.keys()
    assert shared or method == "qlora"  # QLoRA stores the base as NF4 buffers instead
    for name in shared:  # every base weight the method froze is still exactly the base's
        assert torch.equal(base_params[name], tuned_params[name]), name


def test_a_lora_run_also_writes_its_adapter_alone(world: dict[str, Path], tmp_path: Path) -> None:
    from lmforge.peft.lora_files import load_adapter

    assert main(["sft", "--base", str(world["llama"]), "--train-file", str(world["sft_train"]), "--peft", "lora",
                 "--train.max_steps=4", "--train.lr=1e-2", f"--train.out_dir={tmp_path / 'run'}",
                 "--train.progress=false"]) == 0
    assert (tmp_path / "run" / "adapter" / "adapter.safetensors").stat().st_size < 100_000  # adapters only
    tuned, _ = lmforge.load(tmp_path / "run")
    base, _ = lmforge.load(world["llama"])
    load_adapter(base, tmp_path / "run" / "adapter")  # the adapter alone, onto a fresh copy of the base
    x = torch.randint(0, 500, (2, 12))
    with torch.no_grad():
        assert torch.allclose(tuned(x), base.eval()(x), atol=1e-6)


def test_merge_folds_lora_and_refuses_prefix(world: dict[str, Path], tmp_path: Path) -> None:
    for method in ("lora", "prefix"):
        assert main(["sft", "--base", str(world["llama"]), "--train-file", str(world["sft_train"]), "--peft", method,
                     "--train.max_steps=4", "--train.lr=1e-2", f"--train.out_dir={tmp_path / method}",
                     "--train.progress=false"]) == 0
    assert main(["merge", str(tmp_path / "lora"), "--out", str(tmp_path / "merged")]) == 0
    adapted, _ = lmforge.load(tmp_path / "lora")
    merged, _ = lmforge.load(tmp_path / "merged")
    x = torch.randint(0, 500, (2, 12))
    with torch.no_grad():
        assert torch.allclose(adapted(x), merged(x), atol=1e-5)
    assert merged.num_params() == lmforge.load(world["llama"])[0].num_params()  # plain weights again
    assert main(["merge", str(tmp_path / "prefix"), "--out", str(tmp_path / "m2")]) == 2
    assert main(["merge", str(world["llama"]), "--out", str(tmp_path / "m3")]) == 2  # nothing to merge


def test_finetune_with_lora_trains_the_head_and_the_adapters(world: dict[str, Path], tmp_path: Path) -> None:
    def finetune(out: Path, *lr: str) -> torch.nn.Module:
        assert main(["finetune", "--task", "classify", "--base", str(world["bert"]), "--peft", "lora",
                     "--train-file", str(world["sentiment_train"]), "--train.max_steps=5", f"--train.out_dir={out}",
                     "--train.progress=false", *lr]) == 0
        return lmforge.load(out)[0]

    model = finetune(tmp_path / "cls")
    initial = finetune(tmp_path / "frozen", "--train.lr=0", "--train.min_lr=0")  # same seed, never updated
    base, _ = lmforge.load(world["bert"])
    assert not torch.allclose(model.classifier.weight, initial.classifier.weight, atol=1e-4)  # the head trained
    assert torch.equal(model.backbone.tok_emb.weight, base.tok_emb.weight)  # the backbone stayed frozen
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: non-zero means it trained


@pytest.mark.parametrize("stage", ["reward", "dpo", "grpo", "ppo", "distill"])
def test_every_post_training_stage_accepts_peft(world: dict[str, Path], tmp_path: Path, stage: str) -> None:
    """LoRA through each post-training stage: the adapters are in the result, which reloads with lmforge.load."""
    out = tmp_path / stage
    common = ["--peft", "lora", "--train.max_steps=2", f"--train.out_dir={out}", "--train.progress=false"]
    if stage in ("reward", "dpo"):
        args = [stage, "--base", str(world["llama"]), "--train-file", str(world["prefs_train"]), "--max-len", "200"]
    elif stage in ("ppo", "grpo"):
        args = [stage, "--policy", str(world["llama"]), "--prompts", str(world["prompts_train"]), "--max-new-tokens",
                "4", "--prompts_per_round=2", "--minibatch_size=2"] + (["--group-size=2"] if stage == "grpo" else [])
    else:  # a LoRA student (a copy of the base) learning from the base as teacher, on token shards
        docs = tmp_path / "docs.jsonl"
        texts = pretraining_documents(WorldConfig(n_documents=200))
        docs.write_text("".join(json.dumps({"text": d}) + "\n" for d in texts))
        prepare_shards([docs], lmforge.load(world["llama"])[1], tmp_path / "shards", progress=False)
        args = ["distill", "--teacher", str(world["llama"]), "--student", str(world["llama"]),
                f"--data.dir={tmp_path / 'shards'}", "--train.seq_len=32"]
    assert main(args + common) == 0
    loaded, _ = lmforge.load(out / "policy" if stage in ("ppo", "grpo") else out)
    assert any("lora_A" in n for n, _ in loaded.named_parameters())
