"""The CPO method object: wires data preparation, the concatenated forward pass and the loss variants into the loop."""

from __future__ import annotations

from typing import Any

import torch
from posttrain import LossOutput
from posttrain.ops import token_logps

from posttrain_cpo.config import LENGTH_NORMALISED, CPOConfig
from posttrain_cpo.data import FORMATS, collate_pairs, prepare_rows
from posttrain_cpo.loss import alphapo_loss, alphapo_rewards, cpo_loss, hinge_loss, ipo_loss, simpo_loss


# Copied from posttrain_orpo.method.concatenated_forward
def concatenated_forward(model: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One forward pass over the ``[chosen ; rejected]`` batch; per-token log-probs and their masks.

    Returns a dict of (2B, T-1) tensors aligned with the predicted tokens: ``logps`` (0 at padding),
    ``token_mask`` (every real token after the first), ``completion_mask`` (completion tokens), and
    ``mean_logits`` (2B,), the vocabulary-mean logit averaged over completion tokens (a metric).
    """
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # (2B, T, V)
    labels = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)  # (2B, T-1)
    logps = token_logps(logits[:, :-1], labels)  # (2B, T-1), float32
    token_mask = attention_mask[:, 1:].to(logps.dtype)
    completion_mask = batch["completion_mask"][:, 1:].to(logps.dtype)
    vocab_mean = logits[:, :-1].detach().mean(-1, dtype=torch.float32)  # (2B, T-1), no float copy of the logits
    mean_logits = (vocab_mean * completion_mask).sum(-1) / completion_mask.sum(-1).clamp(min=1)
    return {"logps": logps, "token_mask": token_mask, "completion_mask": completion_mask, "mean_logits": mean_logits}


# Copied from posttrain_orpo.method.disable_dropout
def disable_dropout(model: Any) -> None:
    """Set every ``nn.Dropout`` probability to 0, as TRL does by default for its preference trainers."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def preference_losses(config: CPOConfig, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> torch.Tensor:
    """(B,) losses of the ``loss_type`` variant; log-probs are sums or token means as that variant expects."""
    c, r, beta = chosen_logps, rejected_logps, config.beta
    if config.loss_type == "sigmoid":
        return cpo_loss(c, r, beta, config.label_smoothing)
    if config.loss_type == "hinge":
        return hinge_loss(c, r, beta)
    if config.loss_type == "ipo":
        return ipo_loss(c, r, beta)
    if config.loss_type == "simpo":
        return simpo_loss(c, r, beta, config.simpo_gamma, config.label_smoothing)
    return alphapo_loss(c, r, beta, config.simpo_gamma, config.alpha, config.label_smoothing)


class CPO:
    """Contrastive Preference Optimization (arXiv 2401.08417) and its SimPO / AlphaPO / IPO / hinge variants.

    Example::

        from posttrain.loop import train
        from posttrain_cpo import CPO, CPOConfig

        config = CPOConfig(model="path/to/model", dataset="prefs.jsonl", output_dir="out", loss_type="simpo")
        train(CPO(), config)
    """

    name = "cpo"
    config_class = CPOConfig
    dataset_formats = FORMATS

    def setup(self, ctx: Any) -> None:
        if ctx.config.disable_dropout:
            disable_dropout(ctx.model)

    def prepare(self, dataset: Any, ctx: Any) -> list[dict]:
        return prepare_rows(dataset, ctx.tokenizer, ctx.config.max_length, ctx.config.max_prompt_length)

    def collate(self, rows: list[dict], ctx: Any) -> dict[str, torch.Tensor]:
        return collate_pairs(rows, ctx.tokenizer.pad_token_id)

    def loss(self, model: Any, batch: dict[str, torch.Tensor], ctx: Any) -> LossOutput:
        """Sum of per-pair losses (preference term + weighted NLL) over the micro-batch, normalised by pairs."""
        config = ctx.config
        out = concatenated_forward(model, batch)
        n_pairs = batch["input_ids"].shape[0] // 2
        logps, completion_mask = out["logps"], out["completion_mask"]
        n_tokens = completion_mask.sum(-1)  # (2B,)
        summed = (logps * completion_mask).sum(-1)  # (2B,)
        # SimPO-style variants score the per-token average so that length does not buy reward
        scores = summed / n_tokens if config.loss_type in LENGTH_NORMALISED else summed
        chosen_logps, rejected_logps = scores[:n_pairs], scores[n_pairs:]
        chosen_nll = -summed[:n_pairs] / n_tokens[:n_pairs]  # (B,) token-mean NLL of each chosen completion
        losses = preference_losses(config, chosen_logps, rejected_logps) + config.nll_weight * chosen_nll

        rewards = scores.detach()
        if config.loss_type == "alphapo":
            rewards = alphapo_rewards(rewards, config.alpha)
        chosen_rewards, rejected_rewards = config.beta * rewards[:n_pairs], config.beta * rewards[n_pairs:]
        metrics = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": chosen_logps.detach().mean(),
            "logps/rejected": rejected_logps.detach().mean(),
            "logits/chosen": out["mean_logits"][:n_pairs].mean(),
            "logits/rejected": out["mean_logits"][n_pairs:].mean(),
            "nll_loss": chosen_nll.detach().mean(),
        }
        return LossOutput(loss_sum=losses.sum(), n_items=n_pairs, metrics=metrics)
