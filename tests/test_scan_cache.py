"""Startup that scales: the validation pass shared out over the ranks, its findings kept in the run folder for a
restart (common/data/scan_cache.py), and the lengths it measured reused for length-grouped batching."""

import json
import logging
import os

import numpy as np
import pytest

from common.data.dataset import RecipeDataset
from common.data.formats import ColumnConversations, read_conversations, stored_conversations
from common.data.scan_cache import ScanCache, scan_key
from common.data.validation import SkipLog, _scan_share, checked_rows, validate_training_data
from common.errors import ExampleError
from common.fixtures.synthetic import _shapes_image
from common.model.processing_phi3v import Phi3VProcessor

from .recipe_utils import assert_ok, run_script

NUM_CROPS = 1
ROWS = 12
BAD_IMAGES = (2, 9)
LONG_ROWS = (4, 10)
MAX_LENGTH = 500


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    return Phi3VProcessor.from_pretrained(tiny_checkpoint, num_crops=NUM_CROPS)


def write_llava(folder, rows=ROWS):
    """A LLaVA file of one-image rows; rows BAD_IMAGES have a truncated PNG, rows LONG_ROWS a long question."""
    import random

    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(rows):
        name = f"{index:03d}.png"
        _shapes_image(rng, index % 4 + 1).save(folder / name)
        if index in BAD_IMAGES:
            data = (folder / name).read_bytes()
            (folder / name).write_bytes(data[: len(data) // 2])
        question = "How many shapes? " + ("Count carefully. " * 40 if index in LONG_ROWS else "")
        records.append({"id": f"r{index}", "image": name, "conversations": [
            {"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": str(index % 4 + 1)}]})
    path = folder / "train.json"
    path.write_text(json.dumps(records, indent=1))
    return path


def dataset_of(path, system_prompt=None):
    rows, _ = read_conversations(path, path.parent, "llava", system_prompt)
    return RecipeDataset(rows, name=path.name, data_files=[path])


def test_the_key_follows_the_data_files_and_the_tokenization(processor, tiny_checkpoint, tmp_path):
    path = write_llava(tmp_path / "data")
    key = scan_key(dataset_of(path), processor)
    assert scan_key(dataset_of(path), processor) == key
    assert scan_key(dataset_of(path), Phi3VProcessor.from_pretrained(tiny_checkpoint, num_crops=4)) != key
    assert scan_key(dataset_of(path, system_prompt="Be brief."), processor) != key
    other = Phi3VProcessor.from_pretrained(tiny_checkpoint, num_crops=NUM_CROPS)
    other.tokenizer.chat_template = "{{ messages }}"
    assert scan_key(dataset_of(path), other) != key

    # The same rows, the file touched, then changed at its end, then at its start, each time same size.
    dataset = dataset_of(path)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    touched = scan_key(dataset, processor)
    assert touched != key
    data = path.read_bytes()
    path.write_bytes(data[:-1] + b" ")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert scan_key(dataset, processor) not in (key, touched)
    path.write_bytes(b" " + data[1:])
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert scan_key(dataset, processor) not in (key, touched)


def test_a_dataset_columns_system_prompt_changes_the_key(processor):
    import datasets

    rows = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}])
    plain = RecipeDataset(rows, ColumnConversations("messages", "images", None, None, "toy"), "toy")
    prompted = RecipeDataset(rows, ColumnConversations("messages", "images", None, "Be brief.", "toy"), "toy")
    assert scan_key(plain, processor) != scan_key(prompted, processor)


