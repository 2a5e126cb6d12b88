"""The LLM-judge study on the synthetic world (RLAIF): fine-tune a judge, score it against the verifier, and write
the pairs it labelled as DPO data beside the same pairs labelled by the verifier.

The judge is a decoder (the demo's: its SFT model) fine-tuned (SFT) on judging transcripts from one half of the
instructions (`lmforge.data.judging`); it labels held-out pairs from the other half, asked in both orders
(`lmforge.eval.judge`).
Agreement with the verifier is reported over all pairs (a tie is not agreement) and over the decisive pairs, each
with a Wilson 95% interval; the judge is "at chance" when the interval of its decisive agreement reaches 50%.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lmforge
from lmforge.config import TrainConfig
from lmforge.data.chat import get_chat_template
from lmforge.data.judging import judging_data
from lmforge.data.synthetic import WorldConfig
from lmforge.eval.judge import JudgeCounts, both_orders, judge_pairs, model_decider, preference_records, prompt_ids
from lmforge.eval.stats import wilson_interval
from lmforge.io import atomic_write_jsonl
from lmforge.train.sft import SFTConfig, sft

ANSWER_TOKENS = 8  # "Better: A" and the end of turn, with room to spare


@dataclass
class JudgeStudy:
    judge_dir: Path  # the fine-tuned judge (an lmforge sft run dir)
    transcripts: int  # judging transcripts the judge trained on (those that fit the context)
    steps: int
    counts: JudgeCounts  # labels of the held-out pairs, ties and why
    agreed: int  # pairs whose label is the verifier's (ties are not)
    interval: tuple[float, float]  # Wilson 95% of agreed / counts.pairs
    decisive_interval: tuple[float, float] | None  # Wilson 95% of agreed / decisive; None without decisive pairs
    labelled_file: Path  # every held-out pair with the judge's answers in both orders, its label and outcome
    judge_prefs: Path | None  # DPO pairs (prompt, chosen, rejected) chosen by the judge, ties left out
    verifier_prefs: Path | None  # the same pairs, chosen by the verifier; None (both) when no pair was decisive
    verifier_prefs_all: Path  # every held-out pair, chosen by the verifier (the labels a judge could at best give)
    by_rejection: dict[str, tuple[int, int, int]]  # the rejected response's kind -> (pairs, agreed, ties)

    @property
    def decisive(self) -> int:
        return self.counts.a + self.counts.b

    @property
    def agreement(self) -> float:
        return self.agreed / self.counts.pairs

    @property
    def at_chance(self) -> bool:
        """True unless the judge's decisive labels agree with the verifier's significantly more than half the time."""
        return self.decisive_interval is None or self.decisive_interval[0] <= 0.5

    def sentence(self) -> str:
        """The study in words, with its numbers; says so when the judge is no better than chance."""
        lo, hi = self.interval
        text = (f"The judge (fine-tuned {self.steps} SFT steps on {self.transcripts} judging transcripts) "
                f"labelled {self.counts.pairs} held-out pairs, each asked in both orders: it agreed with "
                f"the verifier on {self.agreed} ({self.agreement:.1%}, 95% interval {lo:.1%}-{hi:.1%}); "
                f"{self.counts.ties} were ties ({self.counts.disagreements} where the two orders disagreed, "
                f"{self.counts.unparseable} with an answer naming neither response).")
        if self.decisive_interval is None:
            return text + " No pair got a label: the judge is no better than chance, and there is nothing to train on."
        dlo, dhi = self.decisive_interval
        on_decisive = (f" On the {self.decisive} pairs it labelled it agreed {self.agreed / self.decisive:.1%} of the "
                       f"time (95% interval {dlo:.1%}-{dhi:.1%})")
        if not self.at_chance:
            return text + on_decisive + ": better than chance (50%)."
        worse = " and below it" if dhi < 0.5 else ""
        return text + on_decisive + f": no better than chance (50%){worse}; its labels carry no reliable signal."


def _by_rejection(labelled: list[dict]) -> dict[str, tuple[int, int, int]]:
    """The rejected response's kind (wrong, rambling, ignores_format) -> (pairs, agreed with the verifier, ties)."""
    table = {}
    for kind in sorted({p["meta"]["rejection"] for p in labelled}):
        rows = [p for p in labelled if p["meta"]["rejection"] == kind]
        table[kind] = (len(rows), sum(p["label"] == p["meta"]["better"] for p in rows),
                       sum(p["label"] == "tie" for p in rows))
    return table


