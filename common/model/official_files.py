"""The official checkpoint's files: a base checkpoint's, read where they are (a folder or the hub cache), and the
tokenizer and processor files written in its form (`Phi3VProcessor.save_pretrained` writes them)."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from huggingface_hub import constants, snapshot_download
from safetensors import safe_open
from transformers.utils import cached_file

from ..dtypes import SAVE_DTYPES
from ..errors import ExportError, error_reason

logger = logging.getLogger(__name__)

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
# What a hub base's code is: every module of the repository (the ones auto_map names import others).
CODE_PATTERNS = ["*.py"]
# The JSON files whose auto_map entries name code modules.
AUTO_MAP_FILES = ("config.json", "preprocessor_config.json", "processor_config.json")
# Where the vision tower's weights are named in the official checkpoint.
TOWER_PREFIX = "model.vision_embed_tokens.img_processor.vision_model."
# The hub cache names each snapshot folder by its commit.
COMMIT_HASH = re.compile(r"[0-9a-f]{40}")
# tokenizer_config.json keys that only transformers 5 writes and 4.x would pass on as tokenizer arguments.
TRANSFORMERS5_TOKENIZER_KEYS = ("backend", "is_local", "local_files_only", "add_prefix_space")
# Tokenizer classes that exist only in transformers 5; the official files name LlamaTokenizer.
TRANSFORMERS5_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


class BaseCheckpoint:
    """The checkpoint a run or an export starts from: a local folder or a hub repository id.

    Its files are read where they already are (the folder, or the hub cache). A hub base is read at one commit,
    `revision` (None: whatever the cache resolves ``main`` to); its code files are those of that commit's
    snapshot folder in the cache, `code_folder`. Build one with `base_checkpoint`, which pins the commit.
    """

    def __init__(self, source: str | os.PathLike, revision: str | None = None, code_folder: Path | None = None):
        self.source = str(source)
        self.is_local = Path(self.source).is_dir()
        self.revision = None if self.is_local else revision
        self.code_folder = Path(self.source) if self.is_local else code_folder

    def file(self, name: str) -> Path | None:
        if self.is_local:
            path = Path(self.source) / name
            return path if path.is_file() else None
        path = cached_file(
            self.source,
            name,
            revision=self.revision,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
        return Path(path) if path else None

    def json(self, name: str) -> dict:
        path = self.file(name)
        if path is None:
            return {}
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ExportError(f"{path}: not readable JSON ({error_reason(error)}); restore the base checkpoint's file") from error

    def code_files(self) -> list[Path]:
        return sorted(self.code_folder.glob("*.py")) if self.code_folder is not None else []

    def auto_map(self, file_name: str) -> dict | None:
        """The ``auto_map`` of one of the base's JSON files, without the entries whose module an output would
        not hold (an entry pointing at a missing file makes ``trust_remote_code`` loading fail)."""
        auto_map = self.json(file_name).get("auto_map") or {}
        present = {path.stem for path in self.code_files()}
        kept = {auto: reference for auto, reference in auto_map.items() if _modules(reference) <= present}
        return kept or None

    def missing_code(self) -> list[str]:
        """The ``.py`` files that the base's ``auto_map`` entries name and that it does not hold."""
        present = {path.stem for path in self.code_files()}
        named = set()
        for file_name in AUTO_MAP_FILES:
            for reference in (self.json(file_name).get("auto_map") or {}).values():
                named |= _modules(reference)
        return sorted(f"{module}.py" for module in named - present)

    def provenance(self) -> dict:
        """Where the weights came from, for config.json: a hub base's id and commit; a local base passes on the
        provenance it carries (a checkpoint of a run from the hub names that hub base)."""
        if not self.is_local:
            return {"_name_or_path": self.source, "_revision": self.revision} if self.revision else {}
        config = self.json("config.json")
        return {key: config[key] for key in ("_name_or_path", "_revision") if config.get("_revision")}

    def torch_dtype(self) -> torch.dtype:
        config = self.json("config.json")
        name = config.get("torch_dtype") or config.get("dtype") or "float32"
        if name not in SAVE_DTYPES:
            raise ExportError(f"{self.source}: config.json names dtype {name!r}; pass --save_dtype float32 or bfloat16")
        return SAVE_DTYPES[name]

    def weight_files(self) -> list[Path]:
        index = self.file(SAFE_INDEX)
        if index is not None:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [path for path in map(self.file, names) if path is not None]
        single = self.file(SAFE_WEIGHTS)
        return [single] if single is not None else []