def test_two_shares_joined_equal_one_pass(processor, tmp_path):
    from common.data.scan_cache import RowScan

    dataset = dataset_of(write_llava(tmp_path / "data"))
    whole = _scan_share(dataset, processor, None, range(ROWS), None)
    halves = RowScan.joined([_scan_share(dataset, processor, None, share, None) for share in (range(0, 5), range(5, ROWS))])
    assert whole.complete and halves.complete
    assert np.array_equal(whole.total, halves.total) and np.array_equal(whole.supervised, halves.supervised)
    assert whole.errors == halves.errors and sorted(whole.errors) == list(BAD_IMAGES)

    # Stopping at the first bad row: the second share stops at its own, the joined scan names the first.
    def too_long(tokens):
        return tokens.total > MAX_LENGTH

    shares = [_scan_share(dataset, processor, None, share, too_long) for share in (range(0, 5), range(5, ROWS))]
    stopped = RowScan.joined(shares)
    assert [share.scanned for share in shares] == [3, 5] and stopped.scanned == 3 and not stopped.complete


def test_a_restart_reads_the_findings_instead_of_checking(processor, tmp_path, caplog, monkeypatch):
    path = write_llava(tmp_path / "data")
    out = tmp_path / "out"
    first_log, second_log = SkipLog(out / "first"), SkipLog(out / "second")
    first = validate_training_data(dataset_of(path), processor, MAX_LENGTH, first_log, cache=ScanCache(out))
    assert [first[i]["id"] for i in range(len(first))] == [f"r{i}" for i in range(ROWS) if i not in BAD_IMAGES + LONG_ROWS]

    monkeypatch.setattr(RecipeDataset, "scan", lambda *args, **kwargs: pytest.fail("the rows were checked again"))
    with caplog.at_level(logging.INFO, logger="common.data.validation"):
        again = validate_training_data(dataset_of(path), processor, MAX_LENGTH, second_log, cache=ScanCache(out))
    assert any("validation results of 12 rows reused from" in message for message in caplog.messages)
    assert [again[i]["id"] for i in range(len(again))] == [first[i]["id"] for i in range(len(first))]
    assert second_log.path.read_text() == first_log.path.read_text()
    assert again.lengths(processor) == first.lengths(processor)

    # --max_length is applied to the recorded counts: no limit keeps the long rows, from the cache still.
    unlimited = validate_training_data(dataset_of(path), processor, 0, SkipLog(out / "third"), cache=ScanCache(out))
    assert len(unlimited) == ROWS - len(BAD_IMAGES)
    # Without --skip_bad_examples the first bad row stops the run, named as the pass named it.
    with pytest.raises(ExampleError, match=r"train.json row 2 \(id 'r2'\): OSError: image file .*002\.png does not decode"):
        validate_training_data(dataset_of(path), processor, MAX_LENGTH, None, cache=ScanCache(out))


def test_lengths_for_grouping_come_from_the_validation_pass(processor, tmp_path, monkeypatch):
    dataset = validate_training_data(dataset_of(write_llava(tmp_path / "data")), processor, 0, SkipLog(tmp_path / "out"))
    expected = [RecipeDataset([dataset[i]]).lengths(processor)[0] for i in range(len(dataset))]
    monkeypatch.setattr(RecipeDataset, "scan", lambda *args, **kwargs: pytest.fail("the rows were scanned again for their lengths"))
    assert dataset.lengths(processor) == expected


def test_a_damaged_or_foreign_cache_file_is_ignored_with_a_warning(processor, tmp_path, caplog):
    path = write_llava(tmp_path / "data")
    cache = ScanCache(tmp_path / "out")
    dataset = dataset_of(path)
    key = scan_key(dataset, processor)
    checked_rows(dataset, processor, None, cache)
    record_file = cache.path(dataset.name)
    assert cache.load(dataset.name, key, ROWS) is not None
    assert cache.load(dataset.name, "another key", ROWS) is None
    record = json.loads(record_file.read_text())
    damaged = {
        "cut short": record_file.read_text()[:200],
        "counts cut": json.dumps({**record, "total": record["total"][:8]}),
        "errors dropped": json.dumps({**record, "errors": []}),
        "pickle": json.dumps({**record, "errors": [{"index": 2, "kind": "__reduce__", "reason": "x"}]}),
    }
    for what, text in damaged.items():
        record_file.write_text(text)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="common.data.scan_cache"):
            assert cache.load(dataset.name, key, ROWS) is None, what
        assert any("ignoring" in message and "checking the rows again" in message for message in caplog.messages), what


