"""Every CLI verb with the bad input a user can give it: exit status 2, one line on stderr that names the
file, key or value, no traceback, and nothing on disk changed (the whole world is hashed before and after)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import lmforge
from lmforge.cli import main
from lmforge.config import ModelConfig
from lmforge.model import build_model
from lmforge.tokenizer import train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "the king rode to the castle and the queen sang of the river and the moon"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Good inputs, bad inputs and finished outputs the bad commands must leave alone."""
    root = tmp_path_factory.mktemp("catalogue")
    w = {"root": root}
    w["txt"] = root / "corpus.txt"
    w["txt"].write_text("\n".join([TEXT] * 50))
    w["jsonl"] = root / "corpus.jsonl"
    w["jsonl"].write_text("".join(json.dumps({"text": f"{TEXT} {i}"}) + "\n" for i in range(60)))
    w["bad_jsonl"] = root / "bad.jsonl"
    w["bad_jsonl"].write_text('{"text": "fine"}\n{"text": oops}\n')
    w["latin1"] = root / "latin1.txt"
    w["latin1"].write_bytes("caf\xe9 au lait\n".encode("latin-1") * 20)
    w["empty"] = root / "empty.txt"
    w["empty"].write_text("")
    w["a_file"] = root / "a_file"
    w["a_file"].write_text("not a directory\n")
    tok = train_tokenizer([TEXT] * 40, vocab_size=400, show_progress=False)
    w["tok"] = root / "tok"
    tok.save(w["tok"])
    w["garbage_tok"] = root / "garbage_tok"
    w["garbage_tok"].mkdir()
    (w["garbage_tok"] / "tokenizer.json").write_text('{"model": "this is not a tokenizer"')
    assert main(["data", "prepare", "--input", str(w["jsonl"]), "--tokenizer", str(w["tok"]), "--out",
                 str(root / "data"), "--val-fraction", "0.1"]) == 0
    w["data"] = root / "data"
    torch.manual_seed(0)
    w["ckpt"] = root / "ckpt"
    lmforge.save(build_model(ModelConfig(vocab_size=400, max_seq_len=256, n_layer=1, n_head=2, d_model=16)), tok,
                 w["ckpt"])
    w["garbage_ckpt"] = root / "garbage_ckpt"
    shutil.copytree(w["ckpt"], w["garbage_ckpt"])
    (w["garbage_ckpt"] / "tokenizer.json").write_text("\x00garbage")
    w["config"] = root / "tiny.yaml"
    w["config"].write_text(yaml.safe_dump({
        "model": {"vocab_size": 400, "max_seq_len": 32, "n_layer": 1, "n_head": 2, "d_model": 16},
        "data": {"dir": str(w["data"])},
        "train": {"out_dir": str(root / "run"), "batch_size": 2, "max_steps": 2, "save_every": 2, "eval_every": 2,
                  "eval_batches": 1, "progress": False}}))
    assert main(["pretrain", "--config", str(w["config"])]) == 0
    w["run"] = root / "run"
    w["latin1_yaml"] = root / "latin1.yaml"
    w["latin1_yaml"].write_bytes("train:\n  out_dir: caf\xe9\n".encode("latin-1"))
    w["sft_bad"] = root / "sft_bad.jsonl"
    w["sft_bad"].write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                   {"role": "assistant", "content": "hello"}]}) + "\n[1, 2]\n")
    w["prompts"] = root / "prompts.jsonl"
    w["prompts"].write_text(json.dumps({"prompt": "the king"}) + "\n")
    w["escaping_run"] = root / "escaping_run"
    w["escaping_run"].mkdir()
    (w["escaping_run"] / "latest").write_text("../run/checkpoints/step_00000002\n")
    w["hf_bad_index"] = lmforge.export_hf(lmforge.load(w["ckpt"])[0], tok, root / "hf_bad_index")
    (w["hf_bad_index"] / "model.safetensors").unlink()
    (w["hf_bad_index"] / "model.safetensors.index.json").write_text('{"weight_map": ["model.safetensors"]}')
    w["demo_like"] = root / "precious"
    w["demo_like"].mkdir()
    (w["demo_like"] / "thesis.tex").write_text("years of work\n")
    return w


