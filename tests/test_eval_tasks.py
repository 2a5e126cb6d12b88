"""`lmforge eval tasks`: metric definitions by hand, multiple choice log-likelihoods by hand on a decoder and an
encoder-decoder, results.json and results.md, bad task files as one line with exit 2."""

from __future__ import annotations

import json
import re

import pytest
import torch

import lmforge
from eval_models import decoder_dir, encdec_dir, word_tokenizer
from lmforge.cli import main
from lmforge.eval.stats import wilson_interval
from lmforge.eval.text_metrics import corpus_bleu, exact_match, extract, normalize, rouge_f1, token_f1
from lmforge.infer.generate import SamplingConfig, generate
from lmforge.infer.generate_encdec import generate_text2text

CHOICES = [  # (prompt, choices, right choice)
    ("the king", ["sword", "moon river"], 0),
    ("the queen took the", ["gold", "fire stone", "ship"], 2),
    ("", ["bread", "wind"], 1),  # an empty context: the document separator stands in
    ("a castle", ["river", "the moon"], 1),
]


def test_text_metrics_by_hand():
    assert extract("so the answer is 42, not 41", re.compile(r"answer is (\d+)")) == "42"
    assert extract("x = 7", re.compile(r"\d")) == "7" and extract("none", re.compile(r"\d")) == ""
    assert extract("  as is ", None) == "  as is "
    assert exact_match("The Cat!", "cat") and not exact_match("a cat sat", "cat")
    # normalised "cat sat" against "cat sat down": precision 1, recall 2/3
    assert token_f1("the cat sat", "cat sat down") == pytest.approx(0.8)
    assert token_f1("dog", "cat") == 0.0 and token_f1("", "") == 1.0
    assert corpus_bleu(["the king rode to the old castle"], ["the king rode to the old castle"]) == pytest.approx(100)
    assert rouge_f1("a b d", "a b c") == pytest.approx({"rouge1": 2 / 3, "rouge2": 1 / 2, "rougeL": 2 / 3})


