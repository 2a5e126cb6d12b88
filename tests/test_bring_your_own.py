"""The README's "Bring your own checkpoint" commands on a small Qwen2 that transformers saves in-process: LoRA SFT with
the checkpoint's own chat template, export to a merged Hugging Face dir, a peft adapter and GGUF, and the adapter
served over its base. Each product is checked against lmforge's own logits or tokens."""

from __future__ import annotations

import json

import pytest
import torch

import lmforge
from lmforge.cli import main
from serving import request, serving
from test_family_tokenizers import _family_dir

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
gguf = pytest.importorskip("gguf")

PROMPT_IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """(the Hugging Face base dir, the LoRA SFT run on it)."""
    root = tmp_path_factory.mktemp("byo")
    (root / "qwen").mkdir()
    base = _family_dir("qwen2", root / "qwen")
    vocab = json.loads((base / "tokenizer.json").read_text())["model"]["vocab"]
    config = transformers.Qwen2Config(vocab_size=len(vocab) + 8, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(base)
    chats = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                           {"role": "assistant", "content": f"It is {2 * i}."}]} for i in range(24)]
    (root / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    run = root / "qwen-lora"
    assert main(["sft", "--base", str(base), "--train-file", str(root / "chats.jsonl"), "--template", "hf",
                 "--max-len", "128", "--peft", "lora", "--peft.r=8", "--train.lr=0.05", "--train.max_steps=3",
                 "--train.batch_size=4", "--train.warmup_steps=0", f"--train.out_dir={run}"]) == 0
    return base, run


def _lmforge_logits(run) -> torch.Tensor:
    model, _ = lmforge.load(run)
    with torch.no_grad():
        return model(PROMPT_IDS)


def test_merged_and_peft_exports_give_lmforges_logits(tuned, tmp_path):
    base, run = tuned
    ours = _lmforge_logits(run)
    with torch.no_grad():
        untouched = transformers.AutoModelForCausalLM.from_pretrained(base).eval()(PROMPT_IDS).logits
    assert (ours - untouched).abs().max() > 1e-3, "the fine-tune did not move the model: the checks below prove nothing"
    assert main(["export", str(run), "--out", str(tmp_path / "merged")]) == 0
    assert main(["export", str(run), "--format", "peft", "--base-name", "Qwen/Qwen2.5-0.5B",
                 "--out", str(tmp_path / "adapter")]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    on_base = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base),
                                             tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(PROMPT_IDS).logits, ours, rtol=0, atol=1e-4)
        torch.testing.assert_close(on_base(PROMPT_IDS).logits, ours, rtol=0, atol=1e-4)


def test_gguf_export_carries_the_checkpoints_template(tuned, tmp_path):
    base, run = tuned
    assert main(["export", str(run), "--format", "gguf", "--type", "q8_0", "--out", str(tmp_path / "t.gguf")]) == 0
    reader = gguf.GGUFReader(tmp_path / "t.gguf")
    field = reader.fields["tokenizer.chat_template"]
    template = bytes(field.parts[field.data[0]]).decode()
    assert template == json.loads((base / "tokenizer_config.json").read_text())["chat_template"]
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == "Q8_0" and kinds["blk.0.attn_q.bias"] == "F32"


def test_the_adapter_is_served_over_its_base_by_name(tuned):
    base, run = tuned
    model, tokenizer = lmforge.load(run)
    messages = [{"role": "user", "content": "What is 3 plus 3?"}]
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    ids = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    expected, margins = [], []
    with torch.no_grad():  # greedy by hand, with each step's top-2 margin
        for _ in range(4):
            top = model(torch.tensor([ids + expected]))[0, -1].topk(2)
            margins.append((top.values[0] - top.values[1]).item())
            expected.append(top.indices[0].item())
    assert min(margins) > 1e-3, f"greedy ties within noise ({margins}): choose another prompt"
    with serving(base, api_key=None, adapters={"tuned": run}) as server:
        status, _, models = request(server.port, "GET", "/v1/models", key=None)
        assert status == 200 and {m["id"] for m in models["data"]} == {"tiny", "tuned"}
        body = {"model": "tuned", "messages": messages, "max_tokens": 4, "temperature": 0}
        status, _, reply = request(server.port, "POST", "/v1/chat/completions", body, key=None)
    assert status == 200, reply
    if hf_tokenizer.eos_token_id in expected:  # a reply that ends at the end-of-turn token stops there
        expected = expected[:expected.index(hf_tokenizer.eos_token_id)]
    assert expected, "the reply ends at once: nothing to compare"
    assert reply["choices"][0]["message"]["content"] == tokenizer.decode(expected)
