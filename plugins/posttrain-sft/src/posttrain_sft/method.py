"""The SFT method object: wires ``data.py`` and ``loss.py`` into the shared loop."""

from __future__ import annotations

from typing import Any

import torch
from posttrain import ConfigError, LossOutput
from posttrain.ops import token_logps

from posttrain_sft.config import SFTConfig
from posttrain_sft.data import collate, prepare_rows
from posttrain_sft.loss import LOSSES, shift_labels, token_metrics


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

    def __init__(self) -> None:
        self._tokens = 0  # input tokens (padding excluded) this process has trained on: TRL's num_tokens, local part
        self._window = 0  # micro-batches since the loop last logged

    def setup(self, ctx: Any) -> None:
        self._window = 0
        if ctx.config.packing or ctx.config.padding_free:
            check_packed_attention(ctx.model)

    def prepare(self, dataset: Any, ctx: Any) -> list[dict]:
        return prepare_rows(dataset, ctx.tokenizer, ctx.config)

    def collate(self, rows: list[dict], ctx: Any) -> dict:
        return collate(rows, ctx.tokenizer.pad_token_id, padding_free=ctx.config.padding_free or ctx.config.packing)

    def loss(self, model: Any, batch: dict, ctx: Any) -> LossOutput:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        # use_cache=False: with a cache, transformers ignores the position_ids restarts that separate packed sequences
        logits = model(**inputs, use_cache=False).logits  # (B, T, V)
        targets = shift_labels(batch["labels"])  # (B, T): position t predicts token t+1
        logps = token_logps(logits, targets)  # (B, T), 0 where no loss is taken
        loss_sum = LOSSES[ctx.config.loss_type](logps)
        n_loss_tokens, n_correct, entropy_sum = token_metrics(logits.detach(), targets)
        count = n_loss_tokens.clamp(min=1)
        metrics = {
            "mean_token_accuracy": n_correct / count,
            "entropy": entropy_sum / count,
            "num_tokens": self._num_tokens(batch, ctx),
        }
        return LossOutput(loss_sum=loss_sum, n_items=n_loss_tokens, metrics=metrics)

    def _num_tokens(self, batch: dict, ctx: Any) -> float:
        """TRL's ``num_tokens``: input tokens (padding excluded) trained on so far, all processes together.

        The loop logs each metric as its mean over the micro-batches since its last log, and over processes. For
        that mean to be the running total T_n at the n-th micro-batch of a window, this reports n·T_n - (n-1)·T_(n-1),
        whose mean over the window telescopes to T_n; each process reports world_size x its own total, whose mean
        over processes is the global total. A window starts after every logging_steps-th step and at (re)start.
        """
        world = ctx.num_processes
        if not ctx.training:  # evaluation reports the training total, as TRL does
            return float(self._tokens * world)
        if ctx.micro_step == 0 and ctx.step % ctx.config.logging_steps == 0:
            self._window = 0
        previous = self._tokens * world
        mask = batch.get("attention_mask")
        self._tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        self._window += 1
        return float(self._window * self._tokens * world - (self._window - 1) * previous)

    def state_dict(self) -> dict:
        return {"num_tokens": self._tokens}

    def load_state_dict(self, state: dict) -> None:
        self._tokens, self._window = int(state["num_tokens"]), 0
