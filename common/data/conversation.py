"""The one example format every recipe converts its rows into, and how it becomes tokens.

A training example is ``{"images": [PIL.Image, ...], "messages": [...]}`` where ``messages`` alternate
``{"role": "user", "content": ...}`` and ``{"role": "assistant", "content": ...}``, starting with a user turn
and ending with an assistant turn, optionally after one ``{"role": "system", "content": ...}`` message. The
first user message carries one ``<|image_k|>`` tag per image (k = 1, 2, ...); later turns carry none.

An evaluation example is ``{"id": str, "images": [...], "messages": [...], "references": [str, ...]}`` whose
messages are the same, but end with the user message to answer: the turns before it are its context.

Tokens follow the reference recipe (spec section 5): per turn, the prompt is the chat template of the user
message with the generation prompt, encoded with its image placeholder runs; the answer is
``{answer}<|end|>\\n<|endoftext|>`` encoded without special tokens. A system message goes through the same
template in front of the first user message (``<|system|>\\n{system}<|end|>\\n<|user|>\\n...``), inside that
first prompt. Labels are -100 over every prompt token (system and image placeholders included) and equal the
answer ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from ..errors import ExampleError
from ..model.processing_phi3v import IMAGE_TAG_PATTERN, Phi3VProcessor

IGNORE_INDEX = -100


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


def split_system(messages) -> tuple[str | None, list]:
    """(the system message's content or None, the user/assistant messages after it)."""
    if isinstance(messages, list) and messages and isinstance(messages[0], dict) and messages[0].get("role") == "system":
        return messages[0].get("content"), messages[1:]
    return None, messages


def check_messages(messages, num_images: int, for_training: bool) -> None:
    system, turns = split_system(messages)
    if system is not None and (not isinstance(system, str) or IMAGE_TAG_PATTERN.search(system)):
        raise ExampleError("the system message must be a string without image tags")
    if not isinstance(turns, list) or not turns:
        raise ExampleError("'messages' must be a non-empty list of {'role', 'content'} dicts")
    for index, message in enumerate(turns):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ExampleError(f"message {index} must be a dict with a string 'content', got {message!r:.200}")
        expected = "user" if index % 2 == 0 else "assistant"
        if message.get("role") != expected:
            raise ExampleError(
                f"message {index} has role {message.get('role')!r}; roles must alternate user, assistant, ... "
                "(after at most one system message, first)"
            )
        if index > 0 and IMAGE_TAG_PATTERN.search(message["content"]):
            raise ExampleError(f"message {index} holds an image tag; put every <|image_k|> tag in the first user message")
        if expected == "assistant" and not message["content"].strip():
            raise ExampleError(f"message {index} (assistant) is empty; an empty answer teaches nothing")
    if for_training and len(turns) % 2:
        raise ExampleError("a training conversation must end with an assistant message")
    if not for_training and not len(turns) % 2:
        raise ExampleError("an evaluation example ends with the user message to answer (its answers go in 'references')")
    tags = [int(k) for k in IMAGE_TAG_PATTERN.findall(turns[0]["content"])]
    if tags != list(range(1, num_images + 1)):
        raise ExampleError(
            f"the first user message has image tags {tags} but the example has {num_images} image(s); "
            "it needs <|image_1|> .. <|image_N|> in order, one per image"
        )


def process_images(processor: Phi3VProcessor, images):
    if not images:
        return None, None, []
    for index, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise ExampleError(f"images[{index}] is a {type(image).__name__}, not a PIL image")
    features = processor.image_processor(list(images))
    return features["pixel_values"], features["image_sizes"], features["num_img_tokens"]


def prompt_text(processor: Phi3VProcessor, user_content: str, system: str | None = None) -> str:
    messages = [{"role": "user", "content": user_content}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _encode_turns(processor: Phi3VProcessor, messages: list, token_counts) -> tuple[list[int], list[int]]:
    """Ids and labels of checked messages, turn by turn; a last user message without an answer is a prompt."""
    system, turns = split_system(messages)
    suffix = answer_suffix(processor)
    input_ids: list[int] = []
    labels: list[int] = []
    for turn in range(0, len(turns), 2):
        text = prompt_text(processor, turns[turn]["content"], system if turn == 0 else None)
        prompt_ids = processor.encode_with_images(text, token_counts if turn == 0 else [])
        input_ids += prompt_ids
        labels += [IGNORE_INDEX] * len(prompt_ids)
        if turn + 1 < len(turns):
            answer_ids = processor.tokenizer(turns[turn + 1]["content"] + suffix, add_special_tokens=False)["input_ids"]
            input_ids += answer_ids
            labels += answer_ids
    return input_ids, labels


def _encode_example(processor: Phi3VProcessor, example: dict, for_training: bool) -> EncodedExample:
    images = example.get("images") or []
    messages = example.get("messages")
    check_messages(messages, len(images), for_training=for_training)
    pixel_values, image_sizes, token_counts = process_images(processor, images)
    input_ids, labels = _encode_turns(processor, messages, token_counts)
    return EncodedExample(input_ids, labels if for_training else None, pixel_values, image_sizes)


def encode_conversation(processor: Phi3VProcessor, example: dict) -> EncodedExample:
    """Token ids and labels of a training example (see the module docstring)."""
    return _encode_example(processor, example, for_training=True)


def encode_prompt(processor: Phi3VProcessor, example: dict) -> EncodedExample:
    """Token ids of an evaluation example's prompt: its earlier turns as in training, then its last user message
    with the generation prompt."""
    return _encode_example(processor, example, for_training=False)
