"""padding_free with image prompts: true is refused by name, auto keeps them padded."""

import datasets
import pytest
from posttrain import ConfigError, TrainContext
from posttrain.models import load_processor
from posttrain.testing import build_tiny_vlm, colour_rows
from posttrain_grpo import GRPO, GRPOConfig


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    return load_processor(str(build_tiny_vlm(tmp_path_factory.mktemp("grpo-vlm") / "model")))


def test_padding_free_true_refuses_image_prompts(processor):
    rows = datasets.Dataset.from_list(colour_rows(2, "prompt_only", conversational=False))
    config = GRPOConfig(padding_free=True, reward_funcs=["grpo_first_is_digit"], num_generations=2)
    ctx = TrainContext(config=config, tokenizer=processor.tokenizer, processor=processor, training=False)
    with pytest.raises(ConfigError, match="padding_free is true, but the dataset has images"):
        GRPO().prepare(rows, ctx)
    config = GRPOConfig(reward_funcs=["grpo_first_is_digit"], num_generations=2)  # auto
    ctx = TrainContext(config=config, tokenizer=processor.tokenizer, processor=processor, training=False)
    assert len(GRPO().prepare(rows, ctx)) == 2