@pytest.mark.slow
def test_two_ranks_share_the_pass_and_a_restart_reuses_it(processor, tiny_checkpoint, tmp_path):
    path = write_llava(tmp_path / "data", rows=24)
    out = tmp_path / "out"
    args = ["--model_name_or_path", tiny_checkpoint, "--train_file", path, "--eval_fraction", "0.25", "--output_dir", out,
            "--num_crops", "1", "--max_length", str(MAX_LENGTH), "--skip_bad_examples", "--train_sampling_strategy", "group_by_length",
            "--batch_size", "4", "--batch_size_per_gpu", "2", "--max_steps", "2", "--save_steps", "1", "--use_lora", "--lora_rank", "4",
            "--metric", "none", "--skip_eval_before", "--skip_eval_after", "--ddp_backend", "gloo", "--dataloader_num_workers", "2"]
    first = run_script("finetune_hf_trainer_custom.py", args, tmp_path, nproc=2, env={"PHI3V_TEST_STOP_AT_STEP": 1})
    assert_ok(first)
    assert "train.json: rows checked in 2 processes" in first.stderr and "reused from" not in first.stderr
    assert "rows opened from" not in first.stderr

    # One process over the same rows finds the same: skipped rows in the same order, the same lengths.
    from common.data.formats import hold_out

    rows, _ = read_conversations(path, path.parent, "llava")
    train_rows = hold_out(rows, 0.25, 42)[0]
    single_log = SkipLog(tmp_path / "single")
    single = validate_training_data(RecipeDataset(train_rows, name="train.json", data_files=[path]), processor, MAX_LENGTH, single_log)
    sharded = [json.loads(line) for line in (out / "skipped_examples.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in single_log.path.read_text().splitlines()]
    assert sharded[: len(expected)] == expected and expected
    # The recipe's rows follow --seed (42 by default) in their draws, and so does the key; the rows are those the
    # run kept in its folder.
    stored_rows = stored_conversations(path, path.parent, "auto", None, None, out)[0]
    as_trained = RecipeDataset(hold_out(stored_rows, 0.25, 42)[0], name="train.json", seed=42, data_files=[path])
    assert list(as_trained.source) == train_rows
    recorded = ScanCache(out).load("train.json", scan_key(as_trained, processor), len(train_rows))
    assert recorded is not None
    kept = recorded.total[(recorded.total >= 0) & (recorded.total <= MAX_LENGTH)]
    assert kept.tolist() == single.lengths(processor)

    again = run_script("finetune_hf_trainer_custom.py", [*args, "--resume_from_checkpoint", "latest"], tmp_path, nproc=2)
    assert_ok(again)
    assert "train.json: validation results of 18 rows reused from" in again.stderr
    assert "train.json: 24 rows opened from" in again.stderr and "read as llava" not in again.stderr
    assert "rows checked in 2 processes" not in again.stderr


def test_image_folders_resolved_once_per_file_still_refuse_a_way_out(tmp_path):
    # Reading a data file reuses each image folder's real path; a folder that is a symlink out of the root is
    # still found, and so is a file that is one.
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "real").mkdir(parents=True)
    outside.mkdir()
    (outside / "x.png").write_bytes(b"png")
    (root / "real" / "a.png").write_bytes(b"png")
    os.symlink(outside, root / "away")
    os.symlink(outside / "x.png", root / "real" / "link.png")
    rows = [{"id": f"r{k}", "image": image, "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
            for k, image in enumerate(["real/a.png", "away/x.png"])]
    for bad in ("away/x.png", "real/link.png", "real/../../outside/x.png"):
        rows[1]["image"] = bad
        path = tmp_path / "train.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        with pytest.raises(Exception, match=r"outside the image root"):
            read_conversations(path, root, "llava")
