"""Parity of posttrain-grpo with TRL 1.16 GRPOTrainer on the deterministic parts of a GRPO step.

Both implementations get the same tiny model (fp32, CPU), the same 4 prompts and the *same* 16 completions
(generation is replaced by a fixed list: sampling streams differ between any two implementations), and the
same reward functions (posttrain-rewards' accuracy and length_penalty, plus a tiny local reward model that
TRL scores through its own model path). Compared per case: the rewards per function, the advantages, the
loss, the KL metric and the full gradient. The policy is perturbed by the same seeded noise on both sides
so that it differs from the reference and the KL term is exercised. Cases with ``num_iterations: 2`` perturb the
policy a second time between the rollout and the loss, so the importance ratio is not 1 and the clipped,
CISPO, SAPO and GSPO (sequence-level) surrogates are exercised away from the on-policy point.

Run: /work/parity-venv/bin/python plugins/posttrain-grpo/parity/parity_grpo.py   (writes result.json here)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
PROMPTS = [("2+3=", "5"), ("4+4=", "8"), ("1+6=", "7"), ("9+0=", "9")]
G, L = 4, 6
CASES = [
    {"loss_type": "dapo", "scale_rewards": "group", "beta": 0.0, "temperature": 1.0},
    {"loss_type": "grpo", "scale_rewards": "group", "beta": 0.04, "temperature": 0.7},
    {"loss_type": "bnpo", "scale_rewards": "batch", "beta": 0.0, "temperature": 1.0},
    {"loss_type": "dr_grpo", "scale_rewards": "none", "beta": 0.04, "temperature": 1.0},
    {"loss_type": "dapo", "scale_rewards": "group", "beta": 0.1, "temperature": 0.9},
    # off-policy: the policy moves between rollout and loss, so the ratio is not 1
    {"loss_type": "dapo", "scale_rewards": "group", "beta": 0.04, "temperature": 1.0, "num_iterations": 2},
    {
        "loss_type": "cispo",
        "scale_rewards": "group",
        "beta": 0.0,
        "temperature": 1.0,
        "num_iterations": 2,
        "epsilon_high": 1.1,
    },
    {"loss_type": "sapo", "scale_rewards": "group", "beta": 0.04, "temperature": 1.0, "num_iterations": 2},
    {
        "loss_type": "grpo",
        "scale_rewards": "group",
        "beta": 0.0,
        "temperature": 1.0,
        "num_iterations": 2,
        "importance_sampling_level": "sequence",
    },
]
WEIGHTS = [1.0, 0.5, 2.0]
TARGET = 1e-4


def rel(a: torch.Tensor | float, b: torch.Tensor | float) -> float:
    """max |a − b| / max(|a|, |b|, 1e-3): values below 1e-3 (a loss that is 0 by construction) count absolutely."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-3)
    return (a - b).abs().max().item() / scale


def build(tmp: Path):
    from posttrain.testing import build_tiny_model, build_tokenizer
    from transformers import LlamaConfig, LlamaForSequenceClassification

    model_dir = build_tiny_model(tmp / "policy")
    tok = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(1)
    LlamaForSequenceClassification(config).save_pretrained(tmp / "rm")
    tok.save_pretrained(tmp / "rm")
    eos = tok.eos_token_id
    completions = []
    for _, answer in PROMPTS:
        wrong = str((int(answer) + 1) % 10)
        texts = [(answer, True), (f"x{wrong}", True), (answer * L, False), ("no", True)]
        for text, ends in texts:
            ids = tok(text, add_special_tokens=False).input_ids[:L]
            completions.append([*ids, eos] if ends and len(ids) < L else ids)
    return model_dir, tmp / "rm", completions


def perturb(model) -> None:
    """Same seeded noise on both sides: the policy moves away from the reference loaded from disk."""
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(0.02 * torch.randn(p.shape, generator=gen))


def perturb_again(model) -> None:
    """The optimizer step between a rollout and a later iteration on it, simulated by seeded noise."""
    gen = torch.Generator().manual_seed(456)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def run_trl(case, model_dir, rm_dir, completions, rows, tmp):
    import datasets
    from posttrain_rewards import accuracy, make_length_penalty
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(
        output_dir=str(tmp / "trl"),
        per_device_train_batch_size=len(completions),
        num_generations=G,
        max_completion_length=L,
        temperature=case["temperature"],
        loss_type=case["loss_type"],
        scale_rewards=case["scale_rewards"],
        beta=case["beta"],
        reward_weights=WEIGHTS,
        num_iterations=case.get("num_iterations", 1),
        epsilon_high=case.get("epsilon_high"),
        importance_sampling_level=case.get("importance_sampling_level", "token"),
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        use_cpu=True,
        seed=0,
        logging_steps=1,
    )
    length_penalty = make_length_penalty(L, 2)
    trainer = GRPOTrainer(
        model=str(model_dir),
        reward_funcs=[accuracy, length_penalty, str(rm_dir)],
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )
    trainer._generate_single_turn = lambda *a, **k: ([list(c) for c in completions], None)
    trainer.current_gradient_accumulation_steps = 1
    model = trainer.model
    perturb(model)
    model.train()
    inputs = [dict(row) for row in rows for _ in range(G)]
    batch = trainer._generate_and_score_completions(inputs)
    if case.get("num_iterations", 1) > 1:
        perturb_again(model)
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    m = trainer._metrics["train"]
    names = ["accuracy", "length_penalty", "rm"]
    return {
        "rewards": [m[f"rewards/{n}/mean"][-1] for n in names],
        "advantages": batch["advantages"].detach(),
        "loss": loss.item(),
        "kl": m["kl"][-1] if "kl" in m else 0.0,
        "grads": grads(model),
    }


