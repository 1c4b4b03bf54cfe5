"""posttrain.vision and its use by core: image values, path resolution, row checks (check-data included), token
expansion, pixel inputs, loading a vision-language model and its processor, freezing, LoRA placement, the loop's
refusals, and ``posttrain info``.

The model is :func:`posttrain.testing.build_tiny_vlm`: a LLaVA whose processor expands each ``<image>`` into four
image tokens (2 x 2 patches of a 32-pixel image; the CLS feature is dropped).
"""

from __future__ import annotations

import io
import json

import datasets
import pytest
import torch
from PIL import Image
from posttrain import ConfigError, DataError, PosttrainError, RowProblem, vision
from posttrain.cli import main
from posttrain.models import apply_peft, load_causal_lm, load_processor
from posttrain.testing import build_tiny_vlm, colour_exact, colour_rows, shape_image

TOKENS_PER_IMAGE = 4


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    return build_tiny_vlm(tmp_path_factory.mktemp("vision") / "vlm")


@pytest.fixture(scope="module")
def processor(vlm_dir):
    return load_processor(str(vlm_dir))


def png_bytes(colour=(200, 10, 10), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (8, 6), colour if mode == "RGB" else (*colour, 128)).save(buffer, format="PNG")
    return buffer.getvalue()


def user(*parts):
    return [{"role": "user", "content": list(parts)}]


IMAGE, TEXT = {"type": "image"}, {"type": "text", "text": "What colour?"}


# -- image values -----------------------------------------------------------------------------------------------


def test_load_image_reads_every_kind_and_converts_to_rgb(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(mode="RGBA"))
    pil = Image.new("L", (3, 3), 7)
    for value in (
        str(path),
        path,
        png_bytes(),
        {"bytes": png_bytes(), "path": None},
        {"bytes": None, "path": str(path)},
        pil,
    ):
        image = vision.load_image(value)
        assert image.mode == "RGB"
    assert vision.load_image(png_bytes((1, 2, 3))).getpixel((0, 0)) == (1, 2, 3)


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("/no/such/file.png", "does not exist"),
        (b"not an image", "cannot be read as an image"),
        ("https://example.com/x.png", "is a URL"),
        (3, "int is not an image"),
    ],
)
def test_load_image_says_what_is_wrong(value, says):
    with pytest.raises(ValueError, match=says):
        vision.load_image(value)


def test_row_images_reads_images_or_image():
    assert vision.row_images({"images": ["a", "b"]}) == ["a", "b"]
    assert vision.row_images({"image": "a"}) == ["a"]
    assert vision.row_images({"images": None, "image": None}) == []
    assert vision.row_images({"text": "x"}) == []
    assert vision.has_images([{"text": "x", "images": []}, {"text": "y", "images": ["a"]}])
    assert not vision.has_images([{"text": "x"}])


def test_relative_paths_resolve_against_the_dataset_directory_then_the_working_directory(tmp_path, monkeypatch):
    data_dir, cwd = tmp_path / "data", tmp_path / "cwd"
    (data_dir / "img").mkdir(parents=True)
    (cwd / "pics").mkdir(parents=True)
    (data_dir / "img" / "a.png").write_bytes(png_bytes())
    (cwd / "pics" / "b.png").write_bytes(png_bytes())
    monkeypatch.chdir(cwd)
    rows = [{"text": "x", "images": ["img/a.png", "pics/b.png", "missing.png", str(tmp_path / "abs.png")]}]
    (resolved,) = vision.resolve_image_paths(rows, data_dir)
    assert resolved["images"] == [
        str(data_dir / "img" / "a.png"),
        str(cwd / "pics" / "b.png"),
        str(data_dir / "missing.png"),  # found nowhere: the error names the dataset-relative path
        str(tmp_path / "abs.png"),
    ]
    dataset = vision.resolve_image_paths(datasets.Dataset.from_list(rows), data_dir)
    assert dataset[0]["images"] == resolved["images"]
    single = vision.resolve_image_paths([{"text": "x", "image": "img/a.png"}], data_dir)
    assert single[0]["image"] == str(data_dir / "img" / "a.png")


