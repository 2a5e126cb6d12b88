"""lmforge's DPO loss and gradients against trl's `DPOTrainer` on the same batch and the same weights (the policy
exported with `export_hf`): plain sigmoid DPO, and with the NLL of the chosen replies (trl's
loss_type=["sigmoid", "sft"], lmforge's `sft_weight`). trl computes its reference log-probs with its own frozen
copy; lmforge uses its precomputed ones. The policy is the reference perturbed, so the log-ratios are not zero."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import lmforge
from lmforge.data.pairs import collate_pairs, pair_reader
from lmforge.model.hf import export_hf, to_hf_names
from lmforge.train.dpo import DPOConfig, dpo_batch_loss, frozen_copy, reference_logps, with_reference
from parity_helpers import perturb
from preference_world import write_preference_world

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")
REL = 1e-5


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny decoder as the reference, the policy (it perturbed), both exported, and one batch of 6 preference
    pairs in lmforge's stacked layout."""
    root = tmp_path_factory.mktemp("trl-parity")
    paths = write_preference_world(root, n_train=6, n_eval=1)
    reference, tokenizer = lmforge.load(paths["base"])
    torch.manual_seed(1)
    perturb(reference, 0.2)  # random init leaves biases at zero: every weight must matter to the gradients
    policy = copy.deepcopy(reference)
    perturb(policy, 0.05)
    export_hf(reference, tokenizer, root / "hf-ref")
    export_hf(policy, tokenizer, root / "hf")
    config = DPOConfig(base=str(paths["base"]), max_len=40)
    batch = collate_pairs(pair_reader(config, tokenizer)(str(paths["train"])), tokenizer.pad_id)
    return {"policy": policy.train(), "reference": frozen_copy(reference), "hf": root / "hf",
            "hf_ref": root / "hf-ref", "batch": batch, "out": root / "trl"}


def trl_loss_and_grads(world: dict, beta: float, sft_weight: float) -> tuple[float, dict[str, torch.Tensor]]:
    """trl's loss on the batch through `DPOTrainer.compute_loss`, and its gradients by HF parameter name."""
    load = transformers.AutoModelForCausalLM.from_pretrained
    model, ref_model = load(world["hf"]), load(world["hf_ref"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(world["hf"])
    loss_type, weights = (["sigmoid", "sft"], [1.0, sft_weight]) if sft_weight else (["sigmoid"], [1.0])
    args = trl.DPOConfig(output_dir=str(world["out"]), beta=beta, loss_type=loss_type, loss_weights=weights,
                         report_to="none", use_cpu=True, bf16=False, max_length=None, gradient_checkpointing=False,
                         precompute_ref_log_probs=False)
    text = {"prompt": "king?", "chosen": "gold", "rejected": "stone"}  # the constructor needs a data set
    trainer = trl.DPOTrainer(model=model, ref_model=ref_model, args=args, processing_class=tokenizer,
                             train_dataset=datasets.Dataset.from_list([text]))
    batch = world["batch"]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": batch["response_mask"].long()}
    model.train()
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    return loss.item(), {name: p.grad for name, p in model.named_parameters()}


def lmforge_loss_and_grads(world: dict, beta: float, sft_weight: float) -> tuple[float, dict[str, torch.Tensor]]:
    """lmforge's loss on the batch (the trainer's mean: total / count), and its gradients under HF names."""
    policy = copy.deepcopy(world["policy"])
    batch = world["batch"]
    batch = with_reference(batch, reference_logps(world["reference"], [batch]))
    result = dpo_batch_loss(policy, batch, beta=beta, sft_weight=sft_weight)
    result.mean().backward()
    with torch.no_grad():  # the gradients laid out as weights, so the export's renaming and transposes apply
        for p in policy.parameters():
            p.copy_(p.grad)
    return result.mean().item(), to_hf_names(policy, "gpt2")


@pytest.mark.parametrize(("beta", "sft_weight"), [(0.1, 0.0), (0.5, 0.7)])
def test_dpo_loss_and_gradients_equal_trl(world: dict, beta: float, sft_weight: float) -> None:
    trl_loss, trl_grads = trl_loss_and_grads(world, beta, sft_weight)
    loss, grads = lmforge_loss_and_grads(world, beta, sft_weight)
    assert loss == pytest.approx(trl_loss, rel=REL)
    assert abs(loss - math.log(2)) > 1e-3  # policy and reference differ: the log-ratios are compared too
    assert set(grads) <= set(trl_grads)
    for name, grad in grads.items():
        scale = float(trl_grads[name].abs().max())
        assert scale > 0, name  # every weight carries gradient, so the comparison can fail
        torch.testing.assert_close(grad, trl_grads[name], rtol=REL, atol=REL * scale, msg=name)


def test_the_sft_term_is_the_mean_nll_per_chosen_token(world: dict) -> None:
    """Without trl: the combined loss minus plain DPO is sft_weight x (chosen tokens' NLL / their count)."""
    plain, _ = lmforge_loss_and_grads(world, 0.5, 0.0)
    combined, _ = lmforge_loss_and_grads(world, 0.5, 0.7)
    batch = world["batch"]
    chosen = slice(0, batch["input_ids"].shape[0] // 2)
    with torch.no_grad():
        logits = world["policy"](batch["input_ids"][chosen, :-1]).float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["input_ids"][chosen, 1:],
                                                reduction="none")
        mask = batch["response_mask"][chosen, 1:]
    assert combined - plain == pytest.approx(0.7 * float(nll[mask].mean()), rel=1e-5)
