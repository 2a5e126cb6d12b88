"""Adapters, prefix/prompt tuning, BitFit, top-k and SVD-diagonal: start point, trainable set, counts, training,
cached generation and merging, on tiny GPT-2 and Llama (GQA) decoders."""

from __future__ import annotations

import copy

import pytest
import torch

import lmforge
from lmforge.checkpoint import save
from lmforge.config import EncoderConfig, ModelConfig, TrainConfig
from lmforge.errors import ConfigError
from lmforge.infer.generate import SamplingConfig, generate_ids
from lmforge.model.decoder import DecoderLM
from lmforge.model.encoder import EncoderModel
from lmforge.peft.config import PeftConfig, apply_peft, merge_peft
from lmforge.peft.lora import LoRALinear
from lmforge.peft.select import SVDDiagLinear
from lmforge.train.objectives import causal_lm_loss
from lmforge.train.trainer import build_optimizer
from near_ties import assert_clear_greedy

pytestmark = pytest.mark.usefixtures("one_thread")

D, V, L = 32, 64, 2
SELECTIVE = [
    PeftConfig(method="adapter", bottleneck=4),
    PeftConfig(method="parallel-adapter", bottleneck=4),
    PeftConfig(method="topk", top_k=1),
    PeftConfig(method="svd-diag", targets=["attn.q", "attn.v", "mlp.down"]),
]
SOFT = [
    PeftConfig(method="prefix", prefix_len=3, reparam=False),
    PeftConfig(method="prefix", prefix_len=3, reparam_hidden=8),
    PeftConfig(method="prompt", prompt_len=4),
]
BITFIT = PeftConfig(method="bitfit")
# (family, method) pairs; Llama has no biases, so BitFit runs on GPT-2 only (its Llama error is tested below)
EVERY = [(f, c) for f in ("gpt2", "llama") for c in SELECTIVE + SOFT + [BITFIT] if f == "gpt2" or c is not BITFIT]


def tiny(family: str = "gpt2", init_std: float = 0.02) -> DecoderLM:
    torch.manual_seed(0)
    kv = 1 if family == "llama" else None  # Llama with grouped-query attention
    return DecoderLM(ModelConfig(family=family, vocab_size=V, max_seq_len=32, n_layer=L, n_head=2, n_kv_head=kv,
                                 d_model=D, init_std=init_std)).eval()


def batch(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(V, (4, 13), generator=g)
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}


def label(case: PeftConfig | str) -> str:
    if isinstance(case, str):
        return case
    return case.method + ("-reparam" if case.method == "prefix" and case.reparam else "")


@pytest.mark.parametrize(("family", "cfg"), [(f, c) for f, c in EVERY if c not in SOFT], ids=label)
def test_starts_exactly_at_the_base_model(family, cfg):
    model = tiny(family)
    ids = batch()["input_ids"]
    with torch.no_grad():
        before = model(ids)
        apply_peft(model, cfg)
        assert torch.equal(model(ids), before)


@pytest.mark.parametrize("method", ["adapter", "parallel-adapter"])
def test_sequential_adapters_read_the_sublayer_output_and_parallel_ones_its_input(method):
    model = tiny()
    cfg = PeftConfig(method=method, bottleneck=4, adapter_scale=3.0)
    apply_peft(model, cfg)
    wrapper = model.blocks[0].mlp
    torch.nn.init.normal_(wrapper.adapter.up.weight)  # a trained adapter: no longer zero
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        h = wrapper.base(x)
        expected = h + 3.0 * wrapper.adapter(x) if method == "parallel-adapter" else h + wrapper.adapter(h)
        assert torch.equal(wrapper(x), expected)
        assert not torch.allclose(wrapper(x), h)


def test_adapters_wrap_encoder_blocks_too():
    torch.manual_seed(0)
    model = EncoderModel(EncoderConfig(vocab_size=V, max_seq_len=16, n_layer=L, n_head=2, d_model=D)).eval()
    ids = torch.randint(V, (2, 9))
    with torch.no_grad():
        before = model(ids)
        summary = apply_peft(model, PeftConfig(method="parallel-adapter", bottleneck=4))
        assert torch.equal(model(ids), before)
    assert summary.trainable == 2 * L * (2 * D * 4 + 4 + D)