def test_load_dataset_resolves_image_paths_of_a_file(tmp_path, monkeypatch):
    from posttrain.data import load_dataset

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.png").write_bytes(png_bytes())
    (tmp_path / "d" / "rows.jsonl").write_text(json.dumps({"text": "<image>x", "images": ["a.png"]}) + "\n")
    monkeypatch.chdir(tmp_path)
    assert load_dataset("d/rows.jsonl")[0]["images"] == [str(tmp_path / "d" / "a.png")]


# -- row checks ---------------------------------------------------------------------------------------------------


def test_conversational_rows_count_image_parts_and_the_images_trl_inserts(tmp_path):
    ok = {"images": [png_bytes()], "prompt": user(IMAGE, TEXT), "completion": [{"role": "assistant", "content": "red"}]}
    assert vision.image_problems(ok, 0) == []
    # plain-string user content: TRL puts every image before the first user message's text
    strings = {"images": [png_bytes(), png_bytes()], "messages": [{"role": "user", "content": "Both?"}]}
    assert vision.image_problems(strings, 1) == []
    (problem,) = vision.image_problems({**ok, "images": [png_bytes(), png_bytes()]}, 2)
    assert (problem.row, problem.field) == (2, "images")
    assert "holds 2 image(s) but 'prompt' has 1 image placeholder(s)" in problem.problem
    (problem,) = vision.image_problems({"images": [png_bytes()], "prompt": [{"role": "system", "content": "x"}]}, 3)
    assert "no user message" in problem.problem


def test_standard_rows_count_the_processor_image_token():
    row = {"images": [png_bytes()], "prompt": "<image><image>Both?", "completion": "red"}
    assert vision.image_problems(row, 0) == []  # check-data has no processor: the token is unknown
    (problem,) = vision.image_problems(row, 0, image_token="<image>")
    assert "holds 1 image(s) but 'prompt' has 2 image token(s) '<image>'" in problem.problem
    assert "once per image" in problem.fix


def test_files_and_types_are_checked(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not a png")
    problems = vision.image_problems({"images": [str(tmp_path / "gone.png"), str(bad)], "text": "<image><image>"}, 5)
    assert [p.problem.split(":")[0] for p in problems] == ["image 0", "image 1"]
    assert "does not exist" in problems[0].problem and "dataset file's directory" in problems[0].fix
    assert "cannot be read as an image" in problems[1].problem
    (problem,) = vision.image_problems({"images": "a.png", "text": "x"}, 0)
    assert "must be a list of images" in problem.problem
    # open_files=False only checks that paths exist (prepare re-checks placeholders without decoding twice)
    assert len(vision.image_problems({"images": [str(bad)], "text": "<image>"}, 0, open_files=False)) == 0


def test_data_validate_accepts_content_parts_and_checks_images():
    from posttrain.data import validate

    rows = [
        {"images": [png_bytes()], "messages": [*user(IMAGE, TEXT), {"role": "assistant", "content": "red"}]},
        {"images": [png_bytes()], "messages": user(TEXT)},  # 1: no placeholder for its image
        {"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]},  # 2: text part not a string
    ]
    problems = validate(rows, "language_modeling")
    assert [(p.row, p.field) for p in problems] == [(1, "images"), (2, "messages")]
    assert "non-string content" in problems[1].problem


def test_multimodal_messages_put_images_before_the_first_user_text():
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "user", "content": "r"}]
    out = vision.multimodal_messages(messages, 2)
    assert out[1]["content"] == [IMAGE, IMAGE, {"type": "text", "text": "q"}]
    assert out[2]["content"] == [{"type": "text", "text": "r"}]
    assert messages[1]["content"] == "q"  # the input is not changed


# -- check-data ----------------------------------------------------------------------------------------------------