def unused_base_tensors(base: BaseCheckpoint, present: set[str]) -> dict[str, torch.Tensor]:
    """The base's vision-tower tensors our model does not build (the CLIP layer after the feature layer and
    ``post_layernorm``). They never affect the output and never train; copying them makes the output's weight
    names the base's, so the checkpoint's own code and loaders that check names strictly load it as the base."""
    tensors = {}
    for path in base.weight_files():
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                if name.startswith(TOWER_PREFIX) and name not in present:
                    tensors[name] = handle.get_tensor(name)
    return tensors


def with_unused_base_tensors(state_dict: dict[str, torch.Tensor], base_source: str | os.PathLike | BaseCheckpoint) -> dict[str, torch.Tensor]:
    """A model's state dict plus the base's unused tower tensors (`unused_base_tensors`), in the dtype of the
    tower's other weights: what `Phi3VForCausalLM.save_pretrained` writes, whatever the engine gathered."""
    extra = unused_base_tensors(base_checkpoint(base_source), set(state_dict))
    tower = next((t for name, t in state_dict.items() if name.startswith(TOWER_PREFIX) and t.is_floating_point()), None)
    if tower is not None:
        extra = {name: t.to(tower.dtype) for name, t in extra.items()}
    return {**state_dict, **extra}


def _modules(reference) -> set[str]:
    """The local modules an ``auto_map`` entry (``module.Class``, or a list of them) names; a ``repo--module.Class``
    entry names code on the hub, not a file beside the config."""
    if isinstance(reference, (list, tuple)):
        return set().union(*(_modules(item) for item in reference))
    if not reference or "--" in str(reference):
        return set()
    return {str(reference).rsplit(".", 1)[0]}


_hub_bases: dict[tuple[str, str], BaseCheckpoint] = {}


def base_checkpoint(source: str | os.PathLike | BaseCheckpoint) -> BaseCheckpoint:
    """The base `source` names. A hub base is pinned, at its first use in this process, to the commit its
    config.json resolves to (the one the model loads from), and that commit's code files are fetched into the hub
    cache (from the cache alone under HF_HUB_OFFLINE=1), so that every folder the run writes carries them."""
    if isinstance(source, BaseCheckpoint):
        return source
    base = BaseCheckpoint(source)
    if base.is_local:
        return base
    key = (base.source, str(constants.HF_HUB_CACHE))
    if key not in _hub_bases:
        _hub_bases[key] = _pinned_hub_base(base.source)
    return _hub_bases[key]


def _pinned_hub_base(repo: str) -> BaseCheckpoint:
    try:
        config = cached_file(repo, "config.json", _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False)
    except OSError:
        config = None
    snapshot = Path(config).parent if config else None
    if snapshot is None or not COMMIT_HASH.fullmatch(snapshot.name):
        # Not a hub id, or neither cached nor reachable: loading the model fails with its own message.
        return BaseCheckpoint(repo)
    try:
        snapshot_download(repo, revision=snapshot.name, allow_patterns=CODE_PATTERNS)
    except OSError as error:
        # Offline without the code cached, or the hub unreachable: `warn_if_code_is_missing` says what follows.
        logger.debug("could not fetch the code files of %s@%s: %s", repo, snapshot.name, error_reason(error))
    return BaseCheckpoint(repo, snapshot.name, snapshot)


def warn_if_code_is_missing(base: BaseCheckpoint) -> None:
    """One warning, at the start of a run or an export, when outputs cannot carry the code ``auto_map`` names."""
    missing = base.missing_code()
    if not missing:
        return
    where = f"the base folder {base.source} does not hold them" if base.is_local else (
        f"they are not in the hub cache for {base.source}"
        + (f"@{base.revision}" if base.revision else "")
        + (" and HF_HUB_OFFLINE=1 forbids fetching them" if constants.HF_HUB_OFFLINE else " and could not be fetched")
    )
    logger.warning(
        "the base's auto_map names %s, but %s: the model folders written get no auto_map entries for them and will "
        "not load with trust_remote_code=True (our classes load them)", ", ".join(missing), where,
    )


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def copy_code_files(base: BaseCheckpoint, folder: Path) -> list[Path]:
    """The base's own code (its folder's, or its hub commit's in the cache), byte for byte."""
    copied = []
    for source in base.code_files():
        target = folder / source.name
        if source.resolve() != target.resolve():
            shutil.copyfile(source, target)
        copied.append(target)
    return copied