def test_soft_prompts_change_outputs_and_keep_the_base_frozen():
    for cfg in SOFT:
        model, base = tiny(), tiny()
        ids = batch()["input_ids"]
        apply_peft(model, cfg)
        with torch.no_grad():
            out = model(ids)
            assert out.shape == base(ids).shape == (4, 12, V)  # prompt tuning drops its P positions
            assert not torch.allclose(out, base(ids), atol=1e-3)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        owner = "soft_prompt." if cfg.method == "prompt" else "prefix_tuning."
        assert trainable and all(n.startswith(owner) for n in trainable)
        base_state = base.state_dict()
        assert all(torch.equal(p, base_state[n]) for n, p in model.state_dict().items() if n in base_state)


LORA_FAMILY = [PeftConfig(method=m, r=4, targets=["attn", "mlp"]) for m in ("lora", "dora", "pissa", "qlora")]


@pytest.mark.parametrize(("family", "cfg"), EVERY + [("llama", c) for c in LORA_FAMILY], ids=label)
def test_every_tensor_is_row_major_as_a_checkpoint_reload_gives_it(family, cfg):
    """SVD factors come back column-major; a GEMM rounds differently on another layout, so a model and its reloaded
    copy (or a resumed run) would compute different bits."""
    model = tiny(family)
    apply_peft(model, cfg)
    state = model.state_dict()
    assert [name for name, t in state.items() if not t.is_contiguous()] == [] and len(state) > 10


@pytest.mark.parametrize("cfg", [LORA_FAMILY[1], LORA_FAMILY[2], SELECTIVE[3]], ids=label)
def test_loading_a_peft_checkpoint_computes_no_initialisation_and_gives_the_same_bits(cfg, tmp_path, monkeypatch):
    """The checkpoint holds every tensor of the method: no SVD or init to compute and throw away. Saved and
    reloaded tensors have the same values and layouts, so the reloaded model computes exactly the same logits."""
    model = tiny("llama")
    apply_peft(model, cfg)
    with torch.no_grad():  # stand-in for training: every trainable tensor off its init
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    save(model, None, tmp_path, peft=cfg)

    def refuse(*args, **kwargs):
        raise AssertionError("initialisation computed while loading a checkpoint that holds its result")

    monkeypatch.setattr(torch.linalg, "svd", refuse)
    monkeypatch.setattr(LoRALinear, "_initial_tensors", refuse)
    loaded, _ = lmforge.load(tmp_path)
    ids = batch()["input_ids"]
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def expected_trainable(model: DecoderLM, cfg: PeftConfig) -> set[int]:
    """Ids of the parameters the method should train, found independently of its implementation."""
    named = dict(model.named_parameters())
    if cfg.method == "bitfit":
        return {id(p) for n, p in named.items() if n.endswith("bias")}
    if cfg.method == "topk":
        parts = [model.blocks[-cfg.top_k], model.final_norm, model.lm_head]
        return {id(p) for m in parts for p in m.parameters()}
    marker = {"adapter": ".adapter.", "parallel-adapter": ".adapter.", "svd-diag": ".z", "prefix": "prefix_tuning.",
              "prompt": "soft_prompt."}[cfg.method]
    return {id(p) for n, p in named.items() if marker in n}


@pytest.mark.parametrize(("family", "cfg"), EVERY, ids=label)
def test_only_the_methods_parameters_train_and_the_optimizer_holds_exactly_them(family, cfg):
    model = tiny(family)
    apply_peft(model, cfg)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == expected_trainable(model, cfg) and trainable
    opt = build_optimizer(model, TrainConfig())
    assert {id(p) for group in opt.param_groups for p in group["params"]} == trainable


def hand_count(family: str, cfg: PeftConfig) -> int:
    """Trainable parameters computed from the shapes (d=32, 2 layers, 2 heads of 16; Llama: 1 kv head)."""
    hd, kv, ff = 16, (1 if family == "llama" else 2), (96 if family == "llama" else 4 * D)
    kv_dim = kv * hd
    if cfg.method in ("adapter", "parallel-adapter"):
        b = cfg.bottleneck
        return 2 * L * (D * b + b + b * D + D)
    if cfg.method == "prefix" and not cfg.reparam:
        return L * 2 * kv * cfg.prefix_len * hd
    if cfg.method == "prefix":
        h, out = cfg.reparam_hidden, L * 2 * kv_dim
        return cfg.prefix_len * D + D * h + h + h * out + out
    if cfg.method == "prompt":
        return cfg.prompt_len * D
    if cfg.method == "bitfit":  # q, k, v, o biases + up (4d), down + two LayerNorm biases per block; final norm
        return L * (D + 2 * kv_dim + D + 4 * D + D + 2 * D) + D
    if cfg.method == "topk":
        if family == "gpt2":  # block incl. biases, final LayerNorm, tied head = token embedding
            block = 4 * (D * D + D) + (D * ff + ff) + (ff * D + D) + 4 * D
            return block + 2 * D + V * D
        block = 2 * D * D + 2 * D * kv_dim + 3 * D * ff + 2 * D
        return block + D + V * D
    # svd-diag on q, v, mlp.down: one z per singular value, min(out, in) of each
    return L * (D + min(kv_dim, D) + min(D, ff))


