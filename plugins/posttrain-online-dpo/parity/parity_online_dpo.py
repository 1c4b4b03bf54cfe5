"""Parity of posttrain-online-dpo with TRL 1.16's experimental OnlineDPOTrainer on the deterministic parts of a step.

Both implementations get the same tiny model (fp32, CPU), the same 4 prompts and the *same* 8 completions, two
per prompt (generation is replaced by a fixed list: sampling streams differ between any two implementations),
and the same reward functions (posttrain-rewards' accuracy, a text-length reward defined here, and a tiny local
reward model that TRL scores through its own model path). TRL runs its real ``_generate`` (prompt tokenization,
EOS truncation) around a ``generate`` that returns the fixed completions, then its real ``training_step``.
Compared per case: the scores after the missing-EOS penalty, which sample of each pair is chosen (read from the
index tensor TRL builds), the loss, every logged metric and every parameter's gradient. The policy is perturbed
by the same seeded noise on both sides so that it differs from the reference.

TRL sums its ``objective/kl`` and ``objective/entropy`` (and so ``non_score_reward`` and ``rlhf_reward``) over
every completion position, padding after EOS included; posttrain masks the padding. Those four metrics are
compared in the cases where all completions have the same length (no padding), and listed as skipped elsewhere.

Run: .venv-trl/bin/python plugins/posttrain-online-dpo/parity/parity_online_dpo.py   (writes result.json here)
"""

from __future__ import annotations

import json
import sys
import tempfile
import types
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
PROMPTS = [("2+3=", "5"), ("4+4=", "8"), ("1+6=", "7"), ("9+0=", "9")]  # equal lengths: no left padding
L = 6  # max_completion_length (TRL: max_new_tokens)
NAMES = ["accuracy", "brevity", "rm"]
CASES = [
    {"loss_type": "sigmoid", "beta": 0.1, "weights": [1.0, 0.5, 2.0], "missing_eos_penalty": None, "lengths": "mixed"},
    {"loss_type": "sigmoid", "beta": 0.5, "weights": [1.0, 0.0, 0.0], "missing_eos_penalty": 1.0, "lengths": "mixed"},
    {"loss_type": "ipo", "beta": 0.1, "weights": [1.0, 0.5, 2.0], "missing_eos_penalty": 0.3, "lengths": "mixed"},
    {"loss_type": "ipo", "beta": 0.5, "weights": [1.0, 0.5, 2.0], "missing_eos_penalty": None, "lengths": "equal"},
    {"loss_type": "sigmoid", "beta": 0.05, "weights": [1.0, 0.0, 0.0], "missing_eos_penalty": 0.5, "lengths": "equal"},
]
PADDING_METRICS = ("objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward")
TARGET = 1e-4


