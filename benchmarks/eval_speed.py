"""lm-evaluation-harness speed: the same lm-eval tasks through lmforge's adapter (model "lmforge") and through
lm-eval's own `hf` model on the same weights (the lmforge checkpoint and its Hugging Face export), in one process.

Three local tasks are written from the synthetic world's documents: multiple choice (4 continuations of a document's
start, one its own), rolling perplexity over documents about twice the context long, and greedy generation until
"." (at most 32 tokens). Each task runs through `lm_eval.simple_evaluate` with a model object built once per side
(loading is not timed) and the same batch size, in interleaved rounds; the median round is reported, twice: the
model's own time (in loglikelihood / loglikelihood_rolling / generate_until: what the adapter replaces) and the whole
simple_evaluate call (lm-eval's task building and scoring, the same for both sides, included), as requests/s (the
requests lm-eval made) and the wall-clock ratio. Nothing is downloaded.

The same batch size means the same memory: lm-eval's hf model runs batch_size rows; the adapter packs short
loglikelihood requests and short generations into more rows within batch_size full-context rows' memory (where it
gets most of its generate_until lead: fewer, fuller decode steps). The model's time, summed over the tasks, is the
wall-clock of the same requests on each side; the target applies to it.

    python benchmarks/eval_speed.py                 # demo size, 48 items per task
    python benchmarks/eval_speed.py --items 16 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import lmforge  # noqa: E402
from lmforge.config import ModelConfig  # noqa: E402
from lmforge.cpu_threads import set_cpu_threads  # noqa: E402
from lmforge.data.synthetic import WorldConfig, pretraining_documents  # noqa: E402
from lmforge.model.decoder import DecoderLM  # noqa: E402
from lmforge.tokenizer import train_tokenizer  # noqa: E402

TARGET = 1.5  # the adapter's speed-up over lm-eval's hf model (issue 14)
TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {kind}
{body}
metadata:
  version: 1.0
"""
BODIES = {
    "multiple_choice": 'doc_to_text: "{{text}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
                       "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true",
    "loglikelihood_rolling": 'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n'
                             "    aggregation: weighted_perplexity\n    higher_is_better: false",
    "generate_until": 'doc_to_text: "{{text}}"\ndoc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: ["."]\n'
                      "  max_gen_toks: 32\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n"
                      "    aggregation: mean\n    higher_is_better: true",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="lm-eval tasks through lmforge's adapter vs lm-eval's hf model.")
    common.add_model_args(p)
    p.add_argument("--items", type=int, default=48, help="items per task (default: 48)")
    p.add_argument("--batch-size", type=int, default=16, help="batch size of both models (default: 16)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (default: 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return p.parse_args(argv)


def write_tasks(root: Path, docs: list[str], items: int, ctx_words: int) -> dict[str, int]:
    """The three task YAMLs and their data under root; returns task -> lm-eval requests it makes."""
    rng = random.Random(0)
    words = [d.split() for d in docs if len(d.split()) >= 24]
    rows: dict[str, list[dict]] = {"multiple_choice": [], "loglikelihood_rolling": [], "generate_until": []}
    for i in range(items):
        doc = words[i % len(words)]
        cut = len(doc) // 2
        others = [" ".join(o[len(o) // 2:len(o) // 2 + 6]) for o in rng.sample(words, 3)]
        choices = [" ".join(doc[cut:cut + 6]), *others]
        rows["multiple_choice"].append({"text": " ".join(doc[:cut]), "choices": choices, "label": 0})
        long_text: list[str] = []
        while len(long_text) < 2 * ctx_words:
            long_text += rng.choice(words)
        rows["loglikelihood_rolling"].append({"text": " ".join(long_text)})
        rows["generate_until"].append({"text": " ".join(doc[:cut]), "answer": doc[cut]})
    requests = {}
    for kind, data in rows.items():
        name = f"speed_{kind}"
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
        (root / f"{name}.yaml").write_text(TASK.format(name=name, data=root / f"{name}.jsonl", kind=kind,
                                                       body=BODIES[kind]))
        requests[name] = sum(len(r["choices"]) for r in data) if kind == "multiple_choice" else len(data)
    return requests


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        set_cpu_threads(args.threads)
    spec = common.spec_from_args(args)
    docs = pretraining_documents(WorldConfig(n_documents=3000))
    tokenizer = train_tokenizer(docs, vocab_size=spec.vocab_size, show_progress=False)
    torch.manual_seed(0)
    fields = dict(family=spec.family, vocab_size=spec.vocab_size, max_seq_len=spec.max_seq_len, n_layer=spec.n_layer,
                  n_head=spec.n_head, d_model=spec.d_model)
    model = DecoderLM(ModelConfig(**fields, **({"n_kv_head": spec.n_kv_head} if spec.n_kv_head else {}))).eval()

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from lmforge.eval.harness import LmforgeLM

    with tempfile.TemporaryDirectory(prefix="lmforge-eval-speed-") as tmp:
        root = Path(tmp)
        run, hf_dir = lmforge.save(model, tokenizer, root / "run"), lmforge.export_hf(model, tokenizer, root / "hf")
        (root / "tasks").mkdir()
        requests = write_tasks(root / "tasks", docs, args.items, ctx_words=spec.max_seq_len // 2)
        manager = TaskManager(include_defaults=False, include_path=str(root / "tasks"))
        sides = {"lmforge": LmforgeLM(str(run), batch_size=args.batch_size),
                 "hf": HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32", batch_size=args.batch_size)}

        model_seconds = {side: time_requests(lm) for side, lm in sides.items()}
        print(common.machine_line())
        print(f"model: {spec.describe()} | {args.items} items per task | batch size {args.batch_size} | "
              f"lm-eval {lm_eval.__version__}")
        totals = {(side, part): 0.0 for side in sides for part in ("model", "all")}
        for task, n in requests.items():
            times: dict[tuple[str, str], list[float]] = {key: [] for key in totals}
            for r in range(args.rounds + 1):  # round 0 warms up
                for side in list(sides)[r % 2:] + list(sides)[:r % 2]:
                    model_seconds[side][0] = 0.0
                    start = time.perf_counter()
                    lm_eval.simple_evaluate(model=sides[side], tasks=[task], task_manager=manager, bootstrap_iters=0,
                                            log_samples=False)
                    if r:
                        times[side, "all"].append(time.perf_counter() - start)
                        times[side, "model"].append(model_seconds[side][0])
            medians = {key: statistics.median(t) for key, t in times.items()}
            for key, value in medians.items():
                totals[key] += value
            print(f"{task:28s} {n:4d} requests | " + " | ".join(
                f"{part}: lmforge {n / medians['lmforge', part]:7.1f} req/s ({medians['lmforge', part]:.2f} s), "
                f"hf {n / medians['hf', part]:7.1f} req/s ({medians['hf', part]:.2f} s), "
                f"{medians['hf', part] / medians['lmforge', part]:.2f}x" for part in ("model", "all")))
        for part in ("model", "all"):
            ratio = totals["hf", part] / totals["lmforge", part]
            verdict = f"; {'meets' if ratio >= TARGET else 'misses'} the {TARGET}x target" if part == "model" else ""
            print(f"all tasks, {part} time: lmforge {totals['lmforge', part]:.2f} s, hf {totals['hf', part]:.2f} s: "
                  f"{ratio:.3f}x{verdict}")
        print("load at the end: {:.2f}/{:.2f} (1/5 min; above the cores, other processes shared them)".format(
            *os.getloadavg()[:2]))


def time_requests(lm) -> list[float]:
    """Make `lm`'s three request methods add their wall-clock seconds to the returned one-item list."""
    spent = [0.0]
    for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        method = getattr(lm, name)

        def timed(requests, *args, _method=method, **kwargs):
            start = time.perf_counter()
            try:
                return _method(requests, *args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start

        setattr(lm, name, timed)
    return spent


if __name__ == "__main__":
    main()
