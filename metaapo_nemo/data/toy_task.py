"""The embedded task of recipe ``tiny_cpu``: reverse a short string of letters.

A prompt is ``rev:<letters>=`` (4 to 8 letters from ``LETTERS``; ``task.min_letters`` and
``task.max_letters`` set the range) and the right answer is the letters reversed: ``rev:abcd=`` ->
``dcba``. Every piece the pipeline needs is generated here, so
the whole MetaAPO loop (SFT, DPO warm-up, online iterations) runs on a laptop CPU with no download:

- ``build_tokenizer``: a character-level tokenizer (one token per character, plus ``<pad>``,
  ``<bos>``, ``<eos>``, ``<unk>``) that saves and reloads as a Hugging Face tokenizer.
- ``reward``: a programmatic reward model, ``1 - edit_distance / max(len(answer), len(response))``
  with all whitespace removed from the response first. It is graded (one wrong letter of eight
  scores 0.875, a missing letter 0.875, the input copied unreversed much less), so the best and
  worst of K samples differ and an online pair carries information even when no sample is perfect.
- ``sft_responses``: a noisy demonstrator (right answers with random per-letter substitutions,
  deletions and insertions). A model fine-tuned on it imitates the noise: its samples at
  temperature 1 score well below 1 on average while the best of 8 is usually perfect, which is
  the room online preference optimisation has to improve the policy.
- ``offline_pairs``: preference pairs from a *different* behaviour policy; the chosen answer is
  the better of two of its samples by reward. Three knobs (``task.offline_*``) set how good and
  how off-policy the pairs are:

  - ``offline_correct`` (quality): the probability that one behaviour sample is the right answer.
  - ``offline_informative`` (quality): the share of the behaviour's mistakes that are the
    policy's own kind, one demonstrator error at one letter (edit distance 1 from the answer);
    the others are systematic mistakes the policy does not make (dropping the last letter,
    doubling a letter, swapping neighbours, rotating, copying the input unreversed).
  - ``offline_shift`` (distribution shift): the probability that each gap between two letters of
    a behaviour response holds a space (``dcba`` -> ``d cb a``). The reward ignores whitespace,
    so the shift costs no reward, but the responses' token sequences are far from what the policy
    writes (it never saw a space). Removing all whitespace instead of stripping the ends changed
    no score of a response without inner whitespace.

  ``offline_correct=0.04, offline_informative=0, offline_shift=0`` (EmbeddedTaskConfig's
  defaults) give byte for byte the pairs of the task before these knobs: chosen answers right
  only ~11% of the time and showing mistakes the policy does not make, on-policy spacing. Offline
  DPO on them gains little or lowers the reward, while best/worst pairs of the policy's own
  samples lift it, the opposite of the paper's premise. Recipe ``tiny_cpu`` sets the paper's
  regime instead, high-quality but off-policy offline data against on-policy but weaker samples
  of the policy (see recipes/tiny_cpu.py for the values and what they measured).

Measured on the legacy pairs in a plain-torch prototype (HF Llama, 0.75M parameters, SFT as in ``sft_responses``;
DPO beta 0.1, lr 5e-5, 60 steps of 32 prompts): held-out mean sampled reward went 0.80 -> 0.75
with offline DPO (answers grew longer) and 0.80 -> 0.86 with online DPO on best/worst of 8.
"""

import random
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where the tokenizer is built: the reward server's process never needs them (~1 s)
    from transformers import PreTrainedTokenizerFast

LETTERS = "abcdefgh"
MIN_LETTERS, MAX_LETTERS = 4, 8
PROMPT_PREFIX, PROMPT_SUFFIX = "rev:", "="
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
# The whole lower-case alphabet, digits and a little punctuation: the reward server and tests may
# see text beyond the task's own letters, and it should tokenize without <unk>.
CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789 :=.,?!'-"

_PROMPT_PATTERN = re.compile(re.escape(PROMPT_PREFIX) + r"([a-z]*)" + re.escape(PROMPT_SUFFIX))


