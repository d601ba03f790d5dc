"""The one example format every recipe converts its rows into, and how it becomes tokens.

A training example is ``{"images": [PIL.Image, ...], "messages": [...]}`` where ``messages`` alternate
``{"role": "user", "content": ...}`` and ``{"role": "assistant", "content": ...}``, starting with a user turn
and ending with an assistant turn. The first user message carries one ``<|image_k|>`` tag per image
(k = 1, 2, ...); later turns carry none.

An evaluation example is ``{"id": str, "images": [...], "messages": [the user message], "references": [str, ...]}``.

Tokens follow the reference recipe (spec section 5): per turn, the prompt is the chat template of the user
message with the generation prompt, encoded with its image placeholder runs; the answer is
``{answer}<|end|>\\n<|endoftext|>`` encoded without special tokens. Labels are -100 over every prompt token
(image placeholders included) and equal the answer ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from .processing_phi3v import IMAGE_TAG_PATTERN, Phi3VProcessor

IGNORE_INDEX = -100


class DataError(ValueError):
    """Input data cannot be used; the message names the file, line or row and what to do."""


class ExampleError(DataError):
    """A single example cannot be used; the message says which one and why."""


def error_reason(error: BaseException) -> str:
    """A library error's first line, to quote inside a sentence of our own."""
    text = str(error).strip()
    return text.splitlines()[0].rstrip(".") if text else type(error).__name__


@dataclass
class EncodedExample:
    input_ids: list[int]
    labels: list[int] | None
    pixel_values: torch.Tensor | None
    image_sizes: torch.Tensor | None

    def __len__(self) -> int:
        return len(self.input_ids)


def answer_suffix(processor: Phi3VProcessor) -> str:
    tokenizer = processor.tokenizer
    return f"<|end|>\n{tokenizer.eos_token}"


def check_messages(messages, num_images: int, for_training: bool) -> None:
    if not isinstance(messages, list) or not messages:
        raise ExampleError("'messages' must be a non-empty list of {'role', 'content'} dicts")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ExampleError(f"message {index} must be a dict with a string 'content', got {message!r:.200}")
        expected = "user" if index % 2 == 0 else "assistant"
        if message.get("role") != expected:
            raise ExampleError(f"message {index} has role {message.get('role')!r}; roles must alternate user, assistant, ...")
        if index > 0 and IMAGE_TAG_PATTERN.search(message["content"]):
            raise ExampleError(f"message {index} holds an image tag; put every <|image_k|> tag in the first user message")
        if expected == "assistant" and not message["content"].strip():
            raise ExampleError(f"message {index} (assistant) is empty; an empty answer teaches nothing")
    if for_training and len(messages) % 2:
        raise ExampleError("a training conversation must end with an assistant message")
    if not for_training and len(messages) != 1:
        raise ExampleError("an evaluation example holds exactly one user message (its answers go in 'references')")
    tags = [int(k) for k in IMAGE_TAG_PATTERN.findall(messages[0]["content"])]
    if tags != list(range(1, num_images + 1)):
        raise ExampleError(
            f"the first user message has image tags {tags} but the example has {num_images} image(s); "
            "it needs <|image_1|> .. <|image_N|> in order, one per image"
        )


def process_images(processor: Phi3VProcessor, images, num_crops: int):
    if not images:
        return None, None, []
    for index, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise ExampleError(f"images[{index}] is a {type(image).__name__}, not a PIL image")
    features = processor.image_processor(list(images), num_crops=num_crops)
    return features["pixel_values"], features["image_sizes"], features["num_img_tokens"]


def prompt_text(processor: Phi3VProcessor, user_content: str) -> str:
    return processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": user_content}], tokenize=False, add_generation_prompt=True
    )


def encode_conversation(processor: Phi3VProcessor, example: dict, num_crops: int) -> EncodedExample:
    """Token ids and labels of a training example (see the module docstring)."""
    images = example.get("images") or []
    messages = example.get("messages")
    check_messages(messages, len(images), for_training=True)
    pixel_values, image_sizes, token_counts = process_images(processor, images, num_crops)
    suffix = answer_suffix(processor)
    input_ids: list[int] = []
    labels: list[int] = []
    for turn in range(0, len(messages), 2):
        counts = token_counts if turn == 0 else []
        prompt_ids = processor.encode_with_images(prompt_text(processor, messages[turn]["content"]), counts)
        answer_ids = processor.tokenizer(messages[turn + 1]["content"] + suffix, add_special_tokens=False)["input_ids"]
        input_ids += prompt_ids + answer_ids
        labels += [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    return EncodedExample(input_ids, labels, pixel_values, image_sizes)


def encode_prompt(processor: Phi3VProcessor, example: dict, num_crops: int) -> EncodedExample:
    """Token ids of an evaluation example's prompt, ending with the generation prompt."""
    images = example.get("images") or []
    messages = example.get("messages")
    check_messages(messages, len(images), for_training=False)
    pixel_values, image_sizes, token_counts = process_images(processor, images, num_crops)
    input_ids = processor.encode_with_images(prompt_text(processor, messages[0]["content"]), token_counts)
    return EncodedExample(input_ids, None, pixel_values, image_sizes)
