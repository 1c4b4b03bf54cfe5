"""``posttrain chat MODEL_DIR``: a conversation with a model in the terminal.

Each line typed is a user turn; the answer streams back token by token. The conversation goes
through the tokenizer's chat template; a tokenizer without one gets a plain ``User:``/``Assistant:``
transcript. ``/exit`` or Ctrl-D ends the chat, ``/reset`` forgets the conversation, Ctrl-C stops
an answer (and ends the chat at the prompt). Reading stdin from a pipe works the same way, without
the prompt marker, so the chat can be scripted.
"""

from __future__ import annotations

import argparse
import sys

from posttrain.cli import generate as gen

HELP = "commands: /exit (or Ctrl-D) quits, /reset forgets the conversation, /help shows this"


class Conversation:
    """The turns so far, rendered to prompt ids; the oldest turns are dropped to fit the context."""

    def __init__(self, tokenizer, system: str | None, templated: bool, context: int | None, reserve: int):
        self.tokenizer, self.templated = tokenizer, templated
        self.system = [{"role": "system", "content": system}] if system else []
        self.turns: list[dict] = []
        self.context, self.reserve = context, reserve

    def reset(self) -> None:
        self.turns = []

    def _ids(self) -> list[int]:
        if self.templated:
            return gen.encode(self.tokenizer, self.system + self.turns)
        lines = [f"{'User' if t['role'] == 'user' else 'Assistant'}: {t['content']}" for t in self.turns]
        return gen.encode(self.tokenizer, [], raw_text="\n".join(lines) + "\nAssistant:")

    def prompt_ids(self) -> tuple[list[int], int]:
        """(ids, turns dropped): keep the system message and the newest turns that fit."""
        ids, dropped = self._ids(), 0
        while self.context and len(ids) + self.reserve > self.context and len(self.turns) > 1:
            n = 2 if len(self.turns) > 2 else 1  # a user turn and its answer
            self.turns, dropped = self.turns[n:], dropped + n
            ids = self._ids()
        return ids, dropped


def run(command: str, argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="posttrain chat",
        description="Chat with a model directory; answers stream token by token. " + HELP + ".",
    )
    gen.add_model_args(p)
    args = p.parse_args(argv)
    kwargs = gen.sampling_kwargs(args)
    model, tokenizer, device = gen.load(args)
    templated = gen.has_chat_template(tokenizer) and not args.raw
    if args.system and not templated:
        print("note: --system is ignored without a chat template", file=sys.stderr)
    if not templated and "stop_strings" not in kwargs:
        kwargs.update(stop_strings=["\nUser:"], tokenizer=tokenizer)  # the transcript's next turn ends the answer
    context = getattr(model.config, "max_position_embeddings", None)
    chat = Conversation(tokenizer, args.system, templated, context, args.max_new_tokens)
    interactive = sys.stdin.isatty()
    why = "--raw" if args.raw else "the tokenizer has no chat template"
    mode = "chat template" if templated else f"plain User:/Assistant: transcript ({why})"
    print(f"chatting with {args.model_dir} on {device}, {mode}. {HELP}.", file=sys.stderr)
    gen.seed_everything(args.seed)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:  # Ctrl-D, or the end of piped input
            if interactive:
                print()
            return 0
        except KeyboardInterrupt:
            print()
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            chat.reset()
            print("(conversation forgotten)", file=sys.stderr)
            continue
        if text == "/help":
            print(HELP, file=sys.stderr)
            continue
        if text.startswith("/"):
            print(f"unknown command {text.split()[0]!r}; {HELP}", file=sys.stderr)
            continue
        chat.turns.append({"role": "user", "content": text})
        ids, dropped = chat.prompt_ids()
        if dropped:
            print(f"(dropped the {dropped} oldest messages to fit the {context}-token context)", file=sys.stderr)
        reply = gen.stream(model, tokenizer, ids, kwargs, sys.stdout)
        sys.stdout.write("\n")
        sys.stdout.flush()
        if not templated:
            reply = reply.split("\nUser:")[0]
        chat.turns.append({"role": "assistant", "content": reply.strip()})
