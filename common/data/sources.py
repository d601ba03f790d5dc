"""Where a recipe's rows come from: the hub dataset it names, or a local copy of the same schema.

``--dataset_path DIR`` accepts what users have at hand: a ``save_to_disk`` folder (a DatasetDict or a single
Dataset), or parquet / json / jsonl files named by split (``train-*.parquet``, ``test.jsonl``, ...).
"""

from __future__ import annotations

from pathlib import Path

import datasets

from ..errors import DataError, error_reason

DATA_SUFFIXES = {".parquet": "parquet", ".json": "json", ".jsonl": "json"}


def load_split(hub_id: str, config: str | None, split: str, dataset_path: str | None = None) -> datasets.Dataset:
    """One split, from `dataset_path` when given, else from the hub (`hub_id`, `config`)."""
    if dataset_path is not None:
        return load_local_split(Path(dataset_path), split)
    try:
        return datasets.load_dataset(hub_id, config, split=split)
    except (ConnectionError, OSError) as error:
        name = hub_id + (f" ({config})" if config else "")
        raise DataError(
            f"could not load the {split} split of {name} from the Hugging Face hub: {error_reason(error)}. Check the "
            "network (and HF_TOKEN for gated data), or download the dataset and pass --dataset_path DIR"
        ) from error


def load_local_split(path: Path, split: str) -> datasets.Dataset:
    if not path.exists():
        raise FileNotFoundError(f"--dataset_path {path} does not exist")
    if (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"--dataset_path {path} has splits {sorted(loaded)}, not {split!r}")
            return loaded[split]
        if split != "train":
            raise DataError(
                f"--dataset_path {path} holds one unsplit dataset, which can serve only as the train split; for the "
                f"{split} split save a DatasetDict that has it, or name files {split}*.parquet / {split}*.jsonl"
            )
        return loaded
    files = sorted(f for f in path.iterdir() if f.suffix in DATA_SUFFIXES and f.name.split(".")[0].split("-")[0] == split)
    if not files:
        raise FileNotFoundError(
            f"--dataset_path {path}: no save_to_disk dataset and no {split}*.parquet / {split}*.json(l) files; "
            "write the data with Dataset.save_to_disk or name the files by split"
        )
    kinds = {DATA_SUFFIXES[f.suffix] for f in files}
    if len(kinds) > 1:
        raise DataError(f"--dataset_path {path}: split {split!r} mixes file types {sorted(kinds)}; keep one")
    return datasets.load_dataset(kinds.pop(), data_files=[str(f) for f in files], split="train")


def first_rows(dataset, count: int | None):
    """The first `count` rows (all when None), for --max_train_samples / --max_eval_samples."""
    if count is None or count >= len(dataset):
        return dataset
    if count < 1:
        raise DataError(f"a sample limit must be positive, got {count}")
    return dataset.select(range(count)) if hasattr(dataset, "select") else dataset[:count]


def image_tags(count: int) -> str:
    return "".join(f"<|image_{k}|>" for k in range(1, count + 1))


def cauldron_train_example(row: dict, index: int) -> dict:
    """A Cauldron row (`images`, `texts` [{user, assistant, source}]) as one conversation over all its turns."""
    messages = []
    for turn, text in enumerate(row["texts"]):
        user = f"{image_tags(len(row['images']))}\n{text['user']}" if turn == 0 else text["user"]
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": text["assistant"]}]
    return {"images": row["images"], "messages": messages}


def cauldron_eval_example(row: dict, index: int) -> dict:
    """The first turn of a Cauldron row, the one the reference recipe scores."""
    first = row["texts"][0]
    return {
        "id": f"row-{index}",
        "images": row["images"],
        "messages": [{"role": "user", "content": f"{image_tags(len(row['images']))}\n{first['user']}"}],
        "references": [first["assistant"]],
    }


def split_head(dataset, head: int):
    """(first `head` rows, the rest): the reference recipes evaluate on the head of the Cauldron's only split."""
    if not 0 < head < len(dataset):
        raise DataError(
            f"cannot hold out the first {head} rows of a {len(dataset)}-row dataset for evaluation; "
            "pass a smaller --num_eval_rows"
        )
    return dataset.select(range(head)), dataset.select(range(head, len(dataset)))