def build_tokenizer() -> "PreTrainedTokenizerFast":
    """A character-level tokenizer for the task, with bos/eos/pad set and no chat template.

    Encoding adds no special tokens by itself (``batching.encode_prompt`` prepends ``<bos>``).
    Decoding joins characters without spaces, so ``decode(encode(s)) == s``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + tuple(CHARACTERS))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def make_prompts(n: int, seed: int, exclude: set[str] | frozenset[str] = frozenset(),
                 min_letters: int = MIN_LETTERS, max_letters: int = MAX_LETTERS) -> list[str]:
    """``n`` distinct prompts drawn from ``random.Random(seed)``, none of them in ``exclude``, each
    of ``min_letters`` to ``max_letters`` letters (uniform; the defaults are the original task).

    Pass the training prompts as ``exclude`` to draw a disjoint held-out set.
    """
    if not 1 <= min_letters <= max_letters:
        raise ValueError(f"letters per prompt {min_letters}..{max_letters}: need 1 <= task.min_letters <= task.max_letters")
    rng = random.Random(seed)
    prompts: list[str] = []
    seen = set(exclude)
    while len(prompts) < n:
        length = rng.randint(min_letters, max_letters)
        prompt = PROMPT_PREFIX + "".join(rng.choice(LETTERS) for _ in range(length)) + PROMPT_SUFFIX
        if prompt not in seen:
            seen.add(prompt)
            prompts.append(prompt)
    return prompts


def answer(prompt: str) -> str:
    """The correct response to a prompt: its letters reversed.

    The last ``rev:<letters>=`` in the text counts, so a prompt wrapped in other text (a chat
    template, a leading ``<bos>``) still works.
    """
    matches = _PROMPT_PATTERN.findall(prompt)
    if not matches:
        raise ValueError(
            f"toy task prompt {prompt!r} holds no '{PROMPT_PREFIX}<letters>{PROMPT_SUFFIX}'; "
            "the toy reward only scores prompts made by toy_task.make_prompts"
        )
    return matches[-1][::-1]


def _edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (unit-cost substitution, insertion, deletion), by Myers' bit-parallel
    algorithm in Hyyro's form for the global distance: one column of the dynamic programme per
    character of ``b`` as a few integer operations, so 80-letter answers cost what 8-letter ones
    did in the plain O(len(a) len(b)) loop (tested equal to it)."""
    if not a or not b:
        return len(a) + len(b)
    high, mask = 1 << (len(a) - 1), (1 << len(a)) - 1
    peq: dict[str, int] = {}  # per character, the positions of a that hold it
    for i, char in enumerate(a):
        peq[char] = peq.get(char, 0) | 1 << i
    pv, mv, distance = mask, 0, len(a)  # vertical +1 / -1 deltas of the current column
    for char in b:
        eq = peq.get(char, 0)
        xv = eq | mv
        xh = (((eq & pv) + pv) ^ pv) | eq
        ph, mh = mv | ~(xh | pv), pv & xh
        distance += 1 if ph & high else -1 if mh & high else 0
        ph, mh = (ph << 1) | 1, mh << 1
        pv, mv = (mh | ~(xv | ph)) & mask, ph & xv & mask
    return distance


def reward(prompts: list[str], responses: list[str]) -> list[float]:
    """Score each response in [0, 1]: ``1 - edit_distance(response, answer) / max(lengths)``.

    1.0 exactly for the right answer; each wrong, missing or extra letter costs about one letter's
    share, and a response much longer than the answer tends to 0. All whitespace in the response
    is ignored (``"d cb a"`` scores as ``"dcba"``), so the offline pairs' spacing shift costs no
    reward; a response without inner whitespace scores as it did when only its ends were stripped.
    """
    if len(prompts) != len(responses):
        raise ValueError(
            f"reward got {len(prompts)} prompts but {len(responses)} responses; pass one response per prompt"
        )
    scores = []
    for prompt, response in zip(prompts, responses):
        target, response = answer(prompt), "".join(response.split())
        longest = max(len(target), len(response))
        scores.append(1.0 if longest == 0 else 1.0 - _edit_distance(response, target) / longest)
    return scores


def _one_letter_error(char: str, rng: random.Random) -> str:
    """What ``char`` becomes under one demonstrator error: replaced (60%), dropped (20%) or followed
    by an extra random letter (20%)."""
    kind = rng.random()
    if kind < 0.6:
        return rng.choice(LETTERS.replace(char, ""))
    return "" if kind < 0.8 else char + rng.choice(LETTERS)


def _noisy(target: str, rng: random.Random, noise: float) -> str:
    """The demonstrator's answer: each letter independently kept, or with probability ``noise``
    given one ``_one_letter_error``."""
    return "".join(_one_letter_error(char, rng) if rng.random() < noise else char for char in target)


