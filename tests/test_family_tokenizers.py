"""Tokenizers of the Hugging Face families (Llama 3, Qwen2/3): their tokenizer.json and Jinja chat templates give
transformers' ids. The vocabularies are small and synthetic, built with each family's pre-tokenizer, post-processor,
special tokens and template shape (real ones cannot be downloaded here)."""

from __future__ import annotations

import json

import pytest
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from lmforge.data.chat import hf_chat_template
from lmforge.errors import DataError
from lmforge.gguf_export import PRE_TOKENIZER_SPLITS
from lmforge.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = ["Hello there, how are you today?", "The year 2024 had 366 days.", "Don't stop; it's fine!\n\nNew para",
         "  indented   spaces\tand tabs", "café naïve 東京 🙂"] * 30

# A Llama 3.2-style template: a dated system header (transformers passes strftime_now; without it the template
# falls back to a fixed date), then one header per message closed by <|eot_id|>.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- if not date_string is defined %}{%- if strftime_now is defined %}"
    "{%- set date_string = strftime_now(\"%d %b %Y\") %}{%- else %}{%- set date_string = \"26 Jul 2024\" %}"
    "{%- endif %}{%- endif %}\n"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = \"\" %}{%- endif %}\n"
    "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}"
    "{{- \"Today Date: \" + date_string + \"\\n\\n\" }}{{- system_message }}{{- \"<|eot_id|>\" }}\n"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}\n"
)
# A Qwen2.5-style ChatML template with its default system message.
QWEN2_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}\n"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}\n"
)
# A Qwen3-style template: ChatML, the last user query found walking the messages backwards in a namespace, earlier
# assistant turns' <think> blocks dropped, and an empty think block when thinking is switched off.
QWEN3_TEMPLATE = (
    "{%- set ns = namespace(last_query=-1) %}"
    "{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if message.role == 'user' and ns.last_query == -1 %}{%- set ns.last_query = index %}"
    "{%- endif %}{%- endfor %}\n"
    "{%- for message in messages %}{%- set content = message.content %}"
    "{%- if message.role == 'assistant' and '</think>' in content %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{%- if message.role == 'assistant' and loop.index0 > ns.last_query %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}\n"
)
FAMILIES = {
    "llama3": dict(split="llama-bpe", specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                                "<|end_header_id|>", "<|eot_id|>"],
                   bos="<|begin_of_text|>", eos="<|eot_id|>", template=LLAMA3_TEMPLATE, nfc=False),
    "qwen2": dict(split="qwen2", specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos=None,
                  eos="<|im_end|>", template=QWEN2_TEMPLATE, nfc=True),
    "qwen3": dict(split="qwen2", specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
                  bos=None, eos="<|im_end|>", template=QWEN3_TEMPLATE, nfc=True),
}
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What year is 2024?"},
                {"role": "assistant", "content": "<think>\n366 days</think>\n\nA leap year."},
                {"role": "user", "content": "Don't stop!"}]


def _family_dir(name: str, tmp_path):
    spec = FAMILIES[name]
    backend = HFTokenizer(models.BPE())
    if spec["nfc"]:
        backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRE_TOKENIZER_SPLITS[spec["split"]]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=spec["specials"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(TEXTS, trainer=trainer)
    if spec["bos"]:  # Llama 3 puts BOS before every text
        bos = spec["bos"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, backend.token_to_id(bos))])
    backend.save(str(tmp_path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": spec["template"],
              "bos_token": spec["bos"], "eos_token": spec["eos"], "clean_up_tokenization_spaces": False}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize("name", FAMILIES)
def test_family_tokenizer_and_chat_template_give_transformers_ids(name, tmp_path):
    path = _family_dir(name, tmp_path)
    ours = Tokenizer.from_file(path)
    theirs = transformers.AutoTokenizer.from_pretrained(path)
    for text in [*TEXTS[:5], "1234567 numbers", "ｆｕｌｌｗｉｄｔｈ é"]:
        assert ours.encode(text) == theirs(text, add_special_tokens=False).input_ids
        assert ours.backend.encode(text).ids == theirs(text).input_ids  # with the post-processor's BOS
    template = hf_chat_template(path, ours)
    for generation_prompt in (False, True):
        expected = theirs.apply_chat_template(CONVERSATION, add_generation_prompt=generation_prompt, tokenize=True,
                                              return_dict=False)
        assert template.render(CONVERSATION, generation_prompt).ids == list(expected)
    assert ours.token_id(FAMILIES[name]["eos"]) in template.stop_ids
    if name == "qwen3":  # it drops an earlier turn's reasoning, so the turn renders differently once a user follows:
        with pytest.raises(DataError, match="message 2 differently"):  # training on it is refused, inference is not
            template.render(CONVERSATION).assistant_mask  # noqa: B018


def test_gpt_neox_tokenizer_gives_transformers_ids(tmp_path):
    """Pythia's tokenizer.json: NFC, GPT-2's byte-level split and a ByteLevel post-processor (offsets only)."""
    backend = HFTokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True)
    backend.post_processor = processors.ByteLevel(trim_offsets=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(TEXTS, trainer=trainer)
    backend.save(str(tmp_path / "tokenizer.json"))
    ours = Tokenizer.from_file(tmp_path)
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    for text in [*TEXTS[:5], "e\u0301 composed"]:
        assert ours.encode(text) == theirs(text, add_special_tokens=False).input_ids
    assert ours.eos_id == ours.bos_id == backend.token_to_id("<|endoftext|>")
