"""The report's sentences that interpret numbers, each picked from the figures it interprets: a sentence states
what the run measured, never what a run on some machine once did."""

from __future__ import annotations

from lmforge.eval.stats import PairedTest

NOISE = 0.05  # a speed ratio within 5% of 1 counts as the same speed (one timed run each)


def faster(ratio: float) -> bool:
    return ratio > 1 + NOISE


def quantisation_note(fp32_tok_s: float, quantised_tok_s: dict[str, float]) -> str:
    """Whether fewer weight bytes made batch-1 decoding faster, from the measured decode speeds."""
    ratios = {name: tok_s / fp32_tok_s for name, tok_s in quantised_tok_s.items()}
    figures = ", ".join(f"{name} {ratio:.2f}x" for name, ratio in ratios.items())
    won = [name for name, ratio in ratios.items() if faster(ratio)]
    if not won:
        return (f"No quantised model decoded more than {NOISE:.0%} faster than fp32 ({figures}): at this size the "
                "weights sit in cache, so fewer bytes do not make decoding faster (`benchmarks/decode_speed.py "
                "--size gpt2-small` shows where they do).")
    if len(won) == len(ratios):
        return f"Every quantised model decoded faster than fp32 ({figures}): reading fewer weight bytes paid here."
    return (f"{' and '.join(won)} decoded faster than fp32, the others did not ({figures}): fewer bytes paid only "
            "where the kernel's extra work cost less than the reads it saved.")


def speculative_note(speedup: float, draft_cost: float, verify_cost: float) -> str:
    """Whether speculative decoding paid, from its wall-clock speedup and the draft and verify steps' costs in
    units of one target step."""
    costs = (f"a draft step costs {draft_cost:.2f} target steps and the verify step over m + 1 tokens "
             f"{verify_cost:.2f}")
    if faster(speedup):
        return f"Speculative decoding paid here ({speedup:.2f}x the plain speed): {costs}."
    return (f"Speculative decoding did not pay here ({speedup:.2f}x the plain speed): {costs}, and fewer target "
            "forwards only pay when a draft step is much cheaper than a target step. `benchmarks/speculative.py` "
            "measures the same algorithm with an 11M target and a 1-layer distilled draft, where it does pay.")


def early_loss_note(pissa: list[float], lora: list[float]) -> str:
    """How PiSSA's training loss compared with LoRA's over the first fifth of the logged steps (PiSSA starts from
    the principal singular directions, so it is expected, not promised, to fall faster at first)."""
    early = max(1, len(lora) // 5)
    pissa_early, lora_early = sum(pissa[:early]) / early, sum(lora[:early]) / early
    if round(pissa_early, 3) == round(lora_early, 3):
        comparison = "the same as"
    else:
        comparison = "lower than" if pissa_early < lora_early else "higher than"
    return (f"Over the first fifth of training, PiSSA's mean loss was {comparison} LoRA's ({pissa_early:.3f} vs "
            f"{lora_early:.3f}); final {pissa[-1]:.3f} vs {lora[-1]:.3f}.")


def pretraining_note(what: str, metric: str, scratch: float, pretrained: float) -> str:
    """Whether masked-LM pretraining raised a fine-tuned score over the same model trained from scratch."""
    verb = "raised" if pretrained > scratch else "did not raise"
    return (f"On {what}, masked-LM pretraining {verb} held-out {metric} ({scratch:.1%} from scratch, "
            f"{pretrained:.1%} pretrained).")


def serving_note(ratios: dict[str, dict[str, float]], target: float = 2.0) -> str:
    """Whether lmforge serve met its throughput target (2x the best transformers serve) at each measured concurrency
    level above one client, and what serving several clients at once gained over sequential generation."""
    levels = [n for n in ratios if int(n) > 1]
    gains = ", ".join(f"{ratios[n]['vs_sequential']:.2f}x at {n} clients" for n in levels)
    sentence = f"Serving clients together gave lmforge serve {gains} the throughput of one-at-a-time generation."
    versus = [n for n in levels if "vs_best_transformers" in ratios[n]]
    if not versus:
        return sentence
    figures = ", ".join(f"{ratios[n]['vs_best_transformers']:.2f}x at {n} clients" for n in versus)
    met = [n for n in versus if ratios[n]["vs_best_transformers"] >= target]
    if len(met) == len(versus):
        verdict = f"It met the {target:g}x target over the best transformers serve configuration ({figures})."
    elif met:
        verdict = f"It met the {target:g}x target over the best transformers serve only in part ({figures})."
    else:
        verdict = f"It missed the {target:g}x target over the best transformers serve ({figures})."
    return f"{sentence} {verdict}"


ALPHA = 0.05  # a paired difference counts as a finding only when significant at this level


def paired_accuracy_note(model: str, baseline: str, test: PairedTest, n: int) -> str:
    """Whether `model` was more or less accurate than `baseline` on the same `n` items, from McNemar's exact test:
    "within noise" unless p < ALPHA."""
    figures = (f"{test.difference:+.1%} on {n} items, p = {test.p_value:.3g}; only {baseline} right on "
               f"{test.detail['only_a']}, only {model} on {test.detail['only_b']}")
    if not test.significant(ALPHA):
        return f"{model} against {baseline}: within noise ({figures})."
    direction = "more" if test.difference > 0 else "less"
    return f"{model} was {direction} accurate than {baseline} ({figures}; McNemar's exact test, alpha {ALPHA:g})."


def logp_change_note(model: str, chosen_change: float, rejected_change: float) -> str:
    """How `model` moved the held-out chosen and rejected replies' log-probs from the reference's (nats per reply)."""
    def moved(change: float) -> str:
        return "raised" if change > 0 else "lowered"

    return (f"{model} {moved(chosen_change)} the held-out chosen replies' log-prob by {abs(chosen_change):.2f} nats "
            f"and {moved(rejected_change)} the rejected ones' by {abs(rejected_change):.2f}.")


def paired_loss_note(setting: str, test: PairedTest, n: int) -> str:
    """Whether the teacher changed a student's validation loss, from a paired bootstrap of the per-window losses
    (with minus without the teacher): "within noise" unless p < ALPHA."""
    low, high = test.detail["ci95"]
    figures = (f"{test.difference:+.4f} nats per token on {n} windows, 95% interval [{low:+.4f}, {high:+.4f}], "
               f"p = {test.p_value:.3g}")
    if not test.significant(ALPHA):
        return f"{setting}, the teacher's effect on the validation loss is within noise ({figures})."
    verdict = "helped: it lowered" if test.difference < 0 else "hurt: it raised"
    return (f"{setting}, the teacher {verdict} the student's validation loss ({figures}; paired bootstrap, "
            f"alpha {ALPHA:g}).")
