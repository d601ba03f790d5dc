"""A DocVQA-like length distribution built from the spec's token formula, and the batch policies over it.

Token counts follow spec section 3 exactly (`hd_output_size` + `num_image_tokens`), so only the page shapes
are modelled: scanned documents, mostly US-letter portraits, some A4-like or taller pages, a few receipts and
landscape pages. Only the aspect ratio decides the tile grid (the HD transform rescales every page to
`scale * 336` wide), and the share of letter-like pages is solved for so that the mean length at num_crops 16
is the spec's 2,443 tokens (section 7). The same pages give the lengths at any other num_crops.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from common.data.collator import hd_output_size
from common.model.image_processing_phi3v import num_image_tokens

DOCVQA_MEAN_TOKENS = 2443
DOCVQA_NUM_CROPS = 16
# The reference prompt as the tiny tokenizer encodes it: `<s><|user|>\n` before the image run, then
# `<s>\n{question}\nAnswer briefly.<|end|>\n<|assistant|>\n` (12 ids besides the question).
PROMPT_HEAD_IDS = [1, 32010, 13]
PROMPT_TAIL_TEMPLATE_TOKENS = 12
ANSWER_SUFFIX_IDS = [32007, 13, 32000]  # <|end|>\n<|endoftext|>
PAD_ID = 32000
TEXT_VOCAB = 32000
QUESTION_TOKENS = (10, 30)
ANSWER_TOKENS = (2, 8)

# Long side / short side of the page kinds other than letter-like, with their fixed shares; at num_crops 16
# letter-like pages get 4x4 tiles, A4-like ones 4x3, receipts 5x3 or 5x2.
LETTER_ASPECT = (1.22, 1.33)
OTHER_PAGES = (((1.34, 1.60), 0.15), ((1.70, 2.60), 0.05))
LANDSCAPE_SHARE = 0.08


@dataclass(frozen=True)
class Example:
    page_size: tuple[int, int]  # (width, height) in pixels, as PIL reports it
    hd_size: tuple[int, int]  # (H, W) after the HD transform
    image_tokens: int
    question_tokens: int
    answer_tokens: int  # answer text plus the `<|end|>\n<|endoftext|>` suffix: the labelled positions

    @property
    def length(self) -> int:
        return len(PROMPT_HEAD_IDS) + self.image_tokens + PROMPT_TAIL_TEMPLATE_TOKENS + self.question_tokens + self.answer_tokens

    @property
    def tiles(self) -> int:
        return (self.hd_size[0] // 336) * (self.hd_size[1] // 336)


def _page(uniforms: tuple[float, ...], letter_share: float) -> tuple[int, int]:
    kind, within, orientation, scale = uniforms
    if kind < letter_share:
        low, high = LETTER_ASPECT
    else:
        # The other kinds split the remaining share in their fixed proportions.
        position = (kind - letter_share) / (1 - letter_share) * sum(share for _, share in OTHER_PAGES)
        for (low, high), share in OTHER_PAGES:
            if position < share:
                break
            position -= share
    aspect = low + within * (high - low)
    long_side = round(2000 + 400 * scale)
    short_side = round(long_side / aspect)
    return (long_side, short_side) if orientation < LANDSCAPE_SHARE else (short_side, long_side)


def _draws(count: int, seed: int) -> list[tuple[tuple[float, ...], int, int]]:
    rng = random.Random(seed)
    return [
        (tuple(rng.random() for _ in range(4)), rng.randint(*QUESTION_TOKENS), rng.randint(*ANSWER_TOKENS))
        for _ in range(count)
    ]


def _examples(draws, letter_share: float, num_crops: int) -> list[Example]:
    examples = []
    for uniforms, question, answer in draws:
        page = _page(uniforms, letter_share)
        hd_size = hd_output_size(page, num_crops)
        tokens = num_image_tokens(*hd_size)
        examples.append(Example(page, hd_size, tokens, question, answer + len(ANSWER_SUFFIX_IDS)))
    return examples


def _mean_length(examples: list[Example]) -> float:
    return sum(e.length for e in examples) / len(examples)


def docvqa_like(count: int, num_crops: int = DOCVQA_NUM_CROPS, seed: int = 0) -> list[Example]:
    """`count` examples whose mean length at num_crops 16 is ~2,443 tokens, at the given num_crops."""
    draws = _draws(count, seed)
    low, high = 0.0, 1.0
    # The mean grows with the letter-like share (they are the longest); bisect the share on these very draws.
    for _ in range(30):
        middle = (low + high) / 2
        if _mean_length(_examples(draws, middle, DOCVQA_NUM_CROPS)) < DOCVQA_MEAN_TOKENS:
            low = middle
        else:
            high = middle
    return _examples(draws, (low + high) / 2, num_crops)


def token_layout(example: Example, rng: random.Random) -> tuple[list[int], list[int]]:
    """(input_ids, labels) in the collator's layout: one image run of -1 ids, labels only on the answer."""
    tail = [1] + [rng.randrange(3, TEXT_VOCAB) for _ in range(PROMPT_TAIL_TEMPLATE_TOKENS - 1 + example.question_tokens)]
    prompt = PROMPT_HEAD_IDS + [-1] * example.image_tokens + tail
    answer_text = example.answer_tokens - len(ANSWER_SUFFIX_IDS)
    answer = [rng.randrange(3, TEXT_VOCAB) for _ in range(answer_text)] + ANSWER_SUFFIX_IDS
    return prompt + answer, [-100] * len(prompt) + answer


POLICIES = ("batch1", "padded", "grouped", "packed")
# LengthGroupedSampler's megabatch: 50 batches sorted together.
MEGABATCH_BATCHES = 50


def plan_batches(lengths: list[int], policy: str, batch_size: int, seed: int) -> list[list[int]]:
    """One epoch of batches (lists of example indices) as the policy draws them; the last partial batch is dropped."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    if policy == "batch1":
        return [[index] for index in order]
    if policy == "grouped":
        span = MEGABATCH_BATCHES * batch_size
        megabatches = [order[start : start + span] for start in range(0, len(order), span)]
        order = [index for mega in megabatches for index in sorted(mega, key=lambda i: -lengths[i])]
    elif policy not in ("padded", "packed"):
        raise ValueError(f"unknown batch policy {policy!r}; choose from {POLICIES}")
    return [order[start : start + batch_size] for start in range(0, len(order) - batch_size + 1, batch_size)]


def processed_tokens(batch_lengths: list[int], policy: str) -> int:
    """Tokens the decoder runs over for one batch: padded policies pay for the longest row in every row."""
    if policy in ("padded", "grouped"):
        return max(batch_lengths) * len(batch_lengths)
    return sum(batch_lengths)


def padding_waste(lengths: list[int], batches: list[list[int]], policy: str) -> float:
    """Pad tokens / processed tokens over the batches."""
    real = sum(lengths[i] for batch in batches for i in batch)
    processed = sum(processed_tokens([lengths[i] for i in batch], policy) for batch in batches)
    return 1 - real / processed