def rel(a, b) -> float:
    """max |a − b| / max(|a|, |b|, 1e-3): values below 1e-3 (a margin that is 0 by construction) count absolutely."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-3)
    return (a - b).abs().max().item() / scale


def brevity(prompts, completions, **columns):
    """A dense text reward both trainers call the same way: shorter completions score higher."""
    return [-len(c) / 10 for c in completions]


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
    return model_dir, tmp / "rm", tok


def completion_pairs(tok, lengths: str) -> list[tuple[list[int], list[int]]]:
    """Two completions per prompt: (text, ends with EOS). Mixed lengths include ties on accuracy, completions that
    never end (missing EOS) and EOS before the last position (padding after it); equal ones are all L tokens."""
    eos = tok.eos_token_id
    pairs = []
    for k, (_, answer) in enumerate(PROMPTS):
        wrong = str((int(answer) + 1) % 10)
        if lengths == "mixed":
            texts = [
                [(answer, True), (f"x{wrong}", True)],
                [("no", True), (answer * L, False)],
                [("abc", True), (f"{wrong} ", True)],
                [(answer * L, False), (f" {answer}", True)],
            ][k]
        else:  # every completion exactly L tokens: L − 1 characters and EOS, or L characters
            texts = [
                [(f"is {answer} ", True), ("abcdef", False)],
                [(answer * (L - 1), True), (f"  {wrong}  ", True)],
                [(f"= {answer}...", False), (f"{answer}{answer}{answer}   ", False)],
                [("none ", True), (f"  {answer}  ", True)],
            ][k]
        ids = []
        for text, ends in texts:
            t = tok(text, add_special_tokens=False).input_ids
            assert len(t) + ends == L or (lengths == "mixed" and len(t) + ends <= L), (text, len(t))
            ids.append([*t, eos] if ends else t)
        pairs.append((ids[0], ids[1]))
    return pairs


def perturb(model) -> None:
    """Same seeded noise on both sides: the policy moves away from the reference loaded from disk."""
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(0.02 * torch.randn(p.shape, generator=gen))


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def run_trl(case, model_dir, rm_dir, tok, pairs, rows, tmp):
    import datasets
    import trl.experimental.online_dpo.online_dpo_trainer as trainer_module
    from posttrain_rewards import accuracy
    from transformers import AutoTokenizer
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    args = OnlineDPOConfig(
        output_dir=str(tmp / "trl"),
        per_device_train_batch_size=len(rows),
        max_new_tokens=L,
        beta=case["beta"],
        loss_type=case["loss_type"],
        missing_eos_penalty=case["missing_eos_penalty"],
        reward_weights=case["weights"],
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        use_cpu=True,
        seed=0,
        logging_steps=1,
    )
    trainer = OnlineDPOTrainer(
        model=str(model_dir),
        reward_funcs=[accuracy, brevity, str(rm_dir)],
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )
    model = trainer.model
    perturb(model)
    model.train()
    # TRL's own _generate runs; only the sampler returns the fixed completions, in TRL's block layout
    # [c0 of every prompt; c1 of every prompt], padded after EOS as generate() pads finished rows.
    block = [p[0] for p in pairs] + [p[1] for p in pairs]
    width = max(len(c) for c in block)
    completions = torch.tensor([c + [tok.pad_token_id] * (width - len(c)) for c in block])
    seen = {}

    def fixed_generate(input_ids, attention_mask=None, **kwargs):
        seen["prompt_ids"] = input_ids.clone()
        return torch.cat([input_ids, completions.to(input_ids.device)], dim=1)

    model.generate = fixed_generate
    captured = {}
    score = trainer._calculate_rewards_from_functions

    def scores_spy(*a, **k):
        captured["scores"] = score(*a, **k)  # TRL then subtracts missing_eos_penalty in place: read it afterwards
        return captured["scores"]

    trainer._calculate_rewards_from_functions = scores_spy

    class TorchSpy(types.ModuleType):  # records torch.cat((chosen_indices, rejected_indices)), TRL's choice
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def cat(tensors, dim=0, **kw):
            if dim == 0 and all(t.dim() == 1 and t.dtype == torch.long for t in tensors):
                captured["cr_indices"] = torch.cat(tensors).clone()
            return torch.cat(tensors, dim=dim, **kw)

    trainer_module.torch = TorchSpy("torch")
    try:
        loss = trainer.training_step(
            model, {"prompt": [r["prompt"] for r in rows], "answer": [r["answer"] for r in rows]}
        )
    finally:
        trainer_module.torch = torch
    p = len(rows)
    chosen = captured["cr_indices"][:p]
    return {
        "prompt_ids": seen["prompt_ids"][:p],
        "scores": captured["scores"].detach(),  # (2P,) block layout
        "winner": (chosen != torch.arange(p)).float(),  # 0: first sample chosen, 1: second
        "loss": loss.item(),
        "metrics": {k: v[-1] for k, v in trainer.stats.items() if v},
        "grads": grads(model),
    }


def run_posttrain(case, model_dir, rm_dir, pairs, rows):
    import datasets
    from posttrain import Metric, TrainContext
    from posttrain.generation import Completions
    from posttrain_online_dpo import OnlineDPO, OnlineDPOConfig, pair_rows
    from posttrain_rewards import accuracy, make_reward_model_reward
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = OnlineDPOConfig(
        model=str(model_dir),
        reward_funcs=NAMES,
        reward_weights=case["weights"],
        per_device_train_batch_size=len(rows),
        max_completion_length=L,
        beta=case["beta"],
        loss_type=case["loss_type"],
        missing_eos_penalty=case["missing_eos_penalty"],
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    rewards = {
        "accuracy": accuracy,
        "brevity": brevity,
        # TRL scores a reward model on the bare text (no EOS); match it here (posttrain-rewards' default appends it)
        "rm": make_reward_model_reward(str(rm_dir), append_eos=False),
    }
    tok = AutoTokenizer.from_pretrained(model_dir)
    ctx = TrainContext(config=config, tokenizer=tok, model=model, model_path=str(model_dir), rewards=rewards)
    method = OnlineDPO()
    method.setup(ctx)
    perturb(model)
    model.train()
    seen = {}

    class Fixed:  # the generator returns the fixed completions, each prompt's two consecutive
        name, reports_logps = "fixed", False

        def generate(self, prompt_ids, n, seeds=None):
            seen["prompt_ids"] = prompt_ids
            ids = [list(c) for pair in pairs for c in pair]
            return Completions(token_ids=ids, truncated=[tok.eos_token_id not in c for c in ids])

        def sync_weights(self, model):
            pass

        def close(self):
            pass

    method.generator = Fixed()
    batch = method.collate(method.prepare(datasets.Dataset.from_list(rows), ctx), ctx)
    with torch.no_grad():
        (batch,) = method.rollout(model, [batch], ctx)
    out = method.loss(model, batch, ctx)
    (out.loss_sum / out.n_items).backward()
    scores = torch.empty(2 * len(rows))
    scores[torch.cat(pair_rows(batch["winner"]))] = batch["scores"]  # back to sampling order
    metrics = {
        k: (float(v.value) / float(v.denominator) if v.kind == "ratio" else float(v.value))
        if isinstance(v, Metric)
        else float(v)
        for k, v in out.metrics.items()
    }
    return {
        "prompt_ids": torch.tensor(seen["prompt_ids"]),
        "scores": scores.view(-1, 2).T.reshape(-1),  # (2P,) in TRL's block layout
        "winner": batch["winner"],
        "loss": (out.loss_sum / out.n_items).item(),
        "metrics": metrics,
        "grads": grads(model),
    }


def main() -> int:
    import trl

    torch.set_num_threads(1)
    rows = [{"prompt": p, "answer": a} for p, a in PROMPTS]
    details, worst = [], 0.0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir, rm_dir, tok = build(tmp)
        print(f"{'case':<62} {'scores':>8} {'choice':>6} {'loss':>8} {'metrics':>8} {'grad':>8}   loss trl / posttrain")
        for case in CASES:
            pairs = completion_pairs(tok, case["lengths"])
            theirs = run_trl(case, model_dir, rm_dir, tok, pairs, rows, tmp)
            ours = run_posttrain(case, model_dir, rm_dir, pairs, rows)
            assert torch.equal(theirs["prompt_ids"], ours["prompt_ids"]), "the two sides tokenized the prompts apart"
            assert set(theirs["grads"]) == set(ours["grads"]), "different parameter sets received gradients"
            skipped = [k for k in PADDING_METRICS if case["lengths"] == "mixed"]
            compared = sorted(k for k in theirs["metrics"] if k not in skipped)
            missing = [k for k in compared if k not in ours["metrics"]]
            assert not missing, f"posttrain does not log TRL's metrics {missing}"
            choice_mismatches = int((theirs["winner"] != ours["winner"]).sum())
            diffs = {
                "scores": rel(theirs["scores"], ours["scores"]),
                "choice": float(choice_mismatches),  # pairs whose chosen sample differs: must be 0
                "loss": rel(theirs["loss"], ours["loss"]),
                "metrics": max(rel(theirs["metrics"][k], ours["metrics"][k]) for k in compared),
                "grad": max(rel(theirs["grads"][n], ours["grads"][n]) for n in theirs["grads"]),
            }
            per_metric = {k: rel(theirs["metrics"][k], ours["metrics"][k]) for k in compared}
            label = (
                f"{case['loss_type']} beta={case['beta']} w={case['weights']} "
                f"eos_penalty={case['missing_eos_penalty']} {case['lengths']}"
            )
            print(
                f"{label:<62} "
                + " ".join(f"{v:>8.1e}" if k != "choice" else f"{int(v):>6d}" for k, v in diffs.items())
                + f"   {theirs['loss']:+.6f} / {ours['loss']:+.6f}"
            )
            worst = max(worst, *diffs.values())
            details.append(
                {
                    **case,
                    "max_rel_diff": diffs,
                    "metrics_compared": per_metric,
                    "metrics_skipped": skipped,
                    "winner": ours["winner"].tolist(),
                    "loss_trl": theirs["loss"],
                    "loss_posttrain": ours["loss"],
                }
            )
    passed = worst <= TARGET
    result = {
        "method": "online-dpo",
        "trl_version": trl.__version__,
        "steps": 1,
        "cases": len(CASES),
        "max_rel_diff": worst,
        "target": TARGET,
        "passed": passed,
        "compared": "scores, chosen/rejected choice, loss, every logged TRL metric and every parameter's gradient "
        "for one step on 8 fixed completions (4 prompts x 2), fp32 CPU",
        "details": details,
    }
    (HERE / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"max relative difference {worst:.2e} (target {TARGET:g}): {'PASSED' if passed else 'FAILED'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