# (case id, argv with {placeholders} from the world, fragments the one line must contain)
CASES = [
    ("tok-missing-input", "tokenizer train --input {root}/nope.txt --vocab-size 500 --out {root}/t1", ["nope.txt"]),
    ("tok-empty-input", "tokenizer train --input {empty} --vocab-size 500 --out {root}/t1", ["empty.txt"]),
    ("tok-vocab-10", "tokenizer train --input {txt} --vocab-size 10 --out {root}/t1", ["--vocab-size", "10"]),
    ("tok-vocab-100", "tokenizer train --input {txt} --vocab-size 100 --out {root}/t1", ["--vocab-size", "100"]),
    ("tok-out-is-a-file", "tokenizer train --input {txt} --vocab-size 500 --out {a_file}", ["a_file"]),
    ("tok-non-utf8", "tokenizer train --input {latin1} --vocab-size 500 --out {root}/t1", ["latin1.txt"]),
    ("tok-bad-jsonl", "tokenizer train --input {bad_jsonl} --vocab-size 500 --out {root}/t1", ["bad.jsonl:2"]),
    ("data-garbage-tokenizer", "data prepare --input {txt} --tokenizer {garbage_tok} --out {root}/d1",
     ["tokenizer.json"]),
    ("data-missing-tokenizer", "data prepare --input {txt} --tokenizer {root}/nope --out {root}/d1", ["nope"]),
    ("data-non-utf8-over-good", "data prepare --input {latin1} --tokenizer {tok} --out {data}", ["latin1.txt"]),
    ("data-bad-jsonl-over-good", "data prepare --input {bad_jsonl} --tokenizer {tok} --out {data}",
     ["bad.jsonl:2"]),
    ("data-val-fraction", "data prepare --input {txt} --tokenizer {tok} --out {root}/d1 --val-fraction 1.5",
     ["--val-fraction", "1.5"]),
    ("pretrain-non-utf8-yaml", "pretrain --config {latin1_yaml}", ["latin1.yaml"]),
    ("pretrain-unknown-key", "pretrain --config {config} --model.n_layers=3", ["model.n_layers"]),
    ("pretrain-bad-value", "pretrain --config {config} --train.lr=fast", ["train.lr", "fast"]),
    ("pretrain-run-exists", "pretrain --config {config}", ["--resume"]),
    ("pretrain-resume-changed-lr", "pretrain --config {config} --resume --train.lr=0.5", ["train.lr"]),
    ("pretrain-resume-nothing", "pretrain --config {config} --resume --train.out_dir={root}/nope", ["nope"]),
    ("generate-missing", "generate {root}/nope --prompt x", ["nope"]),
    ("generate-latest-outside-the-run", "generate {escaping_run} --prompt x", ["latest", "../run"]),
    ("generate-hf-weight-map-not-a-mapping", "generate {hf_bad_index} --prompt x",
     ["model.safetensors.index.json", "weight_map"]),
    ("generate-garbage-tokenizer", "generate {garbage_ckpt} --prompt x", ["tokenizer.json"]),
    ("generate-num-samples-0", "generate {ckpt} --prompt x --num-samples 0", ["--num-samples"]),
    ("generate-temperature", "generate {ckpt} --prompt x --temperature -1", ["temperature", "-1"]),
    ("generate-top-p", "generate {ckpt} --prompt x --top-p 1.5", ["top_p", "1.5"]),
    ("generate-num-beams", "generate {ckpt} --prompt x --num-beams 0", ["--num-beams"]),
    ("generate-not-int", "generate {ckpt} --prompt x --max-new-tokens many", ["--max-new-tokens", "many"]),
    ("sft-missing-file", "sft --base {ckpt} --train-file {root}/nope.jsonl --train.out_dir={root}/s1 --max-len 64",
     ["nope.jsonl"]),
    ("sft-bad-line", "sft --base {ckpt} --train-file {sft_bad} --train.out_dir={root}/s1 --max-len 64",
     ["sft_bad.jsonl:2"]),
    ("finetune-missing-file", "finetune --task classify --base {ckpt} --train-file {root}/nope.jsonl "
     "--train.out_dir={root}/f1 --max-len 64", ["nope.jsonl"]),
    ("reward-bad-line", "reward --base {ckpt} --train-file {bad_jsonl} --train.out_dir={root}/r1 --max-len 64",
     ["bad.jsonl:1", "prompt"]),
    ("dpo-missing-file", "dpo --base {ckpt} --train-file {root}/nope.jsonl --train.out_dir={root}/p1 --max-len 64",
     ["nope.jsonl"]),
    ("ppo-missing-prompts", "ppo --policy {ckpt} --reward verifier --prompts {root}/nope.jsonl "
     "--train.out_dir={root}/p2", ["nope.jsonl"]),
    ("grpo-bad-reward", "grpo --policy {ckpt} --reward {root}/no_rm --prompts {prompts} --train.out_dir={root}/p3",
     ["no_rm"]),
    ("distill-missing-teacher", "distill --teacher {root}/nope --student_model.n_layer=1 --data.dir={data} "
     "--train.out_dir={root}/p4",
     ["nope"]),
    ("export-over-its-input", "export {ckpt} --format hf --out {ckpt}", ["--out", "input"]),
    ("export-over-a-run", "export {ckpt} --format hf --out {run}", ["training run"]),
    ("export-over-foreign-files", "export {ckpt} --format hf --out {demo_like}", ["thesis.tex"]),
    ("export-peft-of-plain-run", "export {ckpt} --format peft --out {root}/e1", ["--peft"]),
    ("quantize-over-its-input", "quantize {ckpt} --out {root}", ["--out", "input"]),
    ("merge-not-peft", "merge {ckpt} --out {root}/m1", ["--peft"]),
    ("quantize-missing", "quantize {root}/nope --out {root}/q1", ["nope"]),
    ("demo-foreign-dir", "demo --quick --out-dir {demo_like}", ["precious"]),
    ("eval-ppl-bad-jsonl", "eval perplexity {ckpt} --input {bad_jsonl}", ["bad.jsonl:2"]),
    ("eval-ppl-stride", "eval perplexity {ckpt} --input {txt} --stride 0", ["--stride", "got 0"]),
    ("eval-ppl-json-under-a-file", "eval perplexity {ckpt} --input {txt} --json {a_file}/ppl.json", ["a_file"]),
    ("eval-tasks-missing", "eval tasks {ckpt} --tasks {root}/nope.jsonl --out {root}/e1", ["nope.jsonl"]),
    ("eval-tasks-no-type", "eval tasks {ckpt} --tasks {bad_jsonl} --out {root}/e1", ["bad.jsonl:1", "'type'"]),
    ("eval-tasks-out-is-a-file", "eval tasks {ckpt} --tasks {prompts} --out {a_file}", ["--out", "a_file"]),
    ("judge-missing-field", "judge --judge {ckpt} --pairs {prompts} --out {root}/j1.jsonl",
     ["prompts.jsonl:1", "'instruction'"]),
    ("judge-out-over-pairs", "judge --judge {ckpt} --pairs {prompts} --out {prompts}", ["--out", "--pairs"]),
    ("rag-index-missing", "rag index {root}/nope --out {root}/i1", ["nope"]),
    ("rag-index-bad-jsonl", "rag index {bad_jsonl} --out {root}/i1", ["bad.jsonl:2"]),
    ("rag-index-empty", "rag index {empty} --out {root}/i1", ["empty document collection", "empty.txt"]),
    ("rag-index-over-foreign-files", "rag index {txt} --out {demo_like}", ["precious", "not an lmforge rag index"]),
    ("rag-index-overlap", "rag index {txt} --out {root}/i1 --chunk-tokens 8 --overlap 8", ["--overlap", "8"]),
    ("rag-ask-missing-index", "rag ask {ckpt} --index {root}/nope --question x", ["no index at", "nope"]),
    ("rag-ask-not-an-index", "rag ask {ckpt} --index {demo_like} --question x", ["precious", "index.json"]),
    ("unknown-verb", "frobnicate", ["frobnicate"]),
]


