"""Test helpers and the conformance kit for method plugins.

``build_tiny_model`` / ``build_tokenizer`` make hub-free tiny models. The conformance kit is a pytest
plugin that a method package opts into with ``pytest_plugins = ["posttrain.testing.kit"]``.
"""

from posttrain.testing.tiny import CHAT_TEMPLATE, build_tiny_model, build_tokenizer

__all__ = ["CHAT_TEMPLATE", "build_tiny_model", "build_tokenizer"]
