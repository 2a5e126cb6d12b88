"""The lm-evaluation-harness adapter (lmforge.eval.harness) against lm-eval's own `hf` model on the exported
checkpoint, on the local tasks in tests/harness_tasks (multiple choice, rolling perplexity, generate_until), and
`lmforge eval harness`. lm-eval indexes only those tasks (TaskManager(include_defaults=False)); nothing is
downloaded."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lmforge
from lmforge.cli import main
from lmforge.config import ModelConfig
from lmforge.infer.generate import SamplingConfig, generate_ids
from lmforge.model.decoder import DecoderLM
from lmforge.tokenizer import Tokenizer, train_tokenizer
from parity_helpers import perturb
from tiny_pretraining import word_documents

ROOT = Path(__file__).resolve().parents[1]
TASKS_DIR = "tests/harness_tasks"  # the tasks' data_files are relative to the repository root
TASKS = ["lmforge_test_choice", "lmforge_test_rolling", "lmforge_test_generate"]
MARGIN = 1e-4


def _trained_model(tokenizer: Tokenizer, docs: list[str]) -> DecoderLM:
    """A 2-layer decoder fitted for 60 steps to the word documents, then perturbed: it writes words, stop strings
    among them, in varied order (a random one writes byte garbage; a trained one repeats one word)."""
    ids = torch.tensor([t for d in docs for t in tokenizer.encode(d) + [tokenizer.eos_id]])
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(vocab_size=400, max_seq_len=32, n_layer=2, n_head=2, d_model=32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        rows = torch.stack([ids[s:s + 33] for s in torch.randint(0, len(ids) - 33, (16,)).tolist()])
        loss = F.cross_entropy(model(rows[:, :-1]).flatten(0, 1), rows[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    perturb(model, 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, one_thread) -> dict:
    """The model as an lmforge checkpoint and as its Hugging Face export, with the process offline and in the
    repository root; lm-eval imported."""
    with pytest.MonkeyPatch.context() as mp:
        tmp = tmp_path_factory.mktemp("harness")
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            mp.setenv(name, "1")
        mp.setenv("HF_DATASETS_CACHE", str(tmp / "datasets"))
        mp.chdir(ROOT)
        docs = word_documents(300)
        tokenizer = train_tokenizer(docs, vocab_size=400, show_progress=False)
        model = _trained_model(tokenizer, docs)
        run, hf = lmforge.save(model, tokenizer, tmp / "run"), lmforge.export_hf(model, tokenizer, tmp / "hf")
        import lm_eval
        from lm_eval.tasks import TaskManager

        from lmforge.eval import harness  # noqa: F401  (registers the model "lmforge")

        manager = TaskManager(include_defaults=False, include_path=TASKS_DIR)
        results = {
            name: lm_eval.simple_evaluate(model=name, model_args=args, tasks=TASKS, task_manager=manager,
                                          batch_size=4, bootstrap_iters=0, log_samples=True)
            for name, args in [("lmforge", f"pretrained={run}"), ("hf", f"pretrained={hf},device=cpu,dtype=float32")]
        }
        yield dict(tmp=tmp, run=run, model=model, tokenizer=tokenizer, results=results)


def _samples(env: dict, model: str, task: str) -> list[dict]:
    return sorted(env["results"][model]["samples"][task], key=lambda s: s["doc_id"])


def _margin(scores: list[float]) -> float:
    """How far the best score is ahead of the second."""
    ranked = sorted(scores, reverse=True)
    return ranked[0] - ranked[1]


def test_multiple_choice_matches_hf(env: dict) -> None:
    ours, theirs = _samples(env, "lmforge", TASKS[0]), _samples(env, "hf", TASKS[0])
    assert len(ours) == len(theirs) == 24
    compared = 0
    for a, b in zip(ours, theirs, strict=True):
        ll_a, ll_b = [r[0][0] for r in a["resps"]], [r[0][0] for r in b["resps"]]
        assert ll_a == pytest.approx(ll_b, rel=1e-5, abs=1e-5)
        # acc picks the largest log-likelihood, acc_norm the largest per character of the choice
        normed = [ll / len(c) for ll, c in zip(ll_a, a["doc"]["choices"], strict=True)]
        for metric, scores in (("acc", ll_a), ("acc_norm", normed)):
            if _margin(scores) > MARGIN:
                assert a[metric] == b[metric], (metric, a["doc_id"])
                compared += 1
    assert compared >= 40  # of 48: items on a near-tie are few


def test_rolling_perplexity_matches_hf(env: dict) -> None:
    ours, theirs = (env["results"][m]["results"][TASKS[1]] for m in ("lmforge", "hf"))
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert ours[f"{metric},none"] == pytest.approx(theirs[f"{metric},none"], rel=1e-4)
    texts = [s["target"] for s in _samples(env, "lmforge", TASKS[1])]
    assert max(len(env["tokenizer"].encode(t)) for t in texts) > 3 * 32  # several rolling windows of the context
    for a, b in zip(_samples(env, "lmforge", TASKS[1]), _samples(env, "hf", TASKS[1]), strict=True):
        assert a["resps"][0][0] == pytest.approx(b["resps"][0][0], rel=1e-4)


def _greedy_margin(model: DecoderLM, prompt: list[int], new: list[int]) -> float:
    """The smallest gap between the two largest logits over the greedy steps that wrote `new`."""
    seq = torch.tensor([(prompt + new)[-model.cfg.max_seq_len:]])
    with torch.inference_mode():
        top = model(seq)[0, -len(new) - 1:].topk(2, dim=-1).values
    return float((top[:, 0] - top[:, 1]).min())


def test_generate_until_matches_hf_and_stops(env: dict) -> None:
    model, tokenizer = env["model"], env["tokenizer"]
    ours, theirs = _samples(env, "lmforge", TASKS[2]), _samples(env, "hf", TASKS[2])
    compared = cut = 0
    for a, b in zip(ours, theirs, strict=True):
        context, kwargs = a["arguments"][0]
        prompt = tokenizer.encode(context)[-(32 - kwargs["max_gen_toks"]):]
        new = generate_ids(model, prompt, SamplingConfig(max_new_tokens=kwargs["max_gen_toks"]), tokenizer.eos_id)
        text = tokenizer.decode(new, skip_special_tokens=True)
        stops = [text.find(s) for s in kwargs["until"] if s in text]
        assert a["resps"][0][0] == text[:min(stops, default=len(text))]  # the text before the first stop sequence
        cut += bool(stops)
        if _greedy_margin(model, prompt, new) > MARGIN:
            assert a["resps"] == b["resps"]
            compared += 1
    assert cut >= 2 and compared >= 10  # of 12


def test_cli_writes_lm_eval_results(env: dict, capsys: pytest.CaptureFixture[str]) -> None:
    out = env["tmp"] / "cli" / "results.json"
    assert main(["eval", "harness", str(env["run"]), "--tasks", f"{TASKS[0]},{TASKS[1]}", "--include-path", TASKS_DIR,
                 "--output", str(out), "--limit", "4", "--batch-size", "3"]) == 0
    results = json.loads(out.read_text())
    assert results["results"][TASKS[0]]["acc,none"] in (0, 0.25, 0.5, 0.75, 1)
    assert results["results"][TASKS[1]]["word_perplexity,none"] > 1
    assert results["n-samples"][TASKS[0]]["effective"] == 4
    assert TASKS[0] in capsys.readouterr().out  # lm-eval's table


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lmforge: error: ")
    return err


@pytest.mark.parametrize("tasks, include, expected", [
    ("nope", TASKS_DIR, f"unknown lm-eval task 'nope' (--tasks); --include-path {TASKS_DIR} has: "
                        "lmforge_test_choice, lmforge_test_generate, lmforge_test_rolling"),
    (TASKS[0], "tests/no_such_dir", "--include-path tests/no_such_dir is not a directory"),
    (TASKS[0], "{tmp}", "--include-path {tmp} holds no lm-eval task YAML"),  # the models' dirs only
])
def test_cli_unknown_task_or_include_path(env: dict, capsys: pytest.CaptureFixture[str], tasks: str, include: str,
                                          expected: str) -> None:
    out = env["tmp"] / "refused.json"
    include, expected = include.format(tmp=env["tmp"]), expected.format(tmp=env["tmp"])
    assert main(["eval", "harness", str(env["run"]), "--tasks", tasks, "--include-path", include,
                 "--output", str(out)]) == 2
    assert expected in _one_error_line(capsys)
    assert not out.exists()


def test_unknown_bundled_task_names_the_closest(env: dict) -> None:
    """Without --include-path lm-eval's ~14,000 bundled tasks are the choice: the line names the closest few."""
    from types import SimpleNamespace

    from lmforge.errors import ConfigError
    from lmforge.eval.harness import require_tasks

    bundled = SimpleNamespace(all_tasks=["arc_easy", "hellaswag", "hellaswag_de", "mmlu", "wikitext"])
    require_tasks(bundled, ["hellaswag", "mmlu"], None)
    with pytest.raises(ConfigError, match=r"unknown lm-eval task 'hellaswg' \(--tasks\); closest: hellaswag, "
                                          r"hellaswag_de; lm-eval bundles 5 "):
        require_tasks(bundled, ["hellaswg"], None)