def sft_responses(prompts: list[str], seed: int, noise: float = 0.15) -> list[str]:
    """Demonstrations for supervised fine-tuning: right answers with random per-letter errors.

    With the default ``noise`` the demonstrations score 0.86 on average and 39% are perfect. The
    0.75M-parameter Llama of ``tiny_cpu`` fine-tuned on 8192 of them (600 steps of 64, lr 3e-3)
    sampled at temperature 1 with mean reward 0.80 and best-of-8 0.98 on held-out prompts (greedy
    0.985): it learns the task and imitates the noise.
    """
    rng = random.Random(seed)
    return [_noisy(answer(prompt), rng, noise) for prompt in prompts]


def _informative_mistake(target: str, rng: random.Random) -> str:
    """A mistake of the policy's own kind: one demonstrator error (``_one_letter_error``) at one
    position, so exactly one edit from the right answer."""
    position = rng.randrange(len(target))
    return target[:position] + _one_letter_error(target[position], rng) + target[position + 1 :]


def _systematic_mistake(target: str, letters: str, rng: random.Random) -> str:
    """One of the behaviour policy's own mistakes, drawn so that it really changes the answer."""
    position = rng.randrange(len(target))
    swaps = [i for i in range(len(target) - 1) if target[i] != target[i + 1]]
    mistakes = {
        "drop the last letter": (0.25, target[:-1]),
        "double a letter": (0.20, target[: position + 1] + target[position:]),
        "copy the input": (0.15, letters),
        "rotate by one": (0.15, target[1:] + target[0]),
    }
    if swaps:
        i = rng.choice(swaps)
        mistakes["swap neighbours"] = (0.25, target[:i] + target[i + 1] + target[i] + target[i + 2 :])
    mistakes = {name: (weight, text) for name, (weight, text) in mistakes.items() if text != target}
    weights, texts = zip(*mistakes.values())
    return rng.choices(texts, weights=weights)[0]


def _behaviour_response(letters: str, rng: random.Random, informative_rng: random.Random,
                        correct: float, informative: float) -> str:
    """One sample of the offline behaviour policy: the right answer with probability ``correct``,
    else an informative mistake with probability ``informative``, else a systematic one.
    ``informative_rng`` is drawn from only when ``informative > 0``, so ``rng`` alone decides the
    legacy behaviour."""
    target = letters[::-1]
    if rng.random() < correct:
        return target
    if informative > 0 and informative_rng.random() < informative:
        return _informative_mistake(target, informative_rng)
    return _systematic_mistake(target, letters, rng)


def _spaced(text: str, rng: random.Random, shift: float) -> str:
    """``text`` with a space in each gap between two letters with probability ``shift``."""
    if shift == 0:
        return text
    return text[:1] + "".join((" " if rng.random() < shift else "") + char for char in text[1:])


def offline_pairs(prompts: list[str], seed: int, correct: float = 0.04, informative: float = 0.0,
                  shift: float = 0.0) -> list[dict[str, str]]:
    """Offline preference pairs ``{"prompt", "chosen", "rejected"}`` from the behaviour policy.

    Two behaviour samples are drawn per prompt until their rewards differ (a palindrome prompt,
    where every mistake may tie, gets at most 100 draws and then keeps a tied pair); the higher
    reward is chosen. Then both responses get spaces at rate ``shift`` (``_spaced``), which the
    reward ignores. ``correct``, ``informative`` and ``shift`` are ``task.offline_correct``,
    ``task.offline_informative`` and ``task.offline_shift`` (see the module docstring); the
    informative mistakes and the spaces come from their own random streams, so the defaults give
    exactly the pairs of the version before these knobs.
    """
    for key, value in (("task.offline_correct", correct), ("task.offline_informative", informative),
                       ("task.offline_shift", shift)):
        if not 0 <= value <= 1:
            raise ValueError(f"{key}={value}: it is a probability, give a value in [0, 1]")
    rng = random.Random(seed)
    informative_rng, shift_rng = random.Random(f"{seed}:informative"), random.Random(f"{seed}:shift")
    pairs = []
    for prompt in prompts:
        letters = answer(prompt)[::-1]
        for _ in range(100):
            first, second = (_behaviour_response(letters, rng, informative_rng, correct, informative) for _ in range(2))
            first_reward, second_reward = reward([prompt, prompt], [first, second])
            if first_reward != second_reward:
                break
        chosen, rejected = (first, second) if first_reward >= second_reward else (second, first)
        pairs.append({"prompt": prompt, "chosen": _spaced(chosen, shift_rng, shift),
                      "rejected": _spaced(rejected, shift_rng, shift)})
    return pairs