@pytest.fixture(scope="module")
def models(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("models")
    tokenizer = word_tokenizer()
    return {"decoder": decoder_dir(root, tokenizer), "encdec": encdec_dir(root, tokenizer)}


def _hand_loglikelihood(model, tokenizer, prompt: str, choice: str) -> float:
    """One unbatched forward: a decoder scores " choice" after the prompt, a T5 `choice EOS` given `prompt EOS`."""
    eos = tokenizer.eos_id
    with torch.inference_mode():
        if model.cfg.arch == "encdec":
            target = [*tokenizer.encode(choice), eos]
            logits = model(torch.tensor([[*tokenizer.encode(prompt), eos]]),
                           torch.tensor([[model.cfg.decoder_start_id, *target[:-1]]]))[0]
            return sum(torch.log_softmax(logits[i].double(), -1)[t].item() for i, t in enumerate(target))
        context = tokenizer.encode(prompt)
        continuation = tokenizer.encode(prompt + " " + choice)[len(context):]
        seq = (context or [eos]) + continuation
        logits = model(torch.tensor([seq]))[0]
        first = len(seq) - len(continuation)
        return sum(torch.log_softmax(logits[t - 1].double(), -1)[seq[t]].item() for t in range(first, len(seq)))


def _generation(model, tokenizer, prompt: str) -> str:
    cfg = SamplingConfig(max_new_tokens=6, temperature=0.0, truncate_prompt=True)
    run = generate_text2text if model.cfg.arch == "encdec" else generate
    return run(model, tokenizer, prompt, cfg)


@pytest.mark.parametrize("arch", ["decoder", "encdec"])
def test_tasks_scored_by_hand_and_written(models, arch, tmp_path, capsys):
    model, tokenizer = lmforge.load(models[arch])
    right = _generation(model, tokenizer, "the moon")  # what the model says, taken as the gold answer
    assert right.strip()
    lines = [{"type": "choice", "prompt": p, "choices": c, "answer": a} for p, c, a in CHOICES]
    lines += [{"type": "generate", "task": "echo", "prompt": "the moon", "answer": right},
              {"type": "generate", "task": "echo", "prompt": "the moon", "answer": right + " gold",
               "pattern": "(.*)"},
              {"type": "generate", "task": "echo", "prompt": "a ship", "answer": "zzz"},
              {"type": "text2text", "prompt": "the moon", "reference": right},
              {"type": "text2text", "prompt": "the king", "reference": "stone bread"}]
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    assert main(["eval", "tasks", str(models[arch]), "--tasks", str(tasks), "--out", str(out),
                 "--max-new-tokens", "6", "--batch-size", "3"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())["tasks"]

    choice = results["choice"]
    acc, acc_norm = [], []
    for (prompt, choices, answer), record in zip(CHOICES, choice["items"], strict=True):
        lls = [_hand_loglikelihood(model, tokenizer, prompt, c) for c in choices]
        assert record["loglikelihoods"] == pytest.approx(lls, rel=1e-5, abs=1e-5)
        acc.append(max(range(len(lls)), key=lls.__getitem__) == answer)
        acc_norm.append(max(range(len(lls)), key=lambda i: lls[i] / len(choices[i])) == answer)  # noqa: B023
    assert choice["metrics"]["acc"]["value"] == sum(acc) / 4
    assert choice["metrics"]["acc"]["ci95"] == pytest.approx(list(wilson_interval(sum(acc), 4)))
    assert choice["metrics"]["acc_norm"]["value"] == sum(acc_norm) / 4
    assert choice["metrics"]["acc_norm"]["ci95"] == pytest.approx(list(wilson_interval(sum(acc_norm), 4)))

    echo = results["echo"]  # right; right but for an extra word in the answer (F1 < 1); wrong
    assert [r["exact_match"] for r in echo["items"]] == [True, False, False]
    words = len(normalize(right).split())  # precision 1, recall words / (words + 1)
    assert echo["items"][1]["f1"] == pytest.approx(2 * words / (2 * words + 1))
    assert echo["metrics"]["exact_match"]["value"] == pytest.approx(1 / 3)
    assert echo["metrics"]["exact_match"]["ci95"] == pytest.approx(list(wilson_interval(1, 3)))
    assert echo["metrics"]["f1"]["value"] == pytest.approx(sum(r["f1"] for r in echo["items"]) / 3)

    t2t = results["text2text"]
    predictions = [r["prediction"] for r in t2t["items"]]
    assert predictions[0] == right and t2t["items"][0]["rouge1"] == pytest.approx(100)
    assert t2t["metrics"]["bleu"]["value"] == pytest.approx(corpus_bleu(predictions, [right, "stone bread"]))
    assert t2t["metrics"]["rougeL"]["value"] == pytest.approx(
        50 * sum(rouge_f1(p, r)["rougeL"] for p, r in zip(predictions, [right, "stone bread"], strict=True)))

    table = (out / "results.md").read_text()
    low, high = wilson_interval(1, 3)
    row = f"| echo | generate | 3 | exact_match | 33.3% | [{100 * low:.1f}%, {100 * high:.1f}%] |"
    assert row in table and row in printed and "| text2text | text2text | 2 | bleu |" in table


@pytest.mark.parametrize("content, problem", [
    ('{"type": "choice", "prompt": "x", "choices": ["a", "b"], "answer": 0}\n'
     '{"type": "generate", "prompt": "the king"}\n', "tasks.jsonl:2: missing field 'answer' (a generate task needs"),
    ('{"prompt": "the king", "answer": "x"}\n', "tasks.jsonl:1: field 'type' is missing"),
    ("\n\n", "holds no task lines"),
    ('{"type": "choice", "prompt": "the king", "choices": ["sword"], "answer": 0}\n',
     "tasks.jsonl:1: a choice task needs at least two choices, got 1"),
    ('{"type": "choice", "prompt": "the king", "choices": ["sword", ""], "answer": 0}\n',
     "tasks.jsonl:1: choice 1 is empty"),
    ('{"type": "choice", "prompt": "the king", "choices": ["a", "b"], "answer": 2}\n',
     "tasks.jsonl:1: field 'answer' must be the index of the right choice, 0 to 1, got 2"),
    ('{"type": "generate", "prompt": "", "answer": "x"}\n', "tasks.jsonl:1: the prompt '' tokenises to no tokens"),
    ('{"type": "generate", "prompt": "a", "answer": "x", "pattern": "("}\n', "field 'pattern' is not a valid"),
    ('{"type": "text2text", "task": "t", "prompt": "a", "reference": "x"}\n'
     '{"type": "generate", "task": "t", "prompt": "a", "answer": "x"}\n', "tasks.jsonl:2: task 't' is a text2text"),
])
def test_bad_task_file_is_one_line_exit_2(models, tmp_path, capsys, content, problem):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(content)
    out = tmp_path / "out"
    assert main(["eval", "tasks", str(models["decoder"]), "--tasks", str(tasks), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert problem in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()  # nothing half-written


def test_sampled_generation_is_reproducible_by_seed(models, tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"type": "generate", "prompt": p, "answer": "gold"}) + "\n"
                             for p in ["the king"] * 3))

    def completions(seed: int, out: str) -> list[str]:
        assert main(["eval", "tasks", str(models["decoder"]), "--tasks", str(tasks), "--out", str(tmp_path / out),
                     "--temperature", "1.0", "--seed", str(seed), "--max-new-tokens", "8"]) == 0
        results = json.loads((tmp_path / out / "results.json").read_text())
        assert results["generation"] == {"max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0, "seed": seed}
        return [r["completion"] for r in results["tasks"]["generate"]["items"]]

    first = completions(5, "a")
    assert completions(5, "b") == first and completions(6, "c") != first
    assert len(set(first)) == 3  # the same prompt thrice: item i samples with seed + i
