"""DPO on rows with images (a tiny LLaVA from ``posttrain.testing.build_tiny_vlm``): exact token ids with each
``<image>`` expanded into its four image tokens, chosen and rejected sequences that see the same pixel values, and a
learning test: after DPO the model prefers the right colour of the shape in images it never saw.
"""

from __future__ import annotations

import pytest
import torch
from posttrain.models import load_causal_lm, load_processor
from posttrain.testing import COLOURS, build_tiny_vlm, colour_logps, colour_rows
from posttrain.vision import image_token_id
from posttrain_dpo import DPO, DPOConfig
from posttrain_dpo.data import collate_pairs, tokenize_row

TOKENS_PER_IMAGE = 4


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    return build_tiny_vlm(tmp_path_factory.mktemp("dpo-vlm") / "model")


@pytest.fixture(scope="module")
def processor(vlm_dir):
    return load_processor(str(vlm_dir))


def ids(processor, text):
    return processor.tokenizer(text, add_special_tokens=False).input_ids


def wrong_colour(row: dict) -> str:
    return row["rejected"][0]["content"][0]["text"]


def test_conversational_pair_with_an_image_expands_the_image_tokens_in_the_prompt(processor):
    (row,) = colour_rows(1, "preference")  # <|user|><image>What colour is the shape?<|end|><|assistant|> red / wrong
    out = tokenize_row(row, processor.tokenizer, processor=processor)
    image = image_token_id(processor)
    assert out["prompt_ids"] == [3, *[image] * TOKENS_PER_IMAGE, *ids(processor, "What colour is the shape?"), 1, 4]
    assert out["chosen_ids"] == ids(processor, "red<|end|>")
    assert out["rejected_ids"] == ids(processor, wrong_colour(row) + "<|end|>")
    assert len(out["images"]) == 1 and out["token_inputs"] == {}


def test_chosen_and_rejected_see_the_same_images(processor):
    rows = [tokenize_row(r, processor.tokenizer, processor=processor) for r in colour_rows(3, "preference")]
    batch = collate_pairs(rows, processor.tokenizer.pad_token_id, processor=processor)
    assert batch["vision_inputs"] == ["pixel_values"]
    # rows hold 1, 1 and 2 images: the chosen sequences' 4 images, then the same 4 for the rejected ones
    assert batch["pixel_values"].shape == (8, 3, 32, 32)
    assert torch.equal(batch["pixel_values"][:4], batch["pixel_values"][4:])
    image = image_token_id(processor)
    counts = (batch["input_ids"] == image).sum(1).tolist()
    assert counts == [4, 4, 8, 4, 4, 8]
    assert batch["completion_mask"][batch["input_ids"] == image].sum() == 0  # no loss on image tokens


def test_check_rows_counts_images_against_placeholders_without_a_model():
    rows = colour_rows(2, "preference")
    rows[1]["images"] = rows[1]["images"] * 2
    (problem,) = DPO().check_rows(rows)
    assert (problem.row, problem.field) == (1, "images")
    assert "holds 2 image(s) but 'prompt' has 1 image placeholder(s)" in problem.problem


def test_dpo_prefers_the_right_colour_on_held_out_images(vlm_dir, tmp_path):
    """DPO's implicit reward log pi(y|x) - log pi_ref(y|x) ranks the right colour above the row's wrong colour on
    held-out images (``rewards/accuracies`` on 40 pairs the run never saw). The texts of a pair differ only in the
    colour named, so a ranking above chance (0.5) is read from the image.

    Calibration (``python benchmarks/calibrate_vision.py dpo --seeds 0-2 --threads 1 2``, 2026-11-30; seed = model
    initialisation, training rows and data order): 60 steps of batch 8 at learning rate 5e-3, beta 0.1 gave held-out
    reward accuracies 0.825, 0.850 and 0.850 (seeds 0, 1, 2 with one thread) and 0.825 (seed 0, two threads; the
    other two-thread runs did not finish on the loaded machine). The threshold 0.7 leaves
    0.125 below the lowest run and 0.2 above chance; 40 steps were not enough (0.55 -> 0.60 in the policy's own
    preference, no margin).
    """
    from posttrain.loop import train

    config = DPOConfig(
        model=str(vlm_dir),
        output_dir=str(tmp_path / "dpo"),
        max_steps=60,
        learning_rate=5e-3,
        per_device_train_batch_size=8,
        beta=0.1,
        logging_steps=10,
        save_steps=0,
        disable_progress_bar=True,
        seed=0,
    )
    train(DPO(), config, train_dataset=colour_rows(64, "preference", seed=0))
    held_out = colour_rows(40, "preference", seed=1000)
    right = torch.tensor([list(COLOURS).index(r["answer"]) for r in held_out])
    wrong = torch.tensor([list(COLOURS).index(wrong_colour(r)) for r in held_out])

    def logps(path):
        return colour_logps(load_causal_lm(str(path), config).eval(), load_processor(str(path)), held_out)

    rewards = logps(config.output_dir) - logps(vlm_dir)  # the run's reference is the model it started from
    accuracy = float((rewards.gather(1, right[:, None]) > rewards.gather(1, wrong[:, None])).float().mean())
    print(f"held-out reward accuracy {accuracy:.3f}")
    assert accuracy >= 0.7, accuracy


def test_padding_free_true_refuses_image_rows_and_auto_keeps_them_padded(processor):
    """Sequences with images cannot share a row (image features are matched to image tokens across a row)."""
    import datasets
    from posttrain import ConfigError, TrainContext

    rows = colour_rows(2, "preference")
    for setting in (True, "auto"):
        method = DPO()
        config = DPOConfig(padding_free=setting, max_length=None)
        ctx = TrainContext(config=config, tokenizer=processor.tokenizer, processor=processor, training=False)
        if setting is True:
            with pytest.raises(ConfigError, match="padding_free is true, but the dataset has images"):
                method.prepare(datasets.Dataset.from_list(rows), ctx)
            continue
        method.padding_free = True  # what setup resolves under a varlen attention kernel
        batch = method.collate(method.prepare(datasets.Dataset.from_list(rows), ctx), ctx)
        assert batch["input_ids"].shape[0] == 4 and "pixel_values" in batch  # padded [chosen; rejected]