def judge_study(pretrained: str | Path, world: WorldConfig, out_dir: str | Path, *, n_train: int, n_pairs: int,
                steps: int, lr: float = 2e-3, batch_size: int = 16, template: str = "lmforge") -> JudgeStudy:
    """Fine-tune `pretrained` (a decoder dir) into a judge on `n_train` judging transcripts of `world` for `steps`
    steps, label `n_pairs` held-out pairs with it, and write under `out_dir`: data/ (the transcripts and pairs that fit
    the decoder's context), judge/ (the judge's run), labelled.jsonl, and DPO pairs: judge_prefs.jsonl (the judge's
    labels, ties left out), verifier_prefs.jsonl (the same pairs, the verifier's labels: only the labels differ) and
    verifier_prefs_all.jsonl (every pair, the verifier's labels: what the judge's ties cost too)."""
    out = Path(out_dir)
    base, tokenizer = lmforge.load(pretrained)
    context = base.cfg.max_seq_len
    chat = get_chat_template(template, tokenizer, pretrained)
    data = judging_data(world, n_train, n_pairs)
    # SFT reads up to max_len + 1 rendered tokens; a prompt leaves room for the answer
    transcripts = [r for r in data["judge_train"] if len(chat.render(r["messages"]).ids) <= context + 1]
    pairs = [p for p in data["judge_pairs"]
             if max(len(prompt_ids(chat, prompt)) for prompt in both_orders(p)) <= context - ANSWER_TOKENS]
    if not transcripts or not pairs:
        raise ValueError(f"no judging transcript or pair fits the {context}-token context")
    train_file = atomic_write_jsonl(out / "data" / "judge_train.jsonl", transcripts)
    atomic_write_jsonl(out / "data" / "judge_pairs.jsonl", pairs)
    del base
    judge_dir = out / "judge"
    sft(SFTConfig(base=str(pretrained), train_file=str(train_file), template=template, max_len=context,
                  train=TrainConfig(out_dir=str(judge_dir), max_steps=steps, lr=lr, min_lr=lr / 10,
                                    warmup_steps=max(1, steps // 10), batch_size=batch_size, eval_every=steps,
                                    save_every=steps, log_every=max(1, steps // 10), progress=False)))
    judge, _ = lmforge.load(judge_dir)
    labelled, counts = judge_pairs(pairs, model_decider(judge, chat, ANSWER_TOKENS))
    agreed = sum(p["label"] == p["meta"]["better"] for p in labelled)
    decisive = counts.a + counts.b
    prefs = {name: preference_records(labelled, label_of) for name, label_of in (
        ("judge_prefs", lambda p: p["label"]),
        ("verifier_prefs", lambda p: p["meta"]["better"] if p["label"] != "tie" else "tie"),
        ("verifier_prefs_all", lambda p: p["meta"]["better"]))}
    paths = {name: atomic_write_jsonl(out / f"{name}.jsonl", records) if records else None
             for name, records in prefs.items()}
    return JudgeStudy(judge_dir, len(transcripts), steps, counts, agreed, wilson_interval(agreed, len(labelled)),
                      wilson_interval(agreed, decisive) if decisive else None,
                      atomic_write_jsonl(out / "labelled.jsonl", labelled),
                      by_rejection=_by_rejection(labelled), **paths)
