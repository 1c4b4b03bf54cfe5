"""Test helpers and the conformance kit for method plugins.

``build_tiny_model`` / ``build_tokenizer`` make hub-free tiny models; ``build_echo_model`` and
``echo_exact_probability`` give online-RL tests a verifiable task with a noise-free learning measure;
``build_tiny_vlm`` / ``colour_rows`` a tiny vision-language model and an image task ("what colour is the shape?").
The conformance kit is a pytest plugin that a method package opts into with
``pytest_plugins = ["posttrain.testing.kit"]``.
"""

from posttrain.testing.echo_task import build_echo_model, echo_exact, echo_exact_probability, echo_rows
from posttrain.testing.tiny import CHAT_TEMPLATE, build_tiny_model, build_tokenizer
from posttrain.testing.vision_task import (
    COLOURS,
    VISION_CHAT_TEMPLATE,
    build_colour_vlm,
    build_tiny_vlm,
    colour_exact,
    colour_exact_probability,
    colour_logps,
    colour_rows,
    shape_image,
)

__all__ = [
    "CHAT_TEMPLATE",
    "COLOURS",
    "VISION_CHAT_TEMPLATE",
    "build_colour_vlm",
    "build_echo_model",
    "build_tiny_model",
    "build_tiny_vlm",
    "build_tokenizer",
    "colour_exact",
    "colour_exact_probability",
    "colour_logps",
    "colour_rows",
    "echo_exact",
    "echo_exact_probability",
    "echo_rows",
    "shape_image",
]
