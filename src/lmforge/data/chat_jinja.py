"""lmforge's chat templates as Hugging Face Jinja ``chat_template`` source, for exported tokenizers.

transformers renders a conversation with the Jinja source and tokenizes the text as one string;
`jinja_chat_template` writes, for each built-in template, source whose ids are lmforge's own (checked on
probe conversations: a tokenizer whose pieces tokenize differently once joined is refused). The special
tokens are written into the source as literals, so it does not depend on which tokens transformers
passes as ``bos_token``/``eos_token``. What the assistant writes is wrapped in ``{% generation %}``, so
``return_assistant_tokens_mask`` gives lmforge's assistant mask. An ``hf`` template is its own source.
"""

from __future__ import annotations

from lmforge.data.chat import (
    ALPACA_PREAMBLE,
    AlpacaTemplate,
    ChatTemplate,
    HFChatTemplate,
    Llama2Template,
    LmforgeTemplate,
    Message,
    token_text,
)
from lmforge.errors import ConfigError, DataError
from lmforge.tokenizer import ASSISTANT, END_OF_TURN, SYSTEM, USER


def _lit(text: str) -> str:
    """`text` as a Jinja string literal (Jinja decodes backslash escapes in literals)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def _raise(message: str) -> str:
    return "{{- raise_exception(" + _lit(message) + ") -}}"


def _split_system(name: str, multi_turn: bool) -> str:
    """Jinja setting `system` (content or none) and `turns`, checking their shape as lmforge's `_turns` does."""
    shape = "user and assistant turns alternating" if multi_turn else "one user turn and one reply"
    refuse = _raise(f"the {name} template needs an optional first system message, then {shape}")
    longest = "" if multi_turn else " or turns | length > 2"
    return (
        "{%- if messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
        "{%- else -%}{%- set system = none -%}{%- set turns = messages -%}{%- endif -%}\n"
        "{%- if turns | length == 0 -%}" + _raise(f"the {name} template needs a user message after the system "
                                                  "message") + "{%- endif -%}\n"
        "{%- for message in turns -%}{%- if message['role'] != ['user', 'assistant'][loop.index0 % 2]" + longest
        + " -%}" + refuse + "{%- endif -%}{%- endfor -%}\n"
    )


def _lmforge(template: LmforgeTemplate) -> str:
    tok = template.tokenizer
    role = {r: _lit(t) for r, t in (("system", SYSTEM), ("user", USER), ("assistant", ASSISTANT))}
    end = _lit(END_OF_TURN)
    return (
        "{{- " + _lit(token_text(tok, tok.bos_id)) + " -}}\n"
        "{%- for message in messages -%}\n"
        "{%- if message['role'] == 'assistant' -%}{{- " + role["assistant"] + " -}}"
        "{% generation %}{{- message['content'] + " + end + " -}}{% endgeneration %}\n"
        "{%- elif message['role'] in ['system', 'user'] -%}"
        "{{- {'system': " + role["system"] + ", 'user': " + role["user"] + "}[message['role']] + message['content'] + "
        + end + " -}}\n"
        "{%- else -%}" + _raise("the lmforge template knows the roles system, user and assistant") + "{%- endif -%}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}{{- " + role["assistant"] + " -}}{%- endif -%}"
    )


def _llama2(template: Llama2Template) -> str:
    tok = template.tokenizer
    bos, eos = _lit(token_text(tok, tok.bos_id)), _lit(token_text(tok, tok.eos_id))
    return _split_system("llama2", multi_turn=True) + (
        "{%- for message in turns -%}\n"
        "{%- if message['role'] == 'user' -%}{%- set content = message['content'] -%}"
        "{%- if loop.first and system is not none -%}"
        "{%- set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + content -%}{%- endif -%}"
        "{{- " + bos + " + '[INST] ' + (content | trim) + ' [/INST]' -}}\n"
        "{%- else -%}{% generation %}{{- ' ' + (message['content'] | trim) + ' ' + " + eos + " -}}"
        "{% endgeneration %}{%- endif -%}\n"
        "{%- endfor -%}"
    )


def _alpaca(template: AlpacaTemplate) -> str:
    tok = template.tokenizer
    bos, eos = _lit(token_text(tok, tok.bos_id)), _lit(token_text(tok, tok.eos_id))
    return _split_system("alpaca", multi_turn=False) + (
        "{{- " + bos + " + (system if system is not none else " + _lit(ALPACA_PREAMBLE) + ") + "
        "'\\n\\n### Instruction:\\n' + turns[0]['content'] + '\\n\\n### Response:\\n' -}}\n"
        "{%- if turns | length == 2 -%}{% generation %}{{- turns[1]['content'] + " + eos + " -}}"
        "{% endgeneration %}{%- endif -%}"
    )


_SOURCES = {LmforgeTemplate: _lmforge, Llama2Template: _llama2, AlpacaTemplate: _alpaca}
_PROBES: list[list[Message]] = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"},
     {"role": "assistant", "content": "4."}, {"role": "user", "content": " And 3 + 3?\n"},
     {"role": "assistant", "content": "6, of course!"}],
    [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": " Hi! How can I help?"}],
    [{"role": "system", "content": "You are terse.\n"}, {"role": "user", "content": "Say 'yes'."}],
    [{"role": "user", "content": "x"}],
]


def jinja_chat_template(template: ChatTemplate) -> str:
    """Jinja source that transformers renders into `template`'s ids (ConfigError if this tokenizer cannot)."""
    if isinstance(template, HFChatTemplate):
        return template.source
    source = _SOURCES[type(template)](template)
    tokenizer = template.tokenizer
    as_jinja = HFChatTemplate(source, tokenizer, name=template.name)
    for messages in _PROBES:
        for generation_prompt in (False, True):
            try:
                ours = template.render(messages, generation_prompt)
            except DataError:  # a shape this template does not take (alpaca is single-turn)
                continue
            if as_jinja.render(messages, generation_prompt).ids != ours.ids:
                raise ConfigError(f"the {template.name} chat template cannot be exported as Jinja for this tokenizer: "
                                  "its pieces tokenize differently once joined into one string")
    return source
