"""The prompting library: slot templates, demonstrations (selection, order, the context budget), prompt repetition,
plain and chat rendering, and each method's prompts and answers on a scripted completer (which records what it was
asked), so every expected prompt is exact text."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from lmforge.data.chat import get_chat_template
from lmforge.data.synthetic import EvalExample
from lmforge.errors import ConfigError, DataError
from lmforge.infer.generate import SamplingConfig, StopStreamer, generate_ids
from lmforge.prompting.answers import majority_vote
from lmforge.prompting.autocot import auto_cot_demos, reasoning_steps
from lmforge.prompting.budget import fit_shots
from lmforge.prompting.completion import EngineCompleter
from lmforge.prompting.examples import Example, ShotRanker, arrange
from lmforge.prompting.methods import PromptingConfig
from lmforge.prompting.prompt import Prompt, PromptRenderer, RenderedPrompt, Shot, repeat_question
from lmforge.prompting.run import Question, run_prompting, synthetic_questions
from lmforge.prompting.template import CLOZE, QA, SlotTemplate
from lmforge.tokenizer import train_tokenizer
from tiny_decoders import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "Question: Tom has 3 pens. He buys 4 more. How many pens does Tom have now?\nAnswer: The answer is 7."


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([TEXT] * 40, vocab_size=420, show_progress=False)


class Scripted:
    """A completer that answers from `reply(prompt_text, seed)` and records every call."""

    def __init__(self, reply):
        self.reply, self.calls = reply, []

    def __call__(self, prompts: Sequence[RenderedPrompt], *, max_new_tokens: int, temperature: float = 0.0,
                 seeds=None, stops=None, keep_last: bool = False) -> list[str]:
        seeds = [None] * len(prompts) if seeds is None else list(seeds)
        self.calls.append({"prompts": [p.text for p in prompts], "temperature": temperature, "seeds": seeds,
                           "max_new_tokens": max_new_tokens, "stops": stops})
        return [self.reply(p.text, s) for p, s in zip(prompts, seeds, strict=True)]


def _questions(*rows: tuple[str, str, str]) -> list[Question]:
    return [Question("t", Example(q, a, r, f"tasks.jsonl:{i + 1}")) for i, (q, a, r) in enumerate(rows)]


QUESTIONS = _questions(("One plus one?", "2", "1 + 1 = 2."), ("Two plus two?", "4", "2 + 2 = 4."),
                       ("Three plus three?", "6", "3 + 3 = 6."))


def test_a_slot_template_fills_both_slots_for_a_demonstration_and_stops_at_the_answer_slot_for_a_query() -> None:
    assert CLOZE.fill("I love this movie.", "great") == "I love this movie. Overall, it was great"
    assert CLOZE.query("I love this movie.") == "I love this movie. Overall, it was"
    assert QA.fill("2+2?", "4") == "Question: 2+2?\nAnswer: 4" and QA.query("2+2?") == "Question: 2+2?\nAnswer:"
    for bad in ("no slots", "[z] before [x]", "[x] [x] [z]"):
        with pytest.raises(ConfigError, match=r"\[x\] once"):
            SlotTemplate(bad)


def test_a_plain_few_shot_prompt_is_the_filled_demonstrations_then_the_query(tok) -> None:
    renderer = PromptRenderer(tok, CLOZE)
    prompt = Prompt((Shot("Great film.", "good"), Shot("Dull plot.", "bad")), "Loved it.")
    rendered = renderer.render(prompt)
    assert rendered.text == ("Great film. Overall, it was good\n\nDull plot. Overall, it was bad\n\n"
                             "Loved it. Overall, it was")
    assert rendered.ids == tok.encode(rendered.text)
    assert renderer.stop_strings == ("\n\n",)  # the cloze has no opening text; QA's "Question:" adds one
    assert PromptRenderer(tok).stop_strings == ("\n\n", "\nQuestion:")


def test_a_chat_prompt_puts_demonstrations_in_earlier_turns_and_the_lead_after_the_generation_prompt(tok) -> None:
    chat = get_chat_template("lmforge", tok)
    rendered = PromptRenderer(tok, chat=chat).render(Prompt((Shot("2+2?", "The answer is 4."),), "3+3?", "Let's"))
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "The answer is 4."},
                {"role": "user", "content": "3+3?"}]
    assert rendered.ids == chat.render(messages, add_generation_prompt=True).ids + tok.encode("Let's")
    assert rendered.text == tok.decode(rendered.ids)
    alpaca = get_chat_template("alpaca", tok)  # one user turn per conversation: the plain-text prompt goes in it
    single = PromptRenderer(tok, chat=alpaca).render(Prompt((Shot("2+2?", "The answer is 4."),), "3+3?"))
    user = "Question: 2+2?\nAnswer: The answer is 4.\n\nQuestion: 3+3?\nAnswer:"
    assert single.ids == alpaca.render([{"role": "user", "content": user}], add_generation_prompt=True).ids


def test_prompt_repetition_writes_the_question_twice(tok) -> None:
    assert repeat_question("How many?") == "How many?\nHow many?"
    scripted = Scripted(lambda text, seed: "The answer is 4.")
    run_prompting(QUESTIONS[:1], scripted, PromptRenderer(tok), 256, PromptingConfig(repeat=True))
    assert scripted.calls[0]["prompts"] == ["Question: One plus one?\nOne plus one?\nAnswer:"]


def test_fixed_selection_keeps_the_pool_order_and_never_shows_a_question_its_own_answer() -> None:
    pool = [q.example for q in QUESTIONS]
    ranked = ShotRanker(pool, "fixed").rank(["Two plus two?", "New?"])
    assert [e.question for e in ranked[0]] == ["One plus one?", "Three plus three?"]
    assert ranked[1] == pool


def test_random_selection_is_a_seeded_draw_per_question() -> None:
    pool = [Example(f"q{i}", str(i)) for i in range(12)]
    draw = [[e.question for e in r] for r in ShotRanker(pool, "random", seed=3).rank(["a", "b"])]
    assert draw == [[e.question for e in r] for r in ShotRanker(pool, "random", seed=3).rank(["a", "b"])]
    assert draw != [[e.question for e in r] for r in ShotRanker(pool, "random", seed=4).rank(["a", "b"])]
    assert draw[0] != draw[1] and sorted(draw[0]) == sorted(e.question for e in pool)


def test_nearest_selection_ranks_by_cosine_similarity_of_the_embeddings() -> None:
    vectors = {"apples": [1.0, 0.0], "pears": [0.9, 0.1], "trains": [0.0, 1.0], "buses": [0.2, 1.0],
               "fruit?": [1.0, 0.05], "cars?": [0.0, 1.0]}

    def embed(texts: list[str]) -> torch.Tensor:
        return torch.tensor([vectors[t] for t in texts])

    pool = [Example(q, "x") for q in ("apples", "trains", "pears", "buses")]
    ranked = ShotRanker(pool, "nearest", embed=embed).rank(["fruit?", "cars?"])
    assert [e.question for e in ranked[0]] == ["apples", "pears", "buses", "trains"]
    assert [e.question for e in ranked[1]] == ["trains", "buses", "pears", "apples"]


def test_order_control() -> None:
    assert arrange([1, 2, 3], "selected") == [1, 2, 3] and arrange([1, 2, 3], "reversed") == [3, 2, 1]
    shuffled = arrange(list(range(10)), "shuffled", seed=1)
    assert sorted(shuffled) == list(range(10)) and shuffled != list(range(10))
    assert shuffled == arrange(list(range(10)), "shuffled", seed=1)


def test_many_shot_fills_the_budget_with_as_many_demonstrations_as_fit(tok) -> None:
    renderer = PromptRenderer(tok)
    shots = [Shot(f"What is {i} plus {i}?", f"The answer is {2 * i}.") for i in range(40)]
    for budget in (30, 75, 160, 10_000):
        fit = fit_shots(renderer, shots, "What is 5 plus 1?", budget)
        kept = len(fit.prompt.shots)
        assert len(fit.rendered.ids) <= budget and fit.dropped == 40 - kept
        assert fit.prompt.shots == tuple(shots[:kept])  # the best-ranked ones
        if kept < 40:  # one more does not fit
            more = renderer.render(Prompt(tuple(shots[:kept + 1]), "What is 5 plus 1?"))
            assert len(more.ids) > budget
    assert len(fit_shots(renderer, shots, "What is 5 plus 1?", 10_000).prompt.shots) == 40


def test_demonstrations_that_overflow_the_context_are_dropped_and_counted(tok) -> None:
    questions = _questions(*[(f"What is {i} plus {i}?", str(2 * i), "") for i in range(12)])
    scripted = Scripted(lambda text, seed: "The answer is 0.")
    run = run_prompting(questions, scripted, PromptRenderer(tok), 100, PromptingConfig(shots=8, max_new_tokens=20))
    summary = run.summary()
    assert summary["questions_with_dropped_shots"] == 12 and summary["dropped_shots"] > 0
    for result in run.results:
        assert result.shots + result.dropped == 8 and len(tok.encode(result.calls[0]["prompt"])) <= 80


def test_a_question_that_cannot_fit_even_alone_is_refused_in_one_line_naming_it(tok) -> None:
    questions = _questions(("word " * 200, "1", ""))
    with pytest.raises(DataError) as err:
        run_prompting(questions, Scripted(lambda t, s: ""), PromptRenderer(tok), 128, PromptingConfig())
    assert "tasks.jsonl:1" in str(err.value) and "\n" not in str(err.value)


def test_few_shot_cot_shows_worked_demonstrations_and_extracts_the_answer(tok) -> None:
    scripted = Scripted(lambda text, seed: "2 + 2 = 4. The answer is 4.")
    run = run_prompting(QUESTIONS[1:2], scripted, PromptRenderer(tok), 256, PromptingConfig("cot", shots=2),
                        pools={"t": [QUESTIONS[0].example, QUESTIONS[2].example]})
    assert scripted.calls[0]["prompts"] == [
        "Question: One plus one?\nAnswer: 1 + 1 = 2. The answer is 2.\n\n"
        "Question: Three plus three?\nAnswer: 3 + 3 = 6. The answer is 6.\n\n"
        "Question: Two plus two?\nAnswer:"]
    assert run.results[0].prediction == "4" and run.results[0].correct
    with pytest.raises(DataError, match="tasks.jsonl:1.*rationale"):
        run_prompting(QUESTIONS[1:2], scripted, PromptRenderer(tok), 256, PromptingConfig("cot", shots=1),
                      pools={"t": [Example("One plus one?", "2", "", "tasks.jsonl:1")]})


def test_zero_shot_cot_asks_step_by_step_then_extracts_the_answer_from_a_second_prompt(tok) -> None:
    def reply(text: str, seed) -> str:
        return "7." if text.endswith("Therefore, the answer is") else "Tom has 3 and buys 4, so 3 + 4 = 7."

    scripted = Scripted(reply)
    questions = [Question("t", Example("Tom has 3 pens. He buys 4. How many?", "7", "", "tasks.jsonl:1"),
                          stop=("Q:",))]
    run = run_prompting(questions, scripted, PromptRenderer(tok), 256, PromptingConfig("zero-shot-cot"))
    first, second = scripted.calls
    assert first["stops"] == second["stops"] == [("Q:",)]  # the task line's stop strings end both replies
    assert first["prompts"] == ["Question: Tom has 3 pens. He buys 4. How many?\nAnswer: Let's think step by step."]
    assert second["prompts"] == ["Question: Tom has 3 pens. He buys 4. How many?\nAnswer: Let's think step by step. "
                                 "Tom has 3 and buys 4, so 3 + 4 = 7. Therefore, the answer is"]
    assert run.results[0].prediction == "7" and run.results[0].correct
    assert [c["stage"] for c in run.transcript()[0]["calls"]] == ["reasoning", "answer extraction"]


def test_the_majority_vote_counts_answers_alike_after_normalisation_and_keeps_the_shares() -> None:
    vote = majority_vote(["17", "12", "17.", None, "12", "17"])
    assert vote.answer == "17" and vote.shares == {"17": 0.5, "12": pytest.approx(1 / 3)}
    assert majority_vote(["a", "b"]).answer == "a"  # a tie goes to the first sampled
    assert majority_vote([None, None]).answer is None


def test_self_consistency_samples_k_times_at_a_temperature_and_votes(tok) -> None:
    answers = {0: "5", 1: "6", 2: "6", 3: "no idea", 4: "6", 5: "8", 6: "8", 7: "8", 8: "6", 9: "1"}

    def reply(text: str, seed: int) -> str:
        return f"Steps. The answer is {answers[seed]}." if answers[seed] != "no idea" else "I cannot tell."

    scripted = Scripted(reply)
    run = run_prompting(QUESTIONS[1:3], scripted, PromptRenderer(tok), 256,
                        PromptingConfig("self-consistency", shots=1, k=5, temperature=0.8, seed=0))
    (call,) = scripted.calls  # one batched call: every question's every sample
    assert call["temperature"] == 0.8 and call["seeds"] == list(range(10)) and len(call["prompts"]) == 10
    first, second = run.results
    assert first.prediction == "6" and first.votes == {"5": 0.2, "6": 0.6} and first.correct is False
    assert second.prediction == "8" and second.votes == {"8": 0.6, "6": 0.2, "1": 0.2}
    assert run.transcript()[0]["votes"] == {"5": 0.2, "6": 0.6}
    with pytest.raises(ConfigError, match="temperature > 0"):
        PromptingConfig("self-consistency", temperature=0.0)


def test_auto_cot_takes_per_cluster_the_question_nearest_the_centre_that_passes_the_rules() -> None:
    long_question = "apples " * 70
    vectors = {"apples one": [1.0, 0.0], "apples two": [0.8, 0.2], long_question: [0.95, 0.0],
               "trains one": [0.1, 0.95], "trains two": [0.3, 0.8], "trains three": [0.0, 1.0]}
    rationales = {"apples one": "A. B. C. D. E. F. The answer is 1.",  # 6 steps: turned down
                  "apples two": "A. B. The answer is 2.", "trains one": "No answer here.",
                  "trains two": "T. The answer is 5.", "trains three": "U. The answer is 3. The answer is 4. More."}
    asked: list[list[str]] = []

    def write(questions: list[str]) -> list[str]:
        asked.append(questions)
        return [rationales[q] for q in questions]

    result = auto_cot_demos(list(vectors), 2, write, lambda text: len(text.split()),
                            lambda texts: torch.tensor([vectors[t] for t in texts]))
    assert sorted((d.question, d.rationale) for d in result.demos) == [
        ("apples two", "A. B. The answer is 2."), ("trains three", "U. The answer is 3.")]  # cut after its answer
    reasons = {r["question"]: r["reason"] for r in result.rejected}
    assert reasons == {long_question: "70 tokens, more than 60", "apples one": "6 reasoning steps, more than 5",
                       "trains one": "the rationale gives no answer"}
    assert [sorted(batch) for batch in asked] == [["apples one", "trains one"], ["apples two", "trains three"]]
    assert reasoning_steps("Tom has 3. He buys 4, so 3 + 4 = 7. The answer is 7.") == 2


def test_auto_cot_prompts_with_the_model_written_demonstrations(tok) -> None:
    def reply(text: str, seed) -> str:
        return "It is double. The answer is 9."

    scripted = Scripted(reply)
    vectors = {"One plus one?": [1.0, 0.0], "Two plus two?": [0.9, 0.1], "Three plus three?": [0.0, 1.0]}
    run = run_prompting(QUESTIONS, scripted, PromptRenderer(tok), 512, PromptingConfig("auto-cot", shots=2),
                        embed=lambda texts: torch.tensor([vectors[t] for t in texts]))
    demos = run.auto_cot["t"].demos
    assert len(demos) == 2 and len(scripted.calls) == 2  # one round of rationales, then the answers
    final = scripted.calls[-1]["prompts"][0]
    demo_blocks = [f"Question: {d.question}\nAnswer: Let's think step by step. It is double. The answer is 9."
                   for d in demos]
    assert final == "\n\n".join([*demo_blocks, "Question: One plus one?\nAnswer: Let's think step by step."])
    last = run.transcript()[-1]
    assert last["stage"] == "demonstrations" and [c["prompt"] for c in last["calls"]] == scripted.calls[0]["prompts"]
    assert run.summary()["auto_cot"] == {"t": {"clusters": 2, "demonstrations": 2, "rejected": 0}}


def test_the_engine_completer_gives_each_prompt_what_generation_alone_gives(tok) -> None:
    model = tiny_model(vocab_size=tok.vocab_size, max_seq_len=128)
    renderer = PromptRenderer(tok)
    prompts = [renderer.render(Prompt((), q)) for q in ("Tom has 3 pens.", "How many pens does Tom have now?")]
    batched = EngineCompleter(model, renderer)(prompts, max_new_tokens=12)
    alone = []
    for p in prompts:  # the reply's text leaves special tokens out, as a chat reply does
        streamer = StopStreamer(tok, renderer.stop_strings, None, skip_special_tokens=True)
        generate_ids(model, p.ids, SamplingConfig(max_new_tokens=12), renderer.stop_ids, on_token=streamer)
        alone.append(streamer.finish().strip())
    assert batched == alone
    cut = next(alone[0][i:i + 2] for i in range(len(alone[0]) // 2, len(alone[0]) - 1)
               if not alone[0][i:i + 2].isspace())  # a task line's own stop string, found late in the reply
    stopped = EngineCompleter(model, renderer)(prompts, max_new_tokens=12, stops=[(cut,), ()])
    assert stopped == [alone[0][:alone[0].index(cut)].strip(), alone[1]]


def test_the_synthetic_worlds_held_out_examples_become_questions(tok) -> None:
    examples = [EvalExample("arithmetic", "Question: Tom has 3 pens. He buys 4. How many?\nAnswer:", "7",
                            "Tom starts with 3 pens. He buys 4, so 3 + 4 = 7.")]
    (question,) = synthetic_questions(examples)
    worked = "Tom starts with 3 pens. He buys 4, so 3 + 4 = 7."
    assert question == Question("arithmetic", Example("Tom has 3 pens. He buys 4. How many?", "7", worked,
                                                      "arithmetic:1"))
    assert PromptRenderer(tok).render(Prompt((), question.example.question)).text == examples[0].prompt
