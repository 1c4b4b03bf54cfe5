"""SFT on rows with images (a tiny LLaVA from ``posttrain.testing.build_tiny_vlm``): exact token ids and masks with
each ``<image>`` expanded into its four image tokens, collated pixel values, the options images cannot use, and a
learning test: after SFT the model names the colour of the shape in images it never saw.
"""

from __future__ import annotations

import datasets
import pytest
import torch
from posttrain import ConfigError, DataError
from posttrain.models import load_causal_lm, load_processor
from posttrain.testing import COLOURS, build_tiny_vlm, colour_logps, colour_rows
from posttrain.vision import image_token_id
from posttrain_sft import SFT, SFTConfig, collate, prepare_rows

X = -100
TOKENS_PER_IMAGE = 4


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    return build_tiny_vlm(tmp_path_factory.mktemp("sft-vlm") / "model")


@pytest.fixture(scope="module")
def processor(vlm_dir):
    return load_processor(str(vlm_dir))


def ids(processor, text):
    return processor.tokenizer(text, add_special_tokens=False).input_ids


def prepare(rows, processor, **fields):
    return prepare_rows(datasets.Dataset.from_list(rows), processor.tokenizer, SFTConfig(**fields), processor=processor)


def test_prompt_completion_with_an_image_masks_the_prompt_and_its_image_tokens(processor):
    (row,) = colour_rows(
        1, "prompt_completion"
    )  # <|user|><image>What colour is the shape?<|end|><|assistant|>red<|end|>
    (prepared,) = prepare([row], processor)
    image = image_token_id(processor)
    prompt = [3, *[image] * TOKENS_PER_IMAGE, *ids(processor, "What colour is the shape?"), 1, 4]
    answer = ids(processor, "red<|end|>")
    assert prepared["input_ids"] == prompt + answer
    assert prepared["labels"] == [X] * len(prompt) + answer
    assert len(prepared["images"]) == 1 and prepared["token_inputs"] == {}


def test_two_images_and_assistant_only_loss(processor):
    row = colour_rows(3, "language_modeling")[2]  # every third row shows two shapes (blue)
    (prepared,) = prepare([row], processor, assistant_only_loss=True)
    assert prepared["input_ids"].count(image_token_id(processor)) == 2 * TOKENS_PER_IMAGE
    assert [t for t in prepared["labels"] if t != X] == ids(processor, "blue<|end|>")


def test_standard_rows_expand_the_image_token_and_get_eos(processor):
    row = colour_rows(1, "prompt_completion", conversational=False)[0]  # "<image>What colour is the shape? " + "red"
    (prepared,) = prepare([row], processor)
    image = image_token_id(processor)
    prompt = [image] * TOKENS_PER_IMAGE + ids(processor, "What colour is the shape? ")
    assert prepared["input_ids"] == prompt + ids(processor, "red<|end|>")
    assert prepared["labels"] == [X] * len(prompt) + ids(processor, "red<|end|>")


def test_collate_adds_pixel_values_in_row_order(processor):
    rows = prepare(colour_rows(3, "prompt_completion"), processor)  # 1, 1 and 2 images
    batch = collate(rows, processor.tokenizer.pad_token_id, padding_free=False, processor=processor)
    assert batch["vision_inputs"] == ["pixel_values"]
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    width = max(len(r["input_ids"]) for r in rows)
    assert batch["input_ids"].shape == batch["labels"].shape == (3, width)
    assert batch["attention_mask"].sum(1).tolist() == [len(r["input_ids"]) for r in rows]
    # the images of a row carry its colour: red, green, then blue twice (normalised red minus blue channel)
    redness = (batch["pixel_values"][:, 0] - batch["pixel_values"][:, 2]).mean(dim=(1, 2))
    assert redness[0] > 0 > redness[2] and redness[3] < 0


def test_token_aligned_processor_inputs_are_padded_with_zero(processor):
    rows = [
        {"input_ids": [5, 6, 7], "labels": [X, 6, 7], "images": [], "token_inputs": {"mm_token_type_ids": [1, 0, 0]}},
        {"input_ids": [5], "labels": [5], "images": [], "token_inputs": {"mm_token_type_ids": [1]}},
    ]
    rows[0]["images"] = colour_rows(1, "prompt_completion")[0]["images"]
    batch = collate(rows, 0, padding_free=False, processor=processor)
    assert batch["mm_token_type_ids"].tolist() == [[1, 0, 0], [1, 0, 0]]
    assert batch["vision_inputs"] == ["mm_token_type_ids", "pixel_values"]


@pytest.mark.parametrize("option", ["packing", "padding_free"])
def test_packing_and_padding_free_refuse_image_rows(processor, option):
    with pytest.raises(ConfigError, match=f"{option} is true, but the dataset has images"):
        prepare(colour_rows(4, "prompt_completion"), processor, **{option: True})


def test_truncation_that_would_cut_an_image_names_the_row(processor):
    rows = colour_rows(3, "prompt_completion")
    with pytest.raises(DataError, match=r"row 0 .*field 'images' has image tokens beyond max_length=3") as info:
        prepare(rows, processor, max_length=3)
    assert {p.row for p in info.value.problems} == {0, 1, 2}


def test_standard_rows_need_one_image_token_per_image(processor):
    rows = colour_rows(3, "prompt_completion", conversational=False)
    rows[1]["prompt"] = rows[1]["prompt"].replace("<image>", "")
    with pytest.raises(DataError, match=r"row 1 .*holds 1 image\(s\) but 'prompt' has 0 image token"):
        prepare(rows, processor)


def test_images_without_a_processor_are_refused(processor):
    with pytest.raises(ConfigError, match="no processor was given"):
        prepare_rows(datasets.Dataset.from_list(colour_rows(2)), processor.tokenizer, SFTConfig())


def test_check_rows_reports_image_problems_without_a_model():
    rows = colour_rows(2, "prompt_completion")
    rows[1]["images"] = rows[1]["images"] * 2
    (problem,) = SFT().check_rows(rows)
    assert (problem.row, problem.field) == (1, "images")


def test_sft_teaches_the_colour_of_the_shape(vlm_dir, tmp_path):
    """Held-out accuracy of the likeliest of the four colour answers (chance: 0.25).

    Calibration (``python benchmarks/calibrate_vision.py sft --seeds 0-2 --threads 1 2``, 2026-11-30; seed = model
    initialisation, training rows and data order): 60 steps of batch 8 at learning rate 5e-3 gave accuracy 1.000 on
    the 40 held-out images in every run (seeds 0, 1, 2 with one thread; seed 0 with two threads); the untrained models scored
    0.250. The threshold 0.75 leaves 0.25 below every calibration run and 0.5 above chance.
    """
    from posttrain.loop import train

    config = SFTConfig(
        model=str(vlm_dir),
        output_dir=str(tmp_path / "sft"),
        max_steps=60,
        learning_rate=5e-3,
        per_device_train_batch_size=8,
        logging_steps=10,
        save_steps=0,
        disable_progress_bar=True,
        seed=0,
    )
    train(SFT(), config, train_dataset=colour_rows(64, "prompt_completion", seed=0))
    held_out = colour_rows(40, "prompt_completion", seed=1000)
    answers = torch.tensor([list(COLOURS).index(r["answer"]) for r in held_out])

    def accuracy(path) -> float:
        model = load_causal_lm(str(path), config).eval()
        return float((colour_logps(model, load_processor(str(path)), held_out).argmax(-1) == answers).float().mean())

    assert accuracy(vlm_dir) <= 0.4
    assert accuracy(config.output_dir) >= 0.75
