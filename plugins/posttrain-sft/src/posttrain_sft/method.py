"""The SFT method object: wires ``data.py`` and ``loss.py`` into the shared loop."""

from __future__ import annotations

from typing import Any

from posttrain import LossOutput, Metric, RowProblem, TrainContext
from posttrain.models import check_packed_attention, pack_batch, resolve_padding_free
from posttrain.ops import token_stats
from posttrain.vision import model_inputs

from posttrain_sft.config import SFTConfig
from posttrain_sft.data import collate, prepare_rows, row_problems
from posttrain_sft.loss import IGNORE_INDEX, LOSSES, shift_labels


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
    prepare_cacheable = True  # prepare reads the rows, tokenizer and config only: its rows may come from the cache
    supports_images = True  # rows with images train a vision-language model (posttrain.vision)
    supports_padding_free = True  # padding_free / packing: one (1, N) row per micro-batch
    padding_free: bool | str = False  # padding_free "auto" resolved by setup: "auto" (per micro-batch), True or False

    def setup(self, ctx: TrainContext[SFTConfig]) -> None:
        if ctx.config.packing or ctx.config.padding_free is True:
            check_packed_attention(ctx.model)
        self.padding_free = ctx.config.padding_free == "auto" and resolve_padding_free(ctx.model, "auto")

    def check_rows(self, rows: Any) -> list[RowProblem]:
        """Every bad row (core's format checks, then prompt/completion mixing a string and messages), for ``posttrain
        check-data``; ``prepare`` refuses exactly these, plus rows the options or the tokenizer cannot use."""
        return row_problems(rows)

    def prepare(self, dataset: Any, ctx: TrainContext[SFTConfig]) -> list[dict]:
        return prepare_rows(dataset, ctx.tokenizer, ctx.config, processor=ctx.processor)

    def collate(self, rows: list[dict], ctx: TrainContext[SFTConfig]) -> dict:
        padding_free = ctx.config.padding_free is True or ctx.config.packing
        # auto: every micro-batch padding-free under a varlen attention kernel, else each where that is estimated
        # cheaper (posttrain.models.pack_batch); image rows stay padded
        if not padding_free and self.padding_free and not any("images" in r for r in rows):
            padding_free = pack_batch(ctx.model, self.padding_free, [len(r["input_ids"]) for r in rows])
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
