"""Text + image processor for Phi-3.5-vision, reproducing the reference token layout.

Images are referred to in the text by tags `<|image_1|>`, `<|image_2|>`, ... The text is cut at the tags,
every piece is tokenized on its own with the tokenizer's default special tokens (so the Llama-style
tokenizer puts `<s>` before each piece, as the reference does), and tag k becomes a run of `-k` ids, one per
image feature vector. The model replaces every id < 0, in order, with the features of the images of the
batch, so the runs must appear in the order of the images.

This is a plain class rather than a transformers `ProcessorMixin`: given a ProcessorMixin (or a tokenizer) as
`processing_class`, the Trainer rewrites the model config's eos/bos/pad ids from the tokenizer's (config eos
2 `</s>` would become 32000 `<|endoftext|>`), which would change the saved checkpoint. The Trainer only needs
`save_pretrained`, `model_input_names` and `pad_token_id` from us.
"""

import re

import torch
from PIL import Image
from tokenizers import Tokenizer
from transformers import AutoTokenizer, BatchFeature
from transformers.utils import cached_file

from .image_processing_phi3v import Phi3VImageProcessor
from .official_files import write_processor_files

IMAGE_TAG_PATTERN = re.compile(r"<\|image_(\d+)\|>")
# The keywords of from_pretrained that say where files come from; the rest are tokenizer settings.
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")


def load_tokenizer(pretrained_model_name_or_path, **kwargs):
    """The checkpoint's tokenizer, tokenizing exactly as its ``tokenizer.json`` says.

    transformers 5 builds a Llama tokenizer's normalizer and pre-tokenizer from its own defaults instead of
    reading them from the file. The official file's normalizer (prepend "▁", spaces to "▁") runs on every
    piece of text between special tokens, so the reference puts "▁" (29871) after each special token that
    text follows: ``<|user|>\n`` is [32010, 29871, 13]. transformers 5's Metaspace default would drop that
    29871 and give the model prompts in a layout it was not trained on. The file's own pipeline is put back.
    """
    # Explicitly False: the official files carry an auto_map, and without it transformers asks on stdin.
    tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, trust_remote_code=False, **kwargs)
    hub_kwargs = {key: kwargs[key] for key in _HUB_KWARGS if key in kwargs}
    tokenizer_file = cached_file(
        pretrained_model_name_or_path, "tokenizer.json", _raise_exceptions_for_missing_entries=False, **hub_kwargs
    )
    if tokenizer_file is not None:
        as_written = Tokenizer.from_file(tokenizer_file)
        backend = tokenizer.backend_tokenizer
        backend.normalizer = as_written.normalizer
        backend.pre_tokenizer = as_written.pre_tokenizer
        backend.decoder = as_written.decoder
    return tokenizer


def check_image_tags(text: str, num_images: int) -> None:
    """Raise ValueError unless `text` holds exactly `<|image_1|>` .. `<|image_{num_images}|>`, in order."""
    tags = [int(k) for k in IMAGE_TAG_PATTERN.findall(text)]
    if tags != list(range(1, len(tags) + 1)):
        raise ValueError(
            f"image tags must be <|image_1|>, <|image_2|>, ... in order without gaps or repeats, got "
            f"{['<|image_%d|>' % k for k in tags]}; renumber the tags of this text"
        )
    if len(tags) != num_images:
        raise ValueError(
            f"the text has {len(tags)} image tag(s) but {num_images} image(s) were given; "
            f"put one <|image_k|> tag per image in the text"
        )


def _flatten_images(images, what: str) -> list:
    """One text's images as a list: None -> [], a PIL image -> [it], a list of PIL images -> that list."""
    if images is None:
        return []
    if isinstance(images, Image.Image):
        return [images]
    if isinstance(images, (list, tuple)) and all(isinstance(im, Image.Image) for im in images):
        return list(images)
    raise TypeError(f"{what} must be None, a PIL image or a list of PIL images, got {images!r:.200}")


