"""`lmforge export`: runs to Hugging Face dirs (merging a PEFT run) and portable peft adapter folders, which peft
loads after the folder is moved and which `lmforge.load` / `lmforge generate --adapter` read back onto their base.

Parity means max abs logit difference <= 1e-4 (fp32, eval mode) on random ids.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge.checkpoint import save
from lmforge.cli import main
from lmforge.config import ModelConfig, PeftConfig
from lmforge.errors import CheckpointError
from lmforge.manifest import CheckpointManifest
from lmforge.model import build_model
from lmforge.model.decoder import DecoderLM
from lmforge.peft.config import apply_peft
from lmforge.peft.lora import lora_layers
from lmforge.tokenizer import END_OF_TURN, train_tokenizer
from lmforge.train.sft import SFTConfig
from parity_helpers import perturb

peft = pytest.importorskip("peft")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # peft reads transformers' deprecated `is_gradient_checkpointing`: their warning, not ours, kept off the summary
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]
ATOL = 1e-4


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["the cat sat on the mat", "hello world, hello lmforge"] * 10, vocab_size=400,
                           show_progress=False)


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 10), generator=torch.Generator().manual_seed(3))


def _base(tmp_path, tok, family: str):
    """An HF-format base model (as `lmforge export` or transformers' save_pretrained writes one)."""
    torch.manual_seed(0)
    cfg = ModelConfig(family=family, vocab_size=tok.vocab_size, max_seq_len=32, n_layer=2, n_head=4, d_model=32,
                      **({"n_kv_head": 2} if family == "llama" else {}))
    model = DecoderLM(cfg).eval()
    perturb(model)
    return lmforge.export_hf(model, tok, tmp_path / f"{family}-hf")


def _run(tmp_path, base, peft_cfg: PeftConfig, name: str = "run"):
    """A checkpoint as `lmforge sft --base BASE --peft ...` writes it, adapters moved off their zero init."""
    model, tok = lmforge.load(base)
    apply_peft(model, peft_cfg)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B["default"].normal_(0, 0.1)
            if "default" in layer.lora_magnitude:
                layer.lora_magnitude["default"].mul_(1.1)
        if not lora_layers(model):
            perturb(model)
    record = CheckpointManifest.of_run("sft", SFTConfig(base=str(base), train_file="train.jsonl", peft=peft_cfg),
                                       model=model.cfg, peft=peft_cfg)
    return save(model, tok, tmp_path / name, run_config=record)


@pytest.mark.parametrize(("family", "method", "targets"), [
    ("llama", "lora", ["attn", "mlp"]), ("gpt2", "dora", ["attn.q", "attn.v", "mlp"]), ("gpt2", "pissa", ["attn"]),
])
def test_peft_folder_is_portable_and_loads_everywhere(tmp_path, tok, family, method, targets):
    base = _base(tmp_path, tok, family)
    run = _run(tmp_path, base, PeftConfig(method=method, r=4, alpha=8, targets=targets))
    ours, _ = lmforge.load(run)
    assert main(["export", str(run), "--format", "peft", "--base-name", str(base), "--out",
                 str(tmp_path / "adapter")]) == 0
    moved = shutil.move(tmp_path / "adapter", tmp_path / "elsewhere" / "adapter")
    config = json.loads((moved / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base) and not (moved / "base").exists()
    ids = _ids(tok.vocab_size)
    with torch.no_grad():
        expected = ours(ids)
        by_peft = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), moved).eval()
        assert (by_peft(ids).logits - expected).abs().max() <= ATOL
        auto = peft.AutoPeftModelForCausalLM.from_pretrained(moved).eval()
        assert (auto(ids).logits - expected).abs().max() <= ATOL
        back, back_tok = lmforge.load(moved)  # lmforge reads the peft folder onto its base
        assert (back(ids) - expected).abs().max() <= ATOL
    hf_tok = AutoTokenizer.from_pretrained(moved)  # tokenizer files travel with the adapter, chat template too
    assert hf_tok.encode("hello world") == tok.encode("hello world") == back_tok.encode("hello world")
    assert "<|end_of_turn|>" in hf_tok.chat_template