@pytest.mark.parametrize(("family", "cfg"), EVERY, ids=label)
def test_trainable_counts_and_percent_match_hand_computation(family, cfg):
    model = tiny(family)
    base_total = sum(p.numel() for p in model.parameters())
    summary = apply_peft(model, cfg)
    added = 0 if cfg.method in ("bitfit", "topk") else hand_count(family, cfg)
    assert summary.trainable == hand_count(family, cfg)
    assert summary.total == base_total + added
    assert summary.percent == pytest.approx(100 * summary.trainable / (base_total + added))
    assert summary.method == cfg.method


@pytest.mark.parametrize(("family", "cfg"), EVERY, ids=label)
def test_a_few_steps_reduce_the_loss_and_leave_frozen_params_alone(family, cfg):
    # a larger init than GPT-2's 0.02: a near-uniform random model leaves frozen-weight methods little to move
    model = tiny(family, init_std=0.2).train()
    apply_peft(model, cfg)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = build_optimizer(model, TrainConfig(lr=0.1, weight_decay=0.0))
    data = batch()
    losses = []
    for _ in range(8):
        loss = causal_lm_loss(model, data).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.25, losses
    assert frozen and all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("cfg", SOFT, ids=label)
def test_cached_decoding_matches_full_forward_with_soft_prompts(family, cfg):
    model = tiny(family)
    apply_peft(model, cfg)
    ids = batch()["input_ids"][:1]
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(1, ids.shape[1])
        steps = [model(ids[:, :5], cache=cache)]  # prefill, a multi-token chunk, then single tokens
        steps.append(model(ids[:, 5:8], cache=cache))
        steps += [model(ids[:, t:t + 1], cache=cache) for t in range(8, ids.shape[1])]
        torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
        # causal: changing the last token leaves every earlier position's logits alone
        changed = ids.clone()
        changed[0, -1] = (changed[0, -1] + 1) % V
        torch.testing.assert_close(model(changed)[:, :-1], full[:, :-1], atol=1e-6, rtol=1e-6)
    sampling = dict(max_new_tokens=10, temperature=0.0, stop_at_eos=False)
    prompt = ids[0, :6].tolist()
    cached = generate_ids(model, prompt, SamplingConfig(**sampling, use_cache=True))
    assert_clear_greedy(model, prompt, cached)
    assert cached == generate_ids(model, prompt, SamplingConfig(**sampling, use_cache=False))
    assert len(cached) == 10


def test_a_copied_prefix_tuned_model_reads_its_own_prefixes():
    """Frozen references (DPO, RL) are deep copies: each copy's attention hooks must follow its own prefixes."""
    model = tiny()
    apply_peft(model, PeftConfig(method="prefix", prefix_len=3, reparam=False))
    ids = batch()["input_ids"]
    reference = copy.deepcopy(model)
    with torch.no_grad():
        before = reference(ids)
        model.prefix_tuning.prefix.add_(1.0)
        torch.testing.assert_close(reference(ids), before, atol=0, rtol=0)
        assert not torch.allclose(model(ids), before, atol=1e-3)


