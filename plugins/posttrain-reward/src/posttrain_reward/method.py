"""The reward-modeling method: a sequence-classification head scored with the Bradley–Terry loss."""

from __future__ import annotations

import contextlib
import functools
import sys
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch
from posttrain import DataError, LossOutput, Metric, PosttrainError, RowProblem, TrainContext
from posttrain.models import disable_dropout, pack_batch, resolve_padding_free
from posttrain.ops import unpad

from posttrain_reward.config import RewardConfig
from posttrain_reward.data import collate_pairs, pair_problems, prepare_pairs
from posttrain_reward.loss import bradley_terry_loss, reward_metrics

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from transformers import PreTrainedModel


class Reward:
    """Train a scalar reward model on preference pairs (``chosen`` preferred over ``rejected``).

    Example::

        from posttrain.loop import train
        from posttrain_reward import Reward, RewardConfig

        train(Reward(), RewardConfig(model="my-lm", dataset="prefs.jsonl", output_dir="rm", max_steps=100))
        # AutoModelForSequenceClassification.from_pretrained("rm") now scores text
    """

    name = "reward"
    config_class = RewardConfig
    dataset_formats = ("preference",)
    prepare_cacheable = True  # prepare reads the rows, tokenizer and config only: its rows may come from the cache
    supports_padding_free = True  # padding_free: one (1, N) row, each sequence scored at its own last token

    def __init__(self) -> None:
        self._new_head: str | None = None  # what load_model initialised, reported once in setup
        self.padding_free: bool | str = False  # True, False or "auto" (chosen per micro-batch), resolved by setup

    def load_model(self, config: RewardConfig) -> PreTrainedModel:
        """Load ``config.model`` as ``AutoModelForSequenceClassification`` with one output (the reward).

        A causal-LM checkpoint is fine: its body is reused and the ``score`` head is newly initialised (from the
        seed, which the loop sets before this call); its ``lm_head`` is not used.
        """
        from posttrain import models
        from transformers import AutoConfig, AutoModelForSequenceClassification

        try:
            found = AutoConfig.from_pretrained(config.model, trust_remote_code=config.trust_remote_code)
        except (OSError, ValueError):
            found = None  # a bad path: load_causal_lm below says what is wrong with it
        is_classifier = any(
            a.endswith("ForSequenceClassification") for a in getattr(found, "architectures", None) or []
        )
        if is_classifier and found.num_labels != 1:
            raise PosttrainError(
                f"model at {config.model!r} is a sequence classifier with num_labels={found.num_labels}; a reward model "
                "has a single output. Start from the causal LM it was built on, or from a reward model (num_labels=1)."
            )
        # load_causal_lm's path checks and dtype/attention settings, with a one-output classifier class
        one_label = SimpleNamespace(
            __name__="AutoModelForSequenceClassification (num_labels=1)",
            from_pretrained=functools.partial(AutoModelForSequenceClassification.from_pretrained, num_labels=1),
        )
        with contextlib.nullcontext() if is_classifier else _quiet_new_head():
            model = models.load_causal_lm(config.model, config, model_class=one_label)
        if not is_classifier:
            what = ", ".join(getattr(found, "architectures", None) or []) or "no sequence-classification head"
            self._new_head = (
                f"reward: {config.model} is {what}; loaded it as {type(model).__name__} with a newly initialised "
                f"score head (one output, seed {config.seed}); its LM head is not used."
            )
        return model

    def setup(self, ctx: TrainContext[RewardConfig]) -> None:
        """Point the model at the tokenizer's pad token (so the last real token is scored) and drop dropout."""
        model, config = ctx.model, ctx.config
        if getattr(model.config, "num_labels", None) != 1 or "ForSequenceClassification" not in type(model).__name__:
            raise PosttrainError(
                f"the reward method needs a sequence-classification model with num_labels=1, got {type(model).__name__}. "
                "Let the method load it from --model (a causal LM checkpoint is fine), or pass "
                "AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)."
            )
        # The classifier pools the rightmost token that is not pad_token_id; without it, batches of 2+ fail, and a
        # stale id would make it score padding.
        model.config.get_text_config().pad_token_id = ctx.tokenizer.pad_token_id
        self.padding_free = resolve_padding_free(model, config.padding_free)
        if config.disable_dropout:
            disable_dropout(model)
        if self._new_head:
            _say(ctx, self._new_head)
            self._new_head = None

    def prepare(self, dataset: Any, ctx: TrainContext[RewardConfig]) -> list[dict]:
        config = ctx.config
        rows, n_filtered = prepare_pairs(dataset, ctx.tokenizer, config.max_length, config.truncation_mode)
        if n_filtered:
            total = n_filtered + len(rows)
            if not rows:
                raise DataError(
                    f"all {total} pairs have a chosen or rejected sequence longer than max_length={config.max_length} "
                    "tokens, so none is left to train on. Raise --max_length, or pass --truncation_mode keep_end to "
                    "cut the start of long sequences instead of dropping them."
                )
            _say(
                ctx,
                f"reward: dropped {n_filtered} of {total} pairs longer than max_length={config.max_length} "
                "tokens (truncation_mode=filter)",
            )
        return rows

    def check_rows(self, rows: Any) -> list[RowProblem]:
        """Every bad row, for ``posttrain check-data reward FILE``; ``prepare`` refuses exactly these rows."""
        return pair_problems(rows)

    def collate(self, rows: list[dict], ctx: TrainContext[RewardConfig]) -> dict:
        return collate_pairs(rows, ctx.tokenizer.pad_token_id)

    def loss(self, model: Any, batch: dict, ctx: TrainContext[RewardConfig]) -> LossOutput:
        # true works without setup; auto needs it, and packs this micro-batch where that is estimated cheaper
        if pack_batch(model, ctx.config.padding_free is True or self.padding_free, batch["attention_mask"]):
            rewards = packed_rewards(model, batch["input_ids"], batch["attention_mask"], ctx.tokenizer.pad_token_id)
        else:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            rewards = out.logits.squeeze(-1)  # (2B,): the head's output at each row's last non-pad token
        chosen_rewards, rejected_rewards = rewards.chunk(2)  # (B,) each
        losses = bradley_terry_loss(
            chosen_rewards, rejected_rewards, batch.get("margin"), ctx.config.center_rewards_coefficient
        )
        metrics = reward_metrics(chosen_rewards, rejected_rewards)
        if ctx.training:  # TRL's num_tokens: tokens trained on so far, padding excluded; the loop keeps the total
            metrics["num_tokens"] = Metric.total(batch["attention_mask"].sum())
        return LossOutput(losses.sum(), len(losses), metrics)