@pytest.mark.parametrize("option", ["--limit", "--batch-size"])
def test_cli_counts_below_one(env: dict, capsys: pytest.CaptureFixture[str], option: str) -> None:
    argv = ["eval", "harness", str(env["run"]), "--tasks", TASKS[0], "--include-path", TASKS_DIR, option, "0"]
    assert main(argv) == 2
    assert f"{option} must be >= 1, got 0" in _one_error_line(capsys)


def test_cli_without_lm_eval_says_what_to_install(env: dict, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "lmforge.eval.harness")
    monkeypatch.setitem(sys.modules, "lm_eval.models", None)  # what `import` finds when lm-eval is not installed
    assert main(["eval", "harness", str(env["run"]), "--tasks", TASKS[0], "--include-path", TASKS_DIR]) == 2
    err = _one_error_line(capsys)
    assert "lm-evaluation-harness is not installed" in err and "pip install 'lmforge[eval]'" in err


@pytest.mark.parametrize("shared", [True, False], ids=["contexts-once", "one-row-per-request"])
def test_both_ways_of_scoring_match_a_plain_forward(env: dict, monkeypatch: pytest.MonkeyPatch, shared: bool) -> None:
    """Each loglikelihood batch is scored one of two ways (contexts once then continuations, or a row per request);
    both give a plain forward's log-probabilities, also for a context cut to fit and one-token continuations."""
    from lmforge.eval import harness

    model = env["model"]
    lm = harness.LmforgeLM(model, env["tokenizer"], batch_size=5)
    gen = torch.Generator().manual_seed(0)
    contexts = [torch.randint(5, 400, (n,), generator=gen).tolist() for n in (3, 17, 30, 45)]  # 45: cut to fit
    requests = [(None, ctx, torch.randint(5, 400, (n,), generator=gen).tolist())
                for ctx in contexts for n in (1, 4, 2)]
    monkeypatch.setattr(harness, "_shares", lambda batch, reqs: shared)
    scores = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    for (_, ctx, cont), (log_prob, is_greedy) in zip(requests, scores, strict=True):
        ids = torch.tensor([(ctx + cont)[-33:][:-1]])
        with torch.inference_mode():
            log_probs = F.log_softmax(model(ids)[0, -len(cont):], dim=-1)
        expected = log_probs.gather(-1, torch.tensor(cont)[:, None]).sum()
        assert log_prob == pytest.approx(float(expected), rel=1e-5, abs=1e-4)
        assert is_greedy == bool((log_probs.argmax(-1) == torch.tensor(cont)).all())


