"""The SFT method object: wires ``data.py`` and ``loss.py`` into the shared loop."""

from __future__ import annotations

from typing import Any

import torch
from posttrain import ConfigError, LossOutput, Metric, RowProblem, TrainContext
from posttrain.ops import token_stats
from posttrain.vision import model_inputs

from posttrain_sft.config import SFTConfig
from posttrain_sft.data import collate, prepare_rows, row_problems
from posttrain_sft.loss import IGNORE_INDEX, LOSSES, shift_labels


@torch.no_grad()
def check_packed_attention(model: Any) -> None:
    """Fail at start-up when the model lets sequences concatenated in one row attend to each other.

    Padding-free batches rely on transformers deriving a block-diagonal causal mask from ``position_ids`` that
    restart at 0 (``masking_utils.find_packed_sequence_indices``, used by eager, sdpa, flex and flash attention when
    no attention mask and no cache are passed). A model or kernel that ignores the restarts would train on
    cross-sequence attention silently, so two short sequences are run packed and separately and compared.

    Raises:
        ConfigError: the packed logits differ from the separate ones.
    """
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    first, second = torch.arange(1, 7, device=device) % vocab, torch.arange(7, 11, device=device) % vocab
    position_ids = torch.cat([torch.arange(6), torch.arange(4)]).to(device)[None]
    was_training = model.training
    model.eval()  # no dropout, so any difference comes from the mask
    try:
        separate = torch.cat([model(input_ids=x[None], use_cache=False).logits[0] for x in (first, second)]).float()
        packed = model(input_ids=torch.cat([first, second])[None], position_ids=position_ids, use_cache=False)
        packed = packed.logits[0].float()
    finally:
        model.train(was_training)
    error = float((packed - separate).abs().max() / separate.abs().max().clamp(min=1e-6))
    tolerance = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2
    if error > tolerance:
        impl = getattr(model.config, "_attn_implementation", None)
        raise ConfigError(
            f"packing/padding_free is true, but with attn_implementation={impl!r} this model lets sequences that share "
            f"a row attend to each other (relative logit difference {error:.2e} against separate sequences, allowed "
            f"{tolerance:.0e}). Use attn_implementation sdpa, eager, flex_attention or flash_attention_2 with a model "
            "whose attention mask follows position_ids restarts, or set packing and padding_free false."
        )


class SFT:
    """Supervised fine-tuning: token-level cross-entropy on text, completions or assistant turns.

    Example::

        from posttrain.loop import train
        from posttrain_sft import SFT, SFTConfig

        train(SFT(), SFTConfig(model="tiny-model", dataset="chat.jsonl", output_dir="out", max_steps=20))
    """

    name = "sft"
    config_class = SFTConfig
    dataset_formats = ("language_modeling", "prompt_completion")
    supports_images = True  # rows with images train a vision-language model (posttrain.vision)

    def setup(self, ctx: TrainContext[SFTConfig]) -> None:
        if ctx.config.packing or ctx.config.padding_free:
            check_packed_attention(ctx.model)

    def check_rows(self, rows: Any) -> list[RowProblem]:
        """Every bad row (core's format checks, then prompt/completion mixing a string and messages), for ``posttrain
        check-data``; ``prepare`` refuses exactly these, plus rows the options or the tokenizer cannot use."""
        return row_problems(rows)

    def prepare(self, dataset: Any, ctx: TrainContext[SFTConfig]) -> list[dict]:
        return prepare_rows(dataset, ctx.tokenizer, ctx.config, processor=ctx.processor)

    def collate(self, rows: list[dict], ctx: TrainContext[SFTConfig]) -> dict:
        padding_free = ctx.config.padding_free or ctx.config.packing
        return collate(rows, ctx.tokenizer.pad_token_id, padding_free=padding_free, processor=ctx.processor)

    def loss(self, model: Any, batch: dict, ctx: TrainContext[SFTConfig]) -> LossOutput:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        targets = shift_labels(batch["labels"])  # (B, T): position t predicts token t+1
        # the head runs in chunks on the loss positions only, so no (B, T, V) logits exist (posttrain.ops.token_stats;
        # it calls the model with use_cache=False, which keeps the position_ids restarts of packed sequences apart)
        out = token_stats(model, targets, entropy=True, top1=True, **inputs, **model_inputs(batch))
        loss_sum = LOSSES[ctx.config.loss_type](out.logps)  # logps (B, T), 0 where no loss is taken
        n_loss_tokens = (targets != IGNORE_INDEX).sum()
        n_correct, entropy_sum = out.top1.sum(), out.entropy.detach().sum()
        # token-weighted over the whole logging window (all micro-batches and processes), however rows are grouped
        metrics: dict[str, Metric] = {
            "mean_token_accuracy": Metric.ratio(n_correct, n_loss_tokens),
            "entropy": Metric.ratio(entropy_sum, n_loss_tokens),
        }
        if ctx.training:
            # TRL's num_tokens: input tokens trained on so far (padding excluded); the loop keeps the running total
            # over processes and micro-batches, and saves it in checkpoints
            mask = batch.get("attention_mask")
            metrics["num_tokens"] = Metric.total(mask.sum() if mask is not None else batch["input_ids"].numel())
        return LossOutput(loss_sum=loss_sum, n_items=n_loss_tokens, metrics=metrics)