def packed_rewards(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int | None
) -> torch.Tensor:
    """The rewards of a padded (2B, T) batch, run as one padding-free row (:func:`posttrain.ops.unpad`).

    The classifier's own pooling (the rightmost token that is not ``pad_token_id``) would pick one token of the
    whole packed row, so its head's per-token output is kept by a hook, and each sequence is scored at its own
    rightmost non-pad token, as the padded forward scores each row (its first token if it has none).

    Returns:
        (2B,) rewards.
    """
    row = unpad(input_ids, attention_mask)
    head = _score_layer(model)
    kept: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda module, args, out: kept.append(out))
    try:  # the model's own forward (DDP, PEFT and compile wrappers included), position_ids keep sequences apart
        model(input_ids=row["input_ids"], position_ids=row["position_ids"], use_cache=False)
    finally:
        hook.remove()
    scores = kept[-1][0, :, 0]  # (N,): the head's output at every token
    segments, n = row["sequence_ids"][0], input_ids.size(0)
    index = torch.arange(len(segments), device=segments.device)
    starts = torch.full((n,), len(segments), device=segments.device).scatter_reduce(0, segments, index, "amin")
    candidates = index.masked_fill(row["input_ids"][0] == pad_token_id, -1) if pad_token_id is not None else index
    last = torch.full((n,), -1, device=segments.device).scatter_reduce(0, segments, candidates, "amax")
    return scores[torch.where(last >= 0, last, starts)]


def _score_layer(model: Any) -> torch.nn.Module:
    """The classifier's ``score`` head (the outermost module of that name: PEFT's wrapper when it wraps one)."""
    names = [name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] == "score"]
    if not names:
        raise PosttrainError(
            f"padding_free is on, but {type(model).__name__} has no 'score' head to read per-token rewards from; "
            "set padding_free false"
        )
    return model.get_submodule(min(names, key=len))


def _say(ctx: TrainContext, text: str) -> None:
    """One line on the main process (stderr when there is no accelerator, e.g. in unit tests)."""
    if ctx.accelerator is not None:
        ctx.accelerator.print(text)
    else:
        print(text, file=sys.stderr)


@contextlib.contextmanager
def _quiet_new_head():
    """Silence transformers' load report for the two expected keys of a causal LM loaded as a classifier.

    ``score.weight`` is missing (it is the new head) and ``lm_head.*`` is unexpected (unused); :meth:`Reward.setup`
    says so in one line instead. Other missing or unexpected keys are still reported.
    """
    from transformers.modeling_layers import GenericForSequenceClassification as Generic

    names = ("_keys_to_ignore_on_load_missing", "_keys_to_ignore_on_load_unexpected")
    saved = {name: Generic.__dict__[name] for name in names if name in Generic.__dict__}
    Generic._keys_to_ignore_on_load_missing = [*(getattr(Generic, names[0], None) or []), r"^score\.weight$"]
    Generic._keys_to_ignore_on_load_unexpected = [*(getattr(Generic, names[1], None) or []), r"^lm_head\."]
    try:
        yield
    finally:  # put the class back exactly as it was
        for name in names:
            if name in saved:
                setattr(Generic, name, saved[name])
            else:
                delattr(Generic, name)