def test_folding_the_prefix_reparameterisation_keeps_outputs():
    model = tiny("llama")
    cfg = PeftConfig(method="prefix", prefix_len=3, reparam_hidden=8)
    apply_peft(model, cfg)
    ids = batch()["input_ids"]
    with torch.no_grad():
        before = model(ids)
        model.prefix_tuning.fold()
        torch.testing.assert_close(model(ids), before, atol=1e-6, rtol=1e-6)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == hand_count("llama", PeftConfig(method="prefix", prefix_len=3, reparam=False))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_svd_diag_reconstructs_w_trains_and_merges_to_the_base_size(family):
    model = tiny(family)
    base_params = sum(p.numel() for p in model.parameters())
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith((".q", ".v", "mlp.down"))}
    cfg = PeftConfig(method="svd-diag", targets=["attn.q", "attn.v", "mlp.down"])
    apply_peft(model, cfg)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SVDDiagLinear)}
    assert layers.keys() == weights.keys()
    for name, layer in layers.items():
        torch.testing.assert_close(layer.U @ torch.diag(layer.S) @ layer.Vh, weights[name], atol=1e-6, rtol=1e-5)
        assert torch.equal(layer.merged_weight(), weights[name])
    opt = build_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.0))
    for _ in range(3):
        opt.zero_grad()
        causal_lm_loss(model.train(), batch()).mean().backward()
        opt.step()
    model.eval()
    layer = layers[next(iter(layers))]
    assert not torch.equal(layer.z, torch.ones_like(layer.z))
    torch.testing.assert_close(layer.merged_weight(), layer.U @ torch.diag(layer.S * layer.z) @ layer.Vh,
                               atol=1e-6, rtol=1e-5)
    ids = batch(2)["input_ids"]
    with torch.no_grad():
        unmerged = model(ids)
        merge_peft(model, cfg)
        torch.testing.assert_close(model(ids), unmerged, atol=1e-5, rtol=1e-5)
    assert not any(isinstance(m, SVDDiagLinear) for m in model.modules())
    assert sum(p.numel() for p in model.parameters()) == base_params
    assert all(p.requires_grad for p in model.parameters())  # an ordinary model again, as after merge_lora
    assert set(model.state_dict()) == set(tiny(family).state_dict())


def test_bitfit_on_a_bias_free_llama_says_so_and_suggests_another_method():
    with pytest.raises(ConfigError, match="no biases.*lora"):
        apply_peft(tiny("llama"), PeftConfig(method="bitfit"))


@pytest.mark.parametrize("method", ["adapter", "parallel-adapter", "prefix", "prompt"])
def test_merging_a_method_that_adds_computation_is_a_config_error(method):
    model = tiny()
    cfg = PeftConfig(method=method, bottleneck=4, prefix_len=2, prompt_len=2)
    apply_peft(model, cfg)
    reason = "adapters add layers" if "adapter" in method else "no base weight can express"
    with pytest.raises(ConfigError, match=f"cannot merge method '{method}': .*{reason}"):
        merge_peft(model, cfg)


def test_bad_settings_name_the_problem():
    with pytest.raises(ConfigError, match="top_k=3 must be between 1 and the model's 2 blocks"):
        apply_peft(tiny(), PeftConfig(method="topk", top_k=3))
    with pytest.raises(ConfigError, match=r"match no Linear layer; the model's Linear layers are: .*blocks\.\*\.mlp"):
        apply_peft(tiny(), PeftConfig(method="svd-diag", targets=["query"]))
    with pytest.raises(ConfigError, match="'lm_head' shares its weight .*tied embeddings"):
        apply_peft(tiny("gpt2"), PeftConfig(method="svd-diag", targets=["lm_head"]))
    with pytest.raises(ConfigError, match="no SVD-diagonal layers to merge"):
        merge_peft(tiny(), PeftConfig(method="svd-diag"))
    with pytest.raises(ConfigError, match="prompt_len=32 leaves no room"):
        apply_peft(tiny(), PeftConfig(method="prompt", prompt_len=32))
    with pytest.raises(ValueError, match="method"):
        PeftConfig(method="ia3")


def test_lora_family_dispatches_to_lora_and_merges():
    model = tiny("llama")
    cfg = PeftConfig(method="lora", r=4, targets=["attn.q", "attn.v"])
    summary = apply_peft(model, cfg)
    assert summary.trainable == L * 4 * ((D + D) + (D + 16))  # r (d_in + d_out) for q (32 -> 32) and v (32 -> 16)
    assert summary.method == "lora" and summary.percent == pytest.approx(100 * summary.trainable / summary.total)
    opt = build_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.0))
    for _ in range(2):
        opt.zero_grad()
        causal_lm_loss(model, batch()).mean().backward()
        opt.step()
    ids = batch(2)["input_ids"]
    with torch.no_grad():
        unmerged = model(ids)
        merge_peft(model, cfg)
        torch.testing.assert_close(model(ids), unmerged, atol=1e-5, rtol=1e-5)
    assert set(model.state_dict()) == set(tiny("llama").state_dict())
