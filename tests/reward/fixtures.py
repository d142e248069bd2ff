"""Reward functions the test servers load by import path (``tests.reward.fixtures:NAME``)."""

import time


def count_letter_a(prompts: list[str], responses: list[str]) -> list[float]:
    """Reward = how many times "a" occurs in the response (the prompt does not count)."""
    return [float(response.count("a")) for response in responses]


def misbehave_on_command(prompts: list[str], responses: list[str]) -> list[float]:
    """Like count_letter_a, unless a response is a command: "raise" raises, "nan" gives a NaN,
    "drop" returns one reward too few, "sleep:S" sleeps S seconds first."""
    rewards = count_letter_a(prompts, responses)
    for i, response in enumerate(responses):
        if response == "raise":
            raise RuntimeError("the reward function was told to raise")
        if response == "nan":
            rewards[i] = float("nan")
        if response == "drop":
            rewards.pop()
        if response.startswith("sleep:"):
            time.sleep(float(response.removeprefix("sleep:")))
    return rewards