def test_check_data_reports_image_problems_before_any_model_loads(tmp_path, capsys):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "ok.png").write_bytes(png_bytes())
    (tmp_path / "img" / "broken.png").write_text("garbage")
    completion = [{"role": "assistant", "content": [{"type": "text", "text": "red"}]}]
    rows = [
        {"images": ["img/ok.png"], "prompt": user(IMAGE, TEXT), "completion": completion},
        {"images": ["img/missing.png"], "prompt": user(IMAGE, TEXT), "completion": completion},
        {"images": ["img/broken.png"], "prompt": user(IMAGE, TEXT), "completion": completion},
        {"images": ["img/ok.png", "img/ok.png"], "prompt": user(IMAGE, TEXT), "completion": completion},
    ]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = main(["check-data", "sft", str(data), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1
    found = [(p["row"], p["field"], p["problem"]) for p in report["problems"]]
    assert [(row, field) for row, field, _ in found] == [(1, "images"), (2, "images"), (3, "images")]
    assert str(tmp_path / "img" / "missing.png") in found[0][2]
    assert "cannot be read" in found[1][2] and "1 image placeholder" in found[2][2]


def test_check_data_counts_standard_image_tokens_with_a_processor(tmp_path, capsys, vlm_dir):
    (tmp_path / "a.png").write_bytes(png_bytes())
    rows = [
        {"images": ["a.png"], "prompt": "<image>What colour? ", "completion": "red"},
        {"images": ["a.png", "a.png"], "prompt": "<image>What colour? ", "completion": "red"},
        {"images": ["a.png"], "prompt": "What colour? ", "completion": "red"},
    ]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["check-data", "sft", str(data)]) == 0  # without a processor the image token is unknown
    capsys.readouterr()
    assert main(["check-data", "sft", str(data), "--processor", str(vlm_dir), "--json"]) == 1
    found = [(p["row"], p["field"], p["problem"]) for p in json.loads(capsys.readouterr().out)["problems"]]
    assert [(row, field) for row, field, _ in found] == [(1, "images"), (2, "images")]
    assert "holds 2 image(s) but 'prompt' has 1 image token(s) '<image>'" in found[0][2]
    assert "holds 1 image(s) but 'prompt' has 0 image token(s)" in found[1][2]


def test_check_data_refuses_images_for_a_text_only_method(tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    rows = [{"prompt": "<image>Q", "completion": "A", "label": True, "images": [str(tmp_path / "a.png")]}]
    (tmp_path / "a.png").write_bytes(png_bytes())
    data.write_text(json.dumps(rows[0]) + "\n")
    code = main(["check-data", "kto", str(data)])
    out = capsys.readouterr().out
    assert code == 1
    assert "'images' holds images, but method 'kto' trains on text only" in out


def test_info_says_which_methods_accept_images(capsys):
    assert main(["info", "sft"]) == 0
    assert "images:   yes" in capsys.readouterr().out
    assert main(["info", "kto"]) == 0
    assert "images:   no: text only" in capsys.readouterr().out


# -- tokens and pixel inputs ---------------------------------------------------------------------------------


def test_encode_expands_each_image_into_its_tokens(processor):
    image_id = vision.image_token_id(processor)
    one = vision.encode(processor, user(IMAGE, TEXT), [png_bytes()], add_generation_prompt=True)
    two = vision.encode(processor, user(IMAGE, IMAGE, TEXT), [png_bytes(), png_bytes()], add_generation_prompt=True)
    assert one["input_ids"].count(image_id) == TOKENS_PER_IMAGE
    assert two["input_ids"].count(image_id) == 2 * TOKENS_PER_IMAGE
    assert len(two["input_ids"]) - len(one["input_ids"]) == TOKENS_PER_IMAGE
    text = processor.tokenizer(
        processor.apply_chat_template(user(IMAGE, TEXT), add_generation_prompt=True), add_special_tokens=False
    ).input_ids
    expanded = [t for x in text for t in ([x] * TOKENS_PER_IMAGE if x == image_id else [x])]
    assert one["input_ids"] == expanded
    assert one["token_inputs"] == {}  # LLaVA has no token-aligned inputs
    standard = vision.encode(processor, "<image>Q", [png_bytes()])
    assert standard["input_ids"] == [image_id] * TOKENS_PER_IMAGE + processor.tokenizer("Q").input_ids


def test_encode_assistant_mask_covers_exactly_the_answer(processor):
    messages = [*user(IMAGE, TEXT), {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]
    out = vision.encode(processor, messages, [png_bytes()], assistant_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    answer = processor.tokenizer("red<|end|>", add_special_tokens=False).input_ids
    assert [t for t, m in zip(ids, mask) if m] == answer
    assert ids[-len(answer) :] == answer


def test_image_inputs_follow_row_order_and_skip_rows_without_images(processor):
    red, blue = Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 255))
    out = vision.image_inputs(processor, [[red], [], [blue, red]])
    assert set(out) == {"pixel_values"} and out["pixel_values"].shape == (3, 3, 32, 32)
    channel_means = out["pixel_values"].mean(dim=(2, 3))  # (3 images, RGB)
    assert channel_means[0, 0] > channel_means[0, 2] and channel_means[1, 2] > channel_means[1, 0]
    assert vision.image_inputs(processor, [[], []]) == {}
    assert vision.model_inputs({"input_ids": 1, "pixel_values": 2, "vision_inputs": ["pixel_values"]}) == {
        "pixel_values": 2
    }
    assert vision.model_inputs({"input_ids": 1}) == {}


# -- models: loading, freezing, LoRA ----------------------------------------------------------------------------


def config(**fields):
    from posttrain.config import TrainingConfig

    return TrainingConfig(**fields)


def test_vision_language_models_load_with_their_class_and_processor(vlm_dir, tiny_model_dir):
    assert vision.is_vision_language_model(str(vlm_dir))
    assert not vision.is_vision_language_model(str(tiny_model_dir))
    assert not vision.is_vision_language_model("")
    model = load_causal_lm(str(vlm_dir), config())
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    with pytest.raises(PosttrainError, match="holds no processor with an image processor"):
        load_processor(str(tiny_model_dir))


def test_parameter_parts_follow_transformers_module_names():
    assert vision.parameter_part("model.vision_tower.encoder.layers.0.mlp.fc1.weight") == "vision"
    assert vision.parameter_part("model.multi_modal_projector.linear_1.weight") == "projector"
    assert vision.parameter_part("model.visual.merger.mlp.0.weight") == "projector"  # Qwen2-VL
    assert vision.parameter_part("model.visual.blocks.0.attn.qkv.weight") == "vision"
    assert vision.parameter_part("model.connector.modality_projection.proj.weight") == "projector"  # Idefics3
    assert vision.parameter_part("model.language_model.layers.0.self_attn.q_proj.weight") == "language"
    assert vision.parameter_part("lm_head.weight") == "language"


@pytest.mark.parametrize(
    ("freeze", "trainable"),
    [
        ("none", {"vision", "projector", "language"}),
        ("vision", {"projector", "language"}),
        ("vision_and_projector", {"language"}),
    ],
)
def test_freeze_stops_gradients_to_the_named_parts(vlm_dir, freeze, trainable):
    model = load_causal_lm(str(vlm_dir), config())
    frozen = vision.freeze_parts(model, freeze)
    parts = {vision.parameter_part(n) for n, p in model.named_parameters() if p.requires_grad}
    assert parts == trainable
    assert all(vision.parameter_part(n) not in trainable for n in frozen)


def test_freeze_on_a_text_model_is_a_config_error(tiny_model_dir):
    model = load_causal_lm(str(tiny_model_dir), config())
    with pytest.raises(ConfigError, match="freeze is 'vision' but the model .* has no vision module"):
        vision.freeze_parts(model, "vision")
    assert vision.freeze_parts(model, "none") == []


@pytest.mark.parametrize(
    ("freeze", "adapted"),
    [("none", {"vision", "projector", "language"}), ("vision_and_projector", {"language"})],
)
def test_lora_goes_on_the_parts_that_are_not_frozen(vlm_dir, freeze, adapted):
    pytest.importorskip("peft")
    model = load_causal_lm(str(vlm_dir), config())
    model = apply_peft(model, config(use_peft=True, freeze=freeze))
    lora = {vision.parameter_part(n) for n, p in model.named_parameters() if "lora_" in n}
    assert lora == adapted
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


# -- the loop ---------------------------------------------------------------------------------------------------


def test_the_loop_refuses_images_for_a_text_method_or_a_text_model(vlm_dir, tiny_model_dir, tmp_path):
    from posttrain.loop import train
    from posttrain_kto import KTO, KTOConfig
    from posttrain_sft import SFT, SFTConfig

    rows = colour_rows(8, "prompt_completion")
    with pytest.raises(DataError, match="is not a vision-language model"):
        train(
            SFT(), SFTConfig(model=str(tiny_model_dir), output_dir=str(tmp_path / "a"), max_steps=1), train_dataset=rows
        )
    kto_rows = [{**r, "label": True} for r in rows]
    with pytest.raises(DataError, match="method 'kto' trains on text only"):
        train(KTO(), KTOConfig(model=str(vlm_dir), output_dir=str(tmp_path / "b"), max_steps=1), train_dataset=kto_rows)


def test_a_run_saves_the_processor_beside_the_model(vlm_dir, tmp_path):
    from posttrain.loop import train
    from posttrain_sft import SFT, SFTConfig

    out = tmp_path / "run"
    cfg = SFTConfig(
        model=str(vlm_dir), output_dir=str(out), max_steps=1, per_device_train_batch_size=4, disable_progress_bar=True
    )
    train(SFT(), cfg, train_dataset=colour_rows(4, "prompt_completion"))
    again = load_processor(str(out))
    assert vision.image_token_id(again) == vision.image_token_id(load_processor(str(vlm_dir)))
    assert type(load_causal_lm(str(out), cfg)).__name__ == "LlavaForConditionalGeneration"


def test_a_processor_given_as_tokenizer_brings_its_tokenizer(vlm_dir, processor, tmp_path):
    from posttrain import loop

    tokenizer, given = loop._tokenizer_and_processor(config(model=str(vlm_dir)), processor)
    assert given is processor and tokenizer is processor.tokenizer
    tokenizer, none = loop._tokenizer_and_processor(config(model=str(vlm_dir)), processor.tokenizer)
    assert none is None and tokenizer is processor.tokenizer


def test_row_problem_messages_name_row_field_and_fix():
    (problem,) = vision.image_problems({"images": ["/x.png"], "text": "<image>"}, 7, open_files=False)
    assert isinstance(problem, RowProblem)
    assert problem.message("train.jsonl").startswith("row 7 of train.jsonl: field 'images' image 0: image file")


def test_shape_images_show_their_colour():
    import random

    import numpy as np

    pixels = torch.from_numpy(np.asarray(shape_image("blue", random.Random(0)))).reshape(-1, 3)  # (32 * 32, RGB)
    assert pixels.shape == (32 * 32, 3)
    assert (pixels == torch.tensor([40, 60, 220])).all(-1).sum() >= (32 // 3) ** 2 * 0.7  # the disc or the square


def test_colour_exact_matches_string_and_chat_completions():
    completions = [
        "red",
        " blue\n",
        "redd",
        [{"role": "assistant", "content": "green"}],
        [{"role": "assistant", "content": "red"}],
    ]
    answers = ["red", "blue", "red", "green", "yellow"]
    assert colour_exact([None] * 5, completions, answers) == [1.0, 1.0, 0.0, 1.0, 0.0]