class Phi3VProcessor:
    """Pairs a tokenizer with a `Phi3VImageProcessor` and builds `input_ids` with image placeholder runs."""

    model_input_names = ["input_ids", "attention_mask", "pixel_values", "image_sizes"]

    def __init__(self, image_processor: Phi3VImageProcessor, tokenizer, source: str | None = None):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        # The checkpoint folder or hub id this was loaded from: its code files and auto_map go with every save.
        self.source = source

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, num_crops: int | None = None, **kwargs) -> "Phi3VProcessor":
        """Load the tokenizer (`load_tokenizer`) and the image processor from a directory or hub id.

        `num_crops` overrides the checkpoint's value (4 in the published file). Other keywords (cache_dir,
        revision, local_files_only, token, ...) go to both loaders. Remote code is never run.
        """
        if kwargs.pop("trust_remote_code", False):
            raise ValueError(
                "Phi3VProcessor never runs the checkpoint's remote code; drop trust_remote_code=True "
                "(the local classes read the official files as they are)"
            )
        tokenizer = load_tokenizer(pretrained_model_name_or_path, **kwargs)
        if num_crops is not None:
            kwargs["num_crops"] = num_crops
        image_processor = Phi3VImageProcessor.from_pretrained(pretrained_model_name_or_path, **kwargs)
        return cls(image_processor, tokenizer, source=str(pretrained_model_name_or_path))

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """Write the official checkpoint's tokenizer and processor files into `save_directory`, loadable by
        transformers 4.x with the checkpoint's code and by 5.x (see `common.model.official_files.write_processor_files`)."""
        write_processor_files(self, save_directory)

    @property
    def pad_token_id(self) -> int | None:
        return self.tokenizer.pad_token_id

    def encode_with_images(self, text: str, num_img_tokens: list[int]) -> list[int]:
        """Token ids of `text` with its image tags expanded; no padding, no truncation.

        `num_img_tokens[k - 1]` is the placeholder count of the image that `<|image_k|>` stands for (the
        image processor's `num_img_tokens` output). The tags must read `<|image_1|>`, `<|image_2|>`, ... in
        this order, one per image. Each text piece between tags is encoded as `tokenizer(piece).input_ids`
        (with `<s>` in front for a Llama-style tokenizer, even for an empty piece) and tag k becomes
        `num_img_tokens[k - 1]` copies of `-k`. A training collator builds its prompt ids with this, then
        appends the answer ids.
        """
        check_image_tags(text, len(num_img_tokens))
        pieces = IMAGE_TAG_PATTERN.split(text)[::2]
        piece_ids = self.tokenizer(pieces, padding=False, truncation=False)["input_ids"]
        ids = list(piece_ids[0])
        for k, (count, following) in enumerate(zip(num_img_tokens, piece_ids[1:]), start=1):
            ids += [-k] * count
            ids += following
        return ids

    def __call__(
        self,
        text,
        images=None,
        return_tensors: str | None = "pt",
        padding=True,
        padding_side: str | None = None,
        num_crops: int | None = None,
    ) -> BatchFeature:
        """Encode one text (str) or a batch (list of str) with their images.

        `images`: for one text, None, a PIL image or a list of PIL images; for a batch, a list with one entry
        per text, each None, a PIL image or a list of PIL images. Returns `input_ids` and `attention_mask`
        (padded with the pad id to the longest sequence on `padding_side`, default the tokenizer's), and,
        when there is at least one image, `pixel_values` (all images of all texts in order,
        (total_images, num_crops + 1, 3, 336, 336)) and `image_sizes` (total_images, 2).
        """
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
        if isinstance(text, str):
            texts = [text]
            images_per_text = [_flatten_images(images, "images (for a single text)")]
        elif isinstance(text, (list, tuple)) and text and all(isinstance(t, str) for t in text):
            texts = list(text)
            if images is None:
                images = [None] * len(texts)
            if not isinstance(images, (list, tuple)) or len(images) != len(texts):
                raise ValueError(
                    f"for a batch of {len(texts)} texts, images must be a list with one entry per text "
                    f"(None or a list of PIL images), got {type(images).__name__} of length "
                    f"{len(images) if isinstance(images, (list, tuple)) else 'n/a'}"
                )
            images_per_text = [_flatten_images(ims, f"images[{i}]") for i, ims in enumerate(images)]
        else:
            raise TypeError(f"text must be a str or a non-empty list of str, got {text!r:.200}")

        # Check the tags before the (slower) image processing so that a bad example fails fast.
        for i, (t, ims) in enumerate(zip(texts, images_per_text)):
            try:
                check_image_tags(t, len(ims))
            except ValueError as err:
                raise ValueError(f"text[{i}]: {err}") from None

        all_images = [im for ims in images_per_text for im in ims]
        features = {}
        token_counts = []
        if all_images:
            image_features = self.image_processor(all_images, num_crops=num_crops)
            features["pixel_values"] = image_features["pixel_values"]
            features["image_sizes"] = image_features["image_sizes"]
            token_counts = image_features["num_img_tokens"]

        sequences = []
        start = 0
        for t, ims in zip(texts, images_per_text):
            sequences.append(self.encode_with_images(t, token_counts[start : start + len(ims)]))
            start += len(ims)

        input_ids, attention_mask = self._pad(sequences, padding, padding_side)
        if return_tensors == "pt":
            if len({len(s) for s in input_ids}) > 1:
                raise ValueError("sequences have different lengths and padding=False; pass padding=True for tensors")
            input_ids = torch.tensor(input_ids, dtype=torch.long)
            attention_mask = torch.tensor(attention_mask, dtype=torch.long)
        features["input_ids"] = input_ids
        features["attention_mask"] = attention_mask
        return BatchFeature(features)

    def _pad(self, sequences: list[list[int]], padding, padding_side: str | None):
        side = padding_side or self.tokenizer.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        if padding in (False, "do_not_pad"):
            return [list(s) for s in sequences], [[1] * len(s) for s in sequences]
        if padding not in (True, "longest"):
            raise ValueError(f"padding must be True, 'longest' or False, got {padding!r}")
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (Phi-3 uses <|endoftext|>)")
        longest = max(len(s) for s in sequences)
        input_ids, attention_mask = [], []
        for s in sequences:
            fill = longest - len(s)
            if side == "right":
                input_ids.append(list(s) + [pad_id] * fill)
                attention_mask.append([1] * len(s) + [0] * fill)
            else:
                input_ids.append([pad_id] * fill + list(s))
                attention_mask.append([0] * fill + [1] * len(s))
        return input_ids, attention_mask

    def apply_chat_template(self, *args, **kwargs):
        return self.tokenizer.apply_chat_template(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def __repr__(self):
        return f"{type(self).__name__}(image_processor={self.image_processor!r}, tokenizer={self.tokenizer!r})"


def stop_token_ids(tokenizer) -> list[int]:
    """Where an answer ends: ``<|end|>`` (answers end with it), the tokenizer's eos ``<|endoftext|>`` (the
    reference stops there) and ``</s>``. The evaluation and every saved generation_config.json use these."""
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    if tokenizer.eos_token_id is None or end_id is None or end_id == tokenizer.unk_token_id:
        raise ValueError("the tokenizer needs an eos token and a <|end|> token to know where an answer stops")
    ids = [end_id, tokenizer.eos_token_id]
    sentence_end = tokenizer.convert_tokens_to_ids("</s>")
    if sentence_end is not None and sentence_end != tokenizer.unk_token_id:
        ids.append(sentence_end)
    return list(dict.fromkeys(ids))
