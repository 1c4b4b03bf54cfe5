"""``share_prompt``: each prompt computed once (KV cache), chosen and rejected continuing from it.

Checked against the concatenated (2B, T) batch the method uses otherwise, on pairs whose prompts and completions
all differ in length (padding on both paths): the summed log-probs, token counts and logit sums, and the gradients of
every parameter. In float64, with the RMSNorm computing in float64 too (transformers' LlamaRMSNorm computes in
float32 whatever the model's dtype; the shared path sums a prompt token's two upstream gradients before the norm's
backward and the concatenated one after, a float32 rounding difference of ~1e-7 that would hide a real one), the
paths agree to 1e-12 relative: the same function. In float32 the log-probs agree to 1e-5 relative (sums of ~30
token log-probs, each off by a few ulps) and a training step reaches the same loss.
"""

from __future__ import annotations

import pytest
import torch
from posttrain.loop import train
from posttrain_dpo import DPO, DPOConfig
from posttrain_dpo.data import collate_pairs
from posttrain_dpo.method import completion_logps, shared_prompt_logps


def _rms_norm_in_dtype(self, hidden_states):
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _batch(dpo_tokenizer):
    rows = [  # prompts of 3, 9 and 5 tokens; completions of 1 to 8 tokens
        {"prompt_ids": [7, 8, 9], "chosen_ids": [10, 11, 12, 13, 2], "rejected_ids": [14, 2]},
        {"prompt_ids": [15, 16, 17, 18, 19, 20, 21, 22, 23], "chosen_ids": [2], "rejected_ids": [24, 25, 26, 2]},
        {"prompt_ids": [27, 28, 29, 30, 31], "chosen_ids": [32, 33, 34, 35, 36, 37, 38, 2], "rejected_ids": [39, 2]},
    ]
    return collate_pairs(rows, dpo_tokenizer.pad_token_id)


def _values_and_grads(model, path, batch):
    model.zero_grad(set_to_none=True)
    logps, lengths, logit_sums = path(model, batch)
    (logps * torch.arange(1.0, len(logps) + 1, dtype=logps.dtype)).sum().backward()  # each row its own weight
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logps.detach(), lengths, logit_sums.detach(), grads


def test_shared_prompt_equals_the_concatenated_batch_in_float64(dpo_model_dir, dpo_tokenizer, monkeypatch):
    from transformers import AutoModelForCausalLM
    from transformers.models.llama import modeling_llama

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", _rms_norm_in_dtype)
    model = AutoModelForCausalLM.from_pretrained(dpo_model_dir, dtype=torch.float64)
    batch = _batch(dpo_tokenizer)
    concatenated = _values_and_grads(model, completion_logps, batch)
    shared = _values_and_grads(model, shared_prompt_logps, batch)
    torch.testing.assert_close(shared[0], concatenated[0], rtol=1e-12, atol=0)
    assert shared[1].tolist() == concatenated[1].tolist() == [5, 1, 8, 2, 4, 2]
    torch.testing.assert_close(shared[2].double(), concatenated[2].double(), rtol=1e-6, atol=1e-6)  # float32 metric
    assert shared[3].keys() == concatenated[3].keys()
    for name, grad in concatenated[3].items():
        scale = grad.abs().max()
        assert (shared[3][name] - grad).abs().max() <= 1e-12 * scale, name


def test_shared_prompt_in_float32_and_through_training(dpo_model_dir, dpo_tokenizer, dpo_pairs, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(dpo_model_dir, dtype=torch.float32)
    batch = _batch(dpo_tokenizer)
    concatenated = _values_and_grads(model, completion_logps, batch)
    shared = _values_and_grads(model, shared_prompt_logps, batch)
    torch.testing.assert_close(shared[0], concatenated[0], rtol=1e-5, atol=1e-5)
    losses = {}
    for share in (False, True):
        config = DPOConfig(
            model=str(dpo_model_dir),
            output_dir=str(tmp_path / f"share-{share}"),
            max_steps=2,
            learning_rate=1e-3,
            per_device_train_batch_size=4,
            logging_steps=1,
            save_steps=0,
            disable_progress_bar=True,
            seed=0,
            share_prompt=share,
        )
        result = train(DPO(), config, train_dataset=dpo_pairs(16, seed=0))
        losses[share] = [row["loss"] for row in result.log_history if "loss" in row]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_share_prompt_refuses_several_processes(dpo_ctx):
    from posttrain import PosttrainError

    class TwoProcesses:
        num_processes = 2

    ctx = dpo_ctx(share_prompt=True)
    ctx.accelerator = TwoProcesses()
    with pytest.raises(PosttrainError, match="share_prompt.*2 processes"):
        DPO().setup(ctx)