def test_generate_adapter_needs_base_when_the_named_one_is_a_hub_id(tmp_path, tok, capsys):
    base = _base(tmp_path, tok, "llama")
    run = _run(tmp_path, base, PeftConfig(method="lora", r=2, targets=["attn.q"]))
    out = tmp_path / "adapter"
    assert main(["export", str(run), "--format", "peft", "--base-name", "someorg/tiny-llama", "--out", str(out)]) == 0
    with pytest.raises(CheckpointError, match="'someorg/tiny-llama'.*--base PATH"):
        lmforge.load(out)
    capsys.readouterr()
    prompt = ["--prompt", "hello", "--max-new-tokens", "3", "--no-stream"]
    assert main(["generate", "--adapter", str(out), *prompt]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--base" in err and "Traceback" not in err
    assert main(["generate", "--adapter", str(out), "--base", str(base), *prompt]) == 0
    assert capsys.readouterr().out.startswith("hello")
    assert main(["generate", str(base), "--adapter", str(out), *prompt]) == 2  # one source, not two


def test_export_hf_merges_a_peft_run_and_handles_plain_runs(tmp_path, tok):
    base = _base(tmp_path, tok, "llama")
    ids = _ids(tok.vocab_size)
    for name, peft_cfg in (("lora", PeftConfig(method="lora", r=4, targets=["attn", "mlp"])), ("plain", None)):
        run = _run(tmp_path, base, peft_cfg, name) if peft_cfg else base
        if peft_cfg is None:  # a plain lmforge run (no --peft): `merge --hf` refuses it, export does not
            model, _ = lmforge.load(base)
            run = save(model, tok, tmp_path / "plain", run_config=CheckpointManifest.of_run(
                "sft", SFTConfig(base=str(base), train_file="t.jsonl"), model=model.cfg))
            assert main(["merge", str(run), "--hf", "--out", str(tmp_path / "m")]) == 2
        ours, _ = lmforge.load(run)
        out = tmp_path / f"{name}-hf"
        assert main(["export", str(run), "--out", str(out)]) == 0
        with torch.no_grad():
            theirs = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
            assert (theirs - ours(ids)).abs().max() <= ATOL
        generation = json.loads((out / "generation_config.json").read_text())
        assert tok.token_id(END_OF_TURN) in generation["eos_token_id"]  # the run's template (lmforge) travelled


def test_export_refusals_are_one_line(tmp_path, tok, capsys):
    base = _base(tmp_path, tok, "llama")
    own_base = lmforge.save(*lmforge.load(base), tmp_path / "lmforge-base")
    lora = _run(tmp_path, own_base, PeftConfig(method="lora", r=2, targets=["attn.q"]), "lora")
    prefix = _run(tmp_path, base, PeftConfig(method="prefix", prefix_len=2, reparam=False), "prefix")
    capsys.readouterr()
    cases = [
        (["export", str(lora), "--format", "peft", "--out", str(tmp_path / "a")], "pass --base-name"),
        (["export", str(prefix), "--out", str(tmp_path / "b")], "cannot merge method 'prefix'"),
        (["export", str(prefix), "--format", "peft", "--out", str(tmp_path / "c")], "LoRA-family"),
        (["export", str(own_base), "--format", "peft", "--out", str(tmp_path / "d")], "not trained with --peft"),
        (["export", str(lora), "--base-name", "x", "--out", str(tmp_path / "e")], "goes with --format peft"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
        assert not (tmp_path / argv[-1]).exists()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_lmforge_reads_an_adapter_peft_itself_made(tmp_path, tok, family):
    """peft's own save_pretrained (a general rank-r LoRA on GPT-2's fused c_attn; rsLoRA scaling and an
    alpha_pattern on Llama) loads onto the base in lmforge with peft's logits."""
    base = _base(tmp_path, tok, family)
    targets = ["c_attn", "c_proj"] if family == "gpt2" else ["q_proj", "v_proj", "down_proj"]
    extra = {} if family == "gpt2" else {"use_rslora": True, "alpha_pattern": {"v_proj": 3.0}, "use_dora": True}
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=family == "gpt2", **extra)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.save_pretrained(tmp_path / "theirs")
    ids = _ids(tok.vocab_size)
    with torch.no_grad():
        expected = model.eval()(ids).logits
        ours, _ = lmforge.load(tmp_path / "theirs")
        assert (ours(ids) - expected).abs().max() <= ATOL


def test_saving_never_replaces_a_run_or_foreign_files(tmp_path: Path) -> None:
    """lmforge.save / export_hf replace an earlier model dir whole, and refuse anything else in one line."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=64, max_seq_len=16, n_layer=1, n_head=2, d_model=16))
    lmforge.save(model, None, tmp_path / "m")
    lmforge.export_hf(model, None, tmp_path / "m")  # an lmforge dir becomes an HF dir: nothing of it is left
    assert not (tmp_path / "m" / "config.yaml").exists() and (tmp_path / "m" / "config.json").is_file()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "latest").write_text("checkpoints/step_00000002\n")
    for target, says in [("notes", "todo.txt"), ("run", "training run")]:
        for write in (lmforge.save, lmforge.export_hf):
            with pytest.raises(CheckpointError, match=says):
                write(model, None, tmp_path / target)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "notes", "run"]  # no temp dir left behind