def test_a_large_context_group_is_scored_within_the_batch_budget(env: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests sharing one context (every document's first rolling window shares the prefix token) are scored in
    forwards of at most batch_size x max_length tokens, not all at once, and still as a plain forward scores them."""
    from lmforge.eval import harness

    model = env["model"]
    lm = harness.LmforgeLM(model, env["tokenizer"], batch_size=2)
    gen = torch.Generator().manual_seed(1)
    requests = [(None, [lm.prefix_token_id], torch.randint(5, 400, (32,), generator=gen).tolist()) for _ in range(9)]
    shapes = []
    hidden = type(model).hidden_of_embeddings
    monkeypatch.setattr(type(model), "hidden_of_embeddings",
                        lambda self, x, *args, **kw: shapes.append(x.shape[:2]) or hidden(self, x, *args, **kw))
    scores = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    assert shapes and all(rows * width <= 2 * model.cfg.max_seq_len for rows, width in shapes), shapes
    with torch.inference_mode():
        log_probs = F.log_softmax(model(torch.tensor([[lm.prefix_token_id] + cont[:-1] for _, _, cont in requests])),
                                  dim=-1)
    expected = log_probs.gather(-1, torch.tensor([cont for _, _, cont in requests])[..., None]).sum(dim=(1, 2))
    assert [s for s, _ in scores] == pytest.approx(expected.tolist(), rel=1e-5, abs=1e-4)


def test_scoring_fuses_the_mlp_activation_and_rolling_skips_greediness(env: dict, monkeypatch: pytest.MonkeyPatch
                                                                         ) -> None:
    """Loglikelihood batches run the MLPs' fused activation path (model/linear_activation.py); rolling windows, whose
    callers drop greediness, are not checked for it, and get the same log-probabilities."""
    from lmforge.eval import harness
    from lmforge.model import layers

    fused: list[bool] = []
    real = layers.linear_activation
    monkeypatch.setattr(layers, "linear_activation", lambda *a, **kw: fused.append(True) or real(*a, **kw))
    lm = harness.LmforgeLM(env["model"], env["tokenizer"], batch_size=4)
    gen = torch.Generator().manual_seed(2)
    requests = [(None, [lm.prefix_token_id], torch.randint(5, 400, (n,), generator=gen).tolist()) for n in (20, 31)]
    with_greedy = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    without = lm._loglikelihood_tokens(requests, disable_tqdm=True, greedy=False)
    assert fused
    assert [s for s, _ in without] == [s for s, _ in with_greedy]
    assert [g for _, g in without] == [False, False]


def test_generation_rows_fill_the_batch_memory(env: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Short prompts and answers decode in more rows than batch_size, as many as batch_size full-context rows'
    memory holds (at most one per request), with the same texts as batch_size rows."""
    from types import SimpleNamespace

    from lmforge.eval import harness

    lm = harness.LmforgeLM(env["model"], env["tokenizer"], batch_size=2)
    requests = [SimpleNamespace(args=(text, {"until": ["\n"], "max_gen_toks": 3}))
                for text in word_documents(12)[:10]]  # 10 prompts of at most 5 tokens, 3 new: 8 of 32 columns
    rows: list[int] = []
    engine = harness.Engine
    monkeypatch.setattr(harness, "Engine", lambda *a, max_batch, **kw: rows.append(max_batch) or engine(
        *a, max_batch=max_batch, **kw))
    monkeypatch.setattr(harness.LmforgeLM, "tok_encode", lambda self, text, **kw: self.tokenizer.encode(text)[:5])
    texts = lm.generate_until(requests, disable_tqdm=True)
    monkeypatch.setattr(harness.LmforgeLM, "_generation_rows", lambda self, reqs: self.batch_size)
    assert lm.generate_until(requests, disable_tqdm=True) == texts
    assert rows == [2 * 32 // 8, 2]
