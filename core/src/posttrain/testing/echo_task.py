"""A verifiable toy task for online-RL tests: answer ``echo D`` with the digit ``D``.

``build_echo_model`` teaches a tiny model the answer format with a short cross-entropy loop in which
half of the targets are a random digit, so the model starts well below perfect and RL has something to
improve. ``echo_exact_probability`` measures what RL should raise *without sampling noise*: the
probability, averaged over the ten prompts, that the policy samples exactly the right digit then EOS.
The per-step ``reward`` metric of a run is a sample mean over a few completions and swings by ±0.2
between steps, which is why a learning test should not compare it directly.
"""

from __future__ import annotations

import random
from pathlib import Path

ANSWER_FORMAT = "echo {digit}"


def echo_rows(n: int = 40) -> list[dict]:
    """Prompt-only rows ``{"prompt": "echo D", "answer": "D"}`` cycling through the ten digits.

    .. versionadded:: 0.1
    """
    return [{"prompt": ANSWER_FORMAT.format(digit=i % 10), "answer": str(i % 10)} for i in range(n)]


def echo_exact(prompts, completions, answer, **columns) -> list[float]:
    """Verifier: 1.0 when the completion (stripped) equals the ``answer`` column.

    .. versionadded:: 0.1
    """
    return [float(c.strip() == a) for c, a in zip(completions, answer)]


def build_echo_model(path: str | Path, seed: int = 0, sft_steps: int = 400) -> Path:
    """A tiny model at ``path/echo`` that answers ``echo D`` with one digit and EOS, right ~20-55% of the time.

    Runs in one torch thread (restored afterwards) so the result does not depend on the caller's setting.

    .. versionadded:: 0.1
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.testing.tiny import build_tiny_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base = build_tiny_model(Path(path) / "model", seed=seed)
        tok = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base)
        rng = random.Random(seed)
        torch.manual_seed(seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        digit_ids = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]
        for _ in range(sft_steps):
            rows = []
            for _ in range(16):
                d = rng.randrange(10)
                target = d if rng.random() < 0.5 else rng.randrange(10)
                rows.append([*tok(ANSWER_FORMAT.format(digit=d)).input_ids, digit_ids[target], tok.eos_token_id])
            x = torch.tensor(rows)
            labels = x[:, 1:].clone()
            labels[:, :-2] = -100  # learn the answer digit and EOS only
            logits = model(input_ids=x).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        out = Path(path) / "echo"
        model.save_pretrained(out)
        tok.save_pretrained(out)
        return out
    finally:
        torch.set_num_threads(threads)


def echo_exact_probability(model_dir: str | Path) -> float:
    """Mean over the ten prompts of p(right digit) * p(EOS | right digit): the expected verifier reward of
    the two-token answer at temperature 1, computed exactly from the logits (float64 softmax).

    .. versionadded:: 0.1
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total = 0.0
    with torch.no_grad():
        for d in range(10):
            ids = [*tok(ANSWER_FORMAT.format(digit=d)).input_ids, tok.convert_tokens_to_ids(str(d))]
            logps = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
            n = len(ids)
            total += float(torch.exp(logps[n - 2, ids[-1]] + logps[n - 1, tok.eos_token_id]))
    return total / 10
