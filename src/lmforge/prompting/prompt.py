"""A prompt as demonstrations plus a question, rendered for a base model (plain text through a slot template) or a
chat model (demonstrations as earlier user/assistant turns, through its chat template)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.data.chat import ChatTemplate
from lmforge.prompting.template import QA, SlotTemplate
from lmforge.tokenizer import Tokenizer

SHOT_SEPARATOR = "\n\n"  # between the blocks of a plain-text prompt


@dataclass(frozen=True)
class Shot:
    question: str
    reply: str  # what fills the answer slot: "The answer is 4." or a worked rationale ending so


@dataclass(frozen=True)
class Prompt:
    shots: tuple[Shot, ...]
    question: str
    lead: str = ""  # the reply's start, written for the model (zero-shot CoT's "Let's think step by step.")


@dataclass(frozen=True)
class RenderedPrompt:
    text: str  # what the model reads (a chat prompt with its special tokens written out)
    ids: list[int] = field(repr=False)


def repeat_question(question: str, times: int = 2) -> str:
    """Prompt repetition (Leviathan et al. 2025; seed 000): the query <QUERY> becomes <QUERY><QUERY>, so that every
    token of the question can attend to all of it. The copies are joined by a newline."""
    return "\n".join([question] * times)


class PromptRenderer:
    """Turns prompts into token ids. Without a chat template each demonstration fills `template` ([x] the
    question, [z] the reply) and the question fills it up to [z], blocks joined by a blank line; with one, each
    demonstration is a user turn (the question) and an assistant turn (the reply), and the question the last user
    turn: the chat template does the slot template's work (a single-turn template, such as Alpaca's, gets the
    plain-text prompt as its one user turn). A lead follows the generation prompt."""

    def __init__(self, tokenizer: Tokenizer, template: SlotTemplate = QA, chat: ChatTemplate | None = None):
        self.tokenizer, self.template, self.chat = tokenizer, template, chat

    def render(self, prompt: Prompt) -> RenderedPrompt:
        if self.chat is None:
            text = self._plain(prompt)
            return RenderedPrompt(text, self.tokenizer.encode(text))
        if self.chat.multi_turn:
            messages = [m for s in prompt.shots for m in ({"role": "user", "content": s.question},
                                                          {"role": "assistant", "content": s.reply})]
            messages.append({"role": "user", "content": prompt.question})
        else:  # one user turn per conversation (Alpaca): it holds the plain-text prompt
            messages = [{"role": "user", "content": self._plain(Prompt(prompt.shots, prompt.question))}]
        ids = self.chat.render(messages, add_generation_prompt=True).ids
        if prompt.lead:
            ids = ids + self.tokenizer.encode(prompt.lead)
        return RenderedPrompt(self.tokenizer.decode(ids), ids)

    def _plain(self, prompt: Prompt) -> str:
        blocks = [self.template.fill(s.question, s.reply) for s in prompt.shots]
        query = self.template.query(prompt.question)
        return SHOT_SEPARATOR.join([*blocks, f"{query} {prompt.lead}" if prompt.lead else query])

    @property
    def stop_ids(self) -> list[int]:
        """The ids that end a reply: the chat template's end of turn, or EOS."""
        if self.chat is not None:
            return list(self.chat.stop_ids)
        return [] if self.tokenizer.eos_id is None else [self.tokenizer.eos_id]

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """Text that ends a plain-text reply: the blank line between blocks, or the start of a new block."""
        if self.chat is not None:
            return ()
        opening = self.template.opening
        return (SHOT_SEPARATOR, f"\n{opening}") if opening else (SHOT_SEPARATOR,)
