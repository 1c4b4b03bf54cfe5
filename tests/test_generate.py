"""``posttrain generate`` and ``posttrain chat`` on a tiny random model (CPU, seconds)."""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys

import pytest
from posttrain.cli import generate as gen
from posttrain.cli import main
from posttrain.cli.chat import Conversation


def reference_greedy(model_dir, messages, max_new_tokens: int) -> str:
    """The completion transformers' own generate gives for the chat-templated prompt, greedily."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tok(text, add_special_tokens=False).input_ids])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens
        )
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_generate_greedy_matches_transformers(tiny_model_dir, capsys):
    code = main(["generate", str(tiny_model_dir), "--prompt", "hi", "--temperature", "0", "--max_new_tokens", "12"])
    assert code == 0
    out = capsys.readouterr().out
    expected = reference_greedy(tiny_model_dir, [{"role": "user", "content": "hi"}], 12)
    assert expected and out == expected + "\n"


def test_generate_system_message_and_raw_prompt(tiny_model_dir, capsys):
    argv = ["generate", str(tiny_model_dir), "--prompt", "hi", "--temperature", "0", "--max_new_tokens", "8"]
    assert main([*argv, "--system", "be brief"]) == 0
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert capsys.readouterr().out == reference_greedy(tiny_model_dir, messages, 8) + "\n"
    assert main([*argv, "--raw", "--system", "x"]) == 2
    assert "--system needs a chat template" in capsys.readouterr().err


def test_seeded_sampling_is_reproducible(tiny_model_dir, capsys):
    argv = ["generate", str(tiny_model_dir), "--prompt", "abc", "--max_new_tokens", "16", "--temperature", "1.5"]
    outputs = []
    for seed in ("1", "1", "2"):
        assert main([*argv, "--seed", seed, "--top_k", "0", "--top_p", "1.0"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0] != outputs[2]


def test_sampling_flags():
    def kwargs(**flags):
        base = {"max_new_tokens": 5, "temperature": None, "top_p": None, "top_k": None}
        return gen.sampling_kwargs(argparse.Namespace(**{**base, **flags}))

    assert kwargs() == {"max_new_tokens": 5}  # the model's generation_config decides
    assert kwargs(temperature=0) == {"max_new_tokens": 5, "do_sample": False}
    assert kwargs(temperature=0.7, top_k=20) == {
        "max_new_tokens": 5,
        "temperature": 0.7,
        "top_k": 20,
        "do_sample": True,
    }
    for bad in ({"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -2}, {"max_new_tokens": 0}):
        with pytest.raises(Exception, match="must be"):
            kwargs(**bad)


def test_output_streams_token_by_token(tiny_model_dir):
    """Every generated token is written as it comes: as many writes as printable tokens."""
    model, tokenizer, _ = gen.load(
        argparse.Namespace(model_dir=str(tiny_model_dir), device="cpu", dtype="auto", trust_remote_code=False)
    )

    class Recorder(io.StringIO):
        writes: list[str] = []

        def write(self, text):
            self.writes.append(text)
            return super().write(text)

    out = Recorder()
    ids = gen.encode(tokenizer, [{"role": "user", "content": "hello"}])
    text = gen.stream(model, tokenizer, ids, {"max_new_tokens": 10, "do_sample": False}, out)
    assert "".join(out.writes) == text and len(out.writes) >= 5  # one write per (character-level) token
    assert all(len(w) == 1 for w in out.writes)


def test_conversation_keeps_the_newest_turns_that_fit(tiny_model_dir):
    from posttrain.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    chat = Conversation(tok, "sys", templated=True, context=None, reserve=0)
    chat.turns = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "1"}]
    chat.turns.append({"role": "user", "content": "two"})
    ids, dropped = chat.prompt_ids()
    assert dropped == 0 and ids == gen.encode(tok, [{"role": "system", "content": "sys"}, *chat.turns])
    chat.context, chat.reserve = len(ids) - 1, 0  # one token too many: the oldest exchange goes
    ids, dropped = chat.prompt_ids()
    assert dropped == 2 and chat.turns == [{"role": "user", "content": "two"}]
    plain = Conversation(tok, None, templated=False, context=None, reserve=0)
    plain.turns = [{"role": "user", "content": "hi"}]
    assert tok.decode(plain.prompt_ids()[0]) == "User: hi\nAssistant:"


def run_chat(model_dir, stdin: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "posttrain",
            "chat",
            str(model_dir),
            "--max_new_tokens",
            "6",
            "--temperature",
            "0",
            *flags,
        ],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_chat_through_stdin(tiny_model_dir):
    out = run_chat(tiny_model_dir, "hello\n/help\n/reset\nhello\n/exit\nnot read\n")
    assert out.returncode == 0, out.stderr
    replies = out.stdout.splitlines()
    # greedy, and the conversation was reset: the same first turn gives the same answer twice
    assert len(replies) == 2 and replies[0] == replies[1]
    assert replies[0] == reference_greedy(tiny_model_dir, [{"role": "user", "content": "hello"}], 6)
    assert "conversation forgotten" in out.stderr and "/exit (or Ctrl-D)" in out.stderr
    assert "Traceback" not in out.stderr


def test_chat_ends_at_end_of_input_and_keeps_history(tiny_model_dir):
    out = run_chat(tiny_model_dir, "hello\nagain\n")  # no /exit: end of input (Ctrl-D) ends the chat
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()
    history = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": first.strip()}]
    assert second == reference_greedy(tiny_model_dir, [*history, {"role": "user", "content": "again"}], 6)


def test_model_directory_errors(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "run" / "checkpoint-4").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint-12").mkdir()
    assert main(["chat", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "holds checkpoints but no final model" in err and "checkpoint-12" in err
