"""A small, offline stand-in for the Phi-3.5-vision tokenizer.

Tests and demo runs cannot download the official tokenizer, yet they need one that behaves like it where our
code can tell the difference: a Llama-style BPE with byte fallback, the official tokenizer.json's text
pipeline (a normalizer that prepends "▁" to every piece of text between special tokens and turns spaces into
"▁", no pre-tokenizer), `<s>` added at the start of every encoded text, 32000 base ids, and the Phi-3
special tokens at their official ids with the official chat format. Only the merges differ: they are learnt
here, in-process, from a small English corpus that covers the words our synthetic datasets use, so token
counts are realistic enough for sequence-length tests while the build stays deterministic and takes a
fraction of a second.
"""

import json

from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import LlamaTokenizerFast, PreTrainedTokenizerFast

from .synthetic import UCF101_CLASSES

BASE_VOCAB_SIZE = 32000
# Checkpoint's embedding rows; every tokenizer id must index one of them.
MODEL_VOCAB_SIZE = 32064

# The official layout of ids from 32000 up. Placeholders 7..39 fill the gap below `<|image|>` (reported at
# 32044) so that every name keeps the id it has in the published tokenizer.
_PHI3_ADDED_TOKENS = [
    "<|endoftext|>",
    "<|assistant|>",
    "<|placeholder1|>",
    "<|placeholder2|>",
    "<|placeholder3|>",
    "<|placeholder4|>",
    "<|system|>",
    "<|end|>",
    "<|placeholder5|>",
    "<|placeholder6|>",
    "<|user|>",
    *[f"<|placeholder{i}|>" for i in range(7, 40)],
    "<|image|>",
]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}"
    "{{ '<|assistant|>\n' }}"
    "{% endif %}"
)


# Phrasing close to what the synthetic DocVQA, hateful memes, NLVR2 and UCF-101 examples say, plus plain
# English so that frequent words end up as single tokens.
_CORPUS_LINES = [
    "Classify the video into one of the following classes: " + ", ".join(UCF101_CLASSES) + ".",
    " ".join(UCF101_CLASSES),
    "Answer briefly.",
    "What is the date mentioned in this letter? Answer briefly.",
    "What is the total amount on the invoice? Answer briefly.",
    "What is the name of the company at the top of the page?",
    "Which page number is shown at the bottom of the document?",
    "Is this meme hateful or not hateful? It is not hateful. It is hateful.",
    "Answer yes or no. yes no Yes No YES NO",
    "Is the statement true or false? True False true false",
    "The left image contains two dogs and the right image contains one cat.",
    "There are exactly three birds in the image on the right.",
    "The numbers are 0 1 2 3 4 5 6 7 8 9 10 11 12 20 25 30 42 50 99 100 1000 2024.",
    "0123456789 $12.50 3.14 1,000 50% #7 (a) [b] {c} <d> e-mail a/b a_b a+b=c",
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing basketball in the park while a woman watches from a bench.",
    "She applies lipstick and eye makeup in front of a mirror before the show.",
    "The baby is crawling on the floor towards a red ball.",
    "A gymnast walks on the balance beam and a band is marching on the field.",
    "The pitcher throws the baseball and the archer aims the bow at the target.",
    "He lifts the bar on the bench press at the gym every morning.",
    "Please describe the image in detail and answer the question about it.",
    "This document is a report from the department of health, dated March 5, 1998.",
    "To whom it may concern: thank you for your letter of January 12.",
    "The table shows sales by year, region and product for the first quarter.",
    "You are a helpful assistant. The user asks a question and the assistant answers it.",
    "I think that this is a good example of what we can do with our data.",
    "It was the best of times, it was the worst of times, it was the age of wisdom.",
    "There is a picture of a person, a car, a house, a tree and a street sign.",
    "How many people are in the picture? What color is the shirt? Where is the sign?",
    "Monday Tuesday Wednesday Thursday Friday Saturday Sunday",
    "January February March April May June July August September October November December",
    "one two three four five six seven eight nine ten first second third last next",
    "red green blue black white yellow orange purple brown gray",
    "is are was were be been has have had do does did can could will would should may might must",
    "the a an and or but if then else of to in on at by for with from about into over under after before",
    "he she it they we you I me him her them us my your his its our their this that these those",
    "video frame image text question answer class label document page meme statement",
]


def _train_merges() -> tuple[list[str], list[tuple[str, str]]]:
    """Learn BPE merges on the embedded corpus; returns (alphabet, merges in priority order)."""
    trainer_tokenizer = Tokenizer(models.BPE(byte_fallback=True))
    # split=True while training: sentencepiece never merges across a word boundary, so no learnt token may
    # hold "▁" anywhere but at its start; encoding then runs on whole pieces (no pre-tokenizer), as the official
    # file's does.
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=BASE_VOCAB_SIZE, min_frequency=1, show_progress=False)
    trainer_tokenizer.train_from_iterator(_CORPUS_LINES, trainer=trainer)
    model = json.loads(trainer_tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    merged = {a + b for a, b in merges}
    alphabet = sorted(token for token in model["vocab"] if token not in merged)
    return alphabet, merges


def _base_vocab(alphabet: list[str], merges: list[tuple[str, str]]) -> dict[str, int]:
    tokens = ["<unk>", "<s>", "</s>"]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    tokens += alphabet
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:
            seen.add(a + b)
            tokens.append(a + b)
    if len(tokens) > BASE_VOCAB_SIZE:
        raise RuntimeError(f"tiny tokenizer: {len(tokens)} learnt tokens exceed the base vocab of {BASE_VOCAB_SIZE}")
    # Fillers keep the official id layout; no merge produces them, so BPE never emits them.
    tokens += [f"<filler_{i}>" for i in range(BASE_VOCAB_SIZE - len(tokens))]
    return {token: i for i, token in enumerate(tokens)}


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Build the tiny Phi-3-style tokenizer (a `LlamaTokenizerFast`), deterministically and offline.

    `save_pretrained(dir)` writes the official file layout; `common.processing_phi3v.load_tokenizer(dir)` gives
    back an equivalent tokenizer (plain `AutoTokenizer` does not, as with the official files: see there).
    """
    alphabet, merges = _train_merges()
    vocab = _base_vocab(alphabet, merges)
    tokenizer = LlamaTokenizerFast(
        vocab=vocab,
        merges=merges,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        add_bos_token=True,
        add_eos_token=False,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
        chat_template=CHAT_TEMPLATE,
    )
    # `</s>` is a base-vocab token but, as in Llama, must never be split by BPE nor kept by
    # skip_special_tokens. The constructor already registered eos/pad (`<|endoftext|>`); adding the rest in
    # order reproduces the official ids, checked below so that a change in transformers' add order cannot
    # shift them silently.
    tokenizer.add_tokens(
        [AddedToken(t, special=True, normalized=False) for t in ["</s>", *_PHI3_ADDED_TOKENS]],
        special_tokens=True,
    )
    for offset, token in enumerate(_PHI3_ADDED_TOKENS):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id != BASE_VOCAB_SIZE + offset:
            raise RuntimeError(f"tiny tokenizer: {token} got id {token_id}, expected {BASE_VOCAB_SIZE + offset}")
    # The official tokenizer.json's pipeline, which transformers 5's Llama class would otherwise replace.
    tokenizer.backend_tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    tokenizer.backend_tokenizer.pre_tokenizer = None
    if len(tokenizer) > MODEL_VOCAB_SIZE:
        raise RuntimeError(f"tiny tokenizer: {len(tokenizer)} ids exceed the model's {MODEL_VOCAB_SIZE} embeddings")
    return tokenizer