def write_tokenizer_files(tokenizer, folder: Path, base: BaseCheckpoint | None) -> None:
    """The tokenizer in the files the official checkpoint has, readable by transformers 4.x and 5.x.

    tokenizer.json and tokenizer.model are the base's own files when it has them (training never changes the
    tokenizer, and 5.x would rewrite the pipeline inside tokenizer.json); tokenizer_config.json names
    ``LlamaTokenizer`` (5.x writes ``TokenizersBackend``, which 4.x does not know) and holds the added tokens
    and the chat template, next to special_tokens_map.json and added_tokens.json as 4.x writes them.
    """
    tokenizer.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer.model"):
        source = base.file(name) if base is not None else None
        if source is not None and source.resolve() != (folder / name).resolve():
            shutil.copyfile(source, folder / name)
    config = base.json("tokenizer_config.json") if base is not None else {}
    config.update(json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")))
    for key in TRANSFORMERS5_TOKENIZER_KEYS:
        config.pop(key, None)
    if config.get("tokenizer_class") in (None, *TRANSFORMERS5_TOKENIZER_CLASSES):
        config["tokenizer_class"] = "LlamaTokenizer"
    # From what encoding does: transformers 5's attributes need not match its post-processor, and 4.x rebuilds
    # the post-processor from these two flags.
    probe = tokenizer("a").input_ids
    config["add_bos_token"] = probe[:1] == [tokenizer.bos_token_id]
    config["add_eos_token"] = probe[-1:] == [tokenizer.eos_token_id]
    config["added_tokens_decoder"] = {
        str(token_id): {
            "content": token.content,
            "lstrip": token.lstrip,
            "normalized": token.normalized,
            "rstrip": token.rstrip,
            "single_word": token.single_word,
            "special": token.special,
        }
        for token_id, token in sorted(tokenizer.added_tokens_decoder.items())
    }
    if tokenizer.chat_template:
        # 4.3x-4.4x read the template from tokenizer_config.json only.
        config["chat_template"] = tokenizer.chat_template
        (folder / "chat_template.jinja").unlink(missing_ok=True)
    config.setdefault("legacy", False)
    config.setdefault("sp_model_kwargs", {})
    write_json(folder / "tokenizer_config.json", dict(sorted(config.items())))
    special = {
        name: getattr(tokenizer, name)
        for name in ("bos_token", "eos_token", "unk_token", "pad_token")
        if getattr(tokenizer, name, None) is not None
    }
    write_json(folder / "special_tokens_map.json", special)
    base_vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=False)
    added = {token.content: token_id for token_id, token in tokenizer.added_tokens_decoder.items() if token.content not in base_vocab}
    write_json(folder / "added_tokens.json", dict(sorted(added.items(), key=lambda item: item[1])))


def write_processor_files(processor, folder: str | Path) -> None:
    """Tokenizer files, preprocessor_config.json and processor_config.json, each with the base's ``auto_map``
    (so ``AutoProcessor`` with the checkpoint's code works) and the ``num_crops`` the processor uses."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = base_checkpoint(processor.source) if processor.source else None
    write_tokenizer_files(processor.tokenizer, folder, base)
    image_config = processor.image_processor.to_dict()
    processor_config = {"processor_class": "Phi3VProcessor"}
    if base is not None:
        image_auto_map = base.auto_map("preprocessor_config.json")
        processor_auto_map = base.auto_map("processor_config.json")
        if processor_auto_map is None and image_auto_map and "AutoProcessor" in image_auto_map:
            processor_auto_map = {"AutoProcessor": image_auto_map["AutoProcessor"]}
        if image_auto_map:
            image_config["auto_map"] = image_auto_map
        if processor_auto_map:
            processor_config["auto_map"] = processor_auto_map
        copy_code_files(base, folder)
    write_json(folder / "preprocessor_config.json", dict(sorted(image_config.items())))
    write_json(folder / "processor_config.json", dict(sorted(processor_config.items())))
