"""The reward_model reward against a tiny sequence classifier built locally."""

from __future__ import annotations

import pytest
import torch
from posttrain_rewards import make_reward_model_reward, reward_model
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer


def direct_scores(path, texts, standard=True):
    """Scores one text at a time; standard texts end in EOS, as posttrain-reward trains on them."""
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        return [
            float(model(**tok(t + (tok.eos_token if standard else ""), return_tensors="pt")).logits[0, 0])
            for t in texts
        ]


def score_tolerance(scores) -> float:
    """Scores of one text batched (right-padded) and alone: the same forward pass grouped differently, equal up to
    its rounding (posttrain.testing._rounding.rounding_tolerance), for numbers of the scores' size plus the hidden scale
    ~1. Reading a padding token or the wrong row moves a score by ~0.1 or more."""
    from posttrain.testing._rounding import LOGPROB_ROUNDINGS, rounding_tolerance

    return rounding_tolerance(max(abs(x) for x in scores) + 1.0, LOGPROB_ROUNDINGS)


def test_scores_equal_the_model_output_one_text_at_a_time(rewards_tiny_rm):
    """Batched with right padding, each score is the classifier's logit on prompt + completion + EOS alone."""
    reward = make_reward_model_reward(str(rewards_tiny_rm), batch_size=2)
    prompts, completions = ["Q: 2+2? A:", "Q: hi A:", "x"], [" 4", " hello there", "yz"]
    got = reward(prompts, completions)
    expected = direct_scores(rewards_tiny_rm, [p + c for p, c in zip(prompts, completions)])
    assert got == pytest.approx(expected, abs=score_tolerance(expected))
    assert len(set(got)) == 3


def test_conversational_texts_use_the_chat_template(rewards_tiny_rm):
    prompt = [{"role": "user", "content": "hi"}]
    completion = [{"role": "assistant", "content": "hey"}]
    got = make_reward_model_reward(str(rewards_tiny_rm))([prompt], [completion])
    expected = direct_scores(rewards_tiny_rm, ["<|user|>hi<|end|><|assistant|>hey<|end|>"], standard=False)
    assert got == pytest.approx(expected, abs=score_tolerance(expected))


def test_registered_reward_reads_the_path_from_options_column_or_deprecated_env(rewards_tiny_rm, monkeypatch):
    from posttrain.rewards import RewardSet

    with pytest.raises(ValueError, match=r"reward_kwargs: \{reward_model: \{path"):
        reward_model(["a"], ["b"])
    configured = RewardSet.resolve(
        ["reward_model"], kwargs={"reward_model": {"path": str(rewards_tiny_rm)}}, given={"reward_model": reward_model}
    )
    from_options = configured.score(["a", "c"], ["b", "d"]).flatten().tolist()
    from_column = reward_model(["a", "c"], ["b", "d"], reward_model_path=[str(rewards_tiny_rm)] * 2)
    monkeypatch.setenv("POSTTRAIN_REWARD_MODEL", str(rewards_tiny_rm))
    with pytest.warns(FutureWarning, match="POSTTRAIN_REWARD_MODEL is deprecated"):
        from_env = reward_model(["a", "c"], ["b", "d"])
    expected = direct_scores(rewards_tiny_rm, ["ab", "cd"])
    assert from_options == pytest.approx(expected, abs=score_tolerance(expected))
    assert from_column == from_env == pytest.approx(expected, abs=score_tolerance(expected))


def test_bad_paths_and_multi_label_models_are_explained(rewards_tiny_rm, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        make_reward_model_reward(str(tmp_path / "nowhere"))(["a"], ["b"])
    config = AutoConfig.from_pretrained(rewards_tiny_rm, num_labels=3)
    model = AutoModelForSequenceClassification.from_config(config)
    model.save_pretrained(tmp_path / "three")
    AutoTokenizer.from_pretrained(rewards_tiny_rm).save_pretrained(tmp_path / "three")
    with pytest.raises(ValueError, match="has 3 labels"):
        make_reward_model_reward(str(tmp_path / "three"))(["a"], ["b"])