class FixedCompletions:
    """A generation backend that returns the same completions as the TRL side (sampling cannot be compared)."""

    name, reports_logps = "fixed", False

    def __init__(self, completions):
        self.completions = completions

    def generate(self, prompt_ids, n, seeds=None):
        from posttrain.generation import Completions

        return Completions([list(c) for c in self.completions], [c[-1:] != [1] for c in self.completions])

    def sync_weights(self, model):
        pass

    def close(self):
        pass


def run_posttrain(case, model_dir, rm_dir, completions, rows):
    import datasets
    from posttrain import TrainContext
    from posttrain_grpo import GRPO, GRPOConfig
    from posttrain_rewards import accuracy, make_length_penalty, make_reward_model_reward
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = GRPOConfig(
        model=str(model_dir),
        reward_funcs=["accuracy", "length_penalty", "rm"],
        reward_weights=WEIGHTS,
        per_device_train_batch_size=len(completions),
        num_generations=G,
        max_completion_length=L,
        temperature=case["temperature"],
        loss_type=case["loss_type"],
        scale_rewards=case["scale_rewards"],
        beta=case["beta"],
        num_iterations=case.get("num_iterations", 1),
        epsilon_high=case.get("epsilon_high"),
        importance_sampling_level=case.get("importance_sampling_level", "token"),
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    rewards = {
        "accuracy": accuracy,
        "length_penalty": make_length_penalty(L, 2),
        # TRL scores a reward model on the bare text (no EOS); match it here. posttrain-rewards defaults to
        # the convention posttrain-reward trains with (EOS appended), a documented deviation.
        "rm": make_reward_model_reward(str(rm_dir), append_eos=False),
    }
    ctx = TrainContext(
        config=config,
        tokenizer=AutoTokenizer.from_pretrained(model_dir),
        model=model,
        model_path=str(model_dir),
        rewards=rewards,
    )
    method = GRPO()
    method.setup(ctx)
    method.generator = FixedCompletions(completions)
    perturb(model)
    model.train()
    batch = method.collate(method.prepare(datasets.Dataset.from_list(rows), ctx), ctx)
    (batch,) = method.rollout(model, [batch], ctx)
    if case.get("num_iterations", 1) > 1:
        perturb_again(model)
    out = method.loss(model, batch, ctx)
    loss = out.loss_sum / out.n_items
    loss.backward()
    m = out.metrics
    return {
        "rewards": [m[f"rewards/{n}/mean"] for n in config.reward_funcs],
        "advantages": batch["advantages"],
        "loss": loss.item(),
        "kl": float(m.get("kl", 0.0)),
        "grads": grads(model),
    }


def main() -> int:
    import trl

    torch.set_num_threads(1)
    rows = [{"prompt": p, "answer": a} for p, a in PROMPTS]
    details, worst = [], 0.0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir, rm_dir, completions = build(tmp)
        print(
            f"{'case':<66} {'rewards':>9} {'advantages':>11} {'loss':>9} {'kl':>9} {'grad':>9}   loss trl / posttrain"
        )
        for case in CASES:
            theirs = run_trl(case, model_dir, rm_dir, completions, rows, tmp)
            ours = run_posttrain(case, model_dir, rm_dir, completions, rows)
            diffs = {
                "rewards": rel(theirs["rewards"], ours["rewards"]),
                "advantages": rel(theirs["advantages"], ours["advantages"]),
                "loss": rel(theirs["loss"], ours["loss"]),
                "kl": rel(theirs["kl"], ours["kl"]),
                "grad": max(rel(theirs["grads"][n], ours["grads"][n]) for n in theirs["grads"]),
            }
            assert set(theirs["grads"]) == set(ours["grads"]), "different parameter sets received gradients"
            label = ", ".join(f"{k}={v}" for k, v in case.items())
            print(
                f"{label:<66} "
                + " ".join(f"{v:>9.1e}" for v in diffs.values())
                + f"   {theirs['loss']:+.6f} / {ours['loss']:+.6f}"
            )
            worst = max(worst, *diffs.values())
            details.append(
                {
                    **case,
                    "max_rel_diff": diffs,
                    "loss_trl": theirs["loss"],
                    "loss_posttrain": ours["loss"],
                    "kl_trl": theirs["kl"],
                    "kl_posttrain": ours["kl"],
                }
            )
    passed = worst <= TARGET
    result = {
        "method": "grpo",
        "trl_version": trl.__version__,
        "steps": 1,
        "cases": len(CASES),
        "max_rel_diff": worst,
        "target": TARGET,
        "passed": passed,
        "compared": "rewards per function, advantages, loss, kl and every parameter's gradient for one step on "
        "16 fixed completions (4 prompts x 4), fp32 CPU; off-policy cases move the policy between rollout and loss",
        "details": details,
    }
    # the measured figures, the tolerance, the reference and a hash of src/: what `posttrain promote` verifies
    from posttrain.testing.parity import write_result

    write_result(
        Path(__file__).parent / "result.json",
        method=result["method"],
        reference=f"TRL {result['trl_version']} GRPOTrainer",
        compared=result.get("compared")
        or f"per-step training loss over {result['steps']} steps on a tiny model, fp32 CPU",
        tolerance=result["target"],
        comparisons={
            f"case {i}/{quantity}": {"value": value, "note": f"largest relative difference of {quantity} in the step"}
            for i, case in enumerate(result["details"])
            for quantity, value in case["max_rel_diff"].items()
        },
        details={k: v for k, v in result.items() if k not in ("method", "max_rel_diff", "target", "passed")},
    )
    print(f"max relative difference {worst:.2e} (target {TARGET:g}): {'PASSED' if passed else 'FAILED'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