def tree_digest(root: Path) -> str:
    """One hash of every path and file's bytes under root."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        h.update(str(path.relative_to(root)).encode())
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()


def assert_one_clear_line(err: str, fragments: list[str]) -> None:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.mark.parametrize("argv, fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_one_line_and_changes_nothing(world: dict[str, Path], argv: str, fragments: list[str],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    before = tree_digest(world["root"])
    args = [a.format(**world) for a in argv.split()]
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    captured = capsys.readouterr()
    assert code == 2, captured
    assert_one_clear_line(captured.err, [f.format(**world) for f in fragments])
    assert tree_digest(world["root"]) == before


@pytest.mark.parametrize("case", [
    pytest.param("generate-non-utf8-prompt", marks=pytest.mark.slow),  # these two import torch: ~2.5 s a process
    "data-val-fraction",
    pytest.param("pretrain-non-utf8-yaml", marks=pytest.mark.slow),
])
def test_as_a_user_runs_it(world: dict[str, Path], case: str) -> None:
    """A few cases through a real process: the exit status and stderr a shell sees."""
    if case == "generate-non-utf8-prompt":
        args = [b"generate", str(world["ckpt"]).encode(), b"--prompt", b"caf\xe9"]
        fragments = ["--prompt", "0xe9"]
    else:
        argv, fragments = next(c[1:] for c in CASES if c[0] == case)
        args = [a.format(**world).encode() for a in argv.split()]
    before = tree_digest(world["root"])
    env = {**os.environ, "PYTHONPATH": str(Path(lmforge.__file__).parents[1])}
    proc = subprocess.run([sys.executable.encode(), b"-m", b"lmforge.cli", *args], capture_output=True, env=env,
                          timeout=120)
    assert (proc.returncode, proc.stdout) == (2, b""), proc
    assert_one_clear_line(proc.stderr.decode(errors="replace"), fragments)
    assert tree_digest(world["root"]) == before
