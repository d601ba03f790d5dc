"""The parsed rows kept in the run folder (common/data/row_store.py, `formats.stored_conversations`): a restart opens
them instead of reading the data file, they read back as the file reads, and they stop being used when the file
or the reading options change."""

import json
import logging
import os
import pickle
import shutil

import numpy as np
import pytest

from common.data.formats import CustomData, hold_out, read_conversations, row_summaries, stored_conversations
from common.data.row_store import ROWS_FILE, RowStore
from common.data.validation import SkipLog
from common.errors import DataError


def conversation_row(index, image=None):
    row = {"id": f"r{index}", "conversations": [{"from": "human", "value": f"<image>\nQuestion {index}?" if image else f"Question {index}?"},
                                                 {"from": "gpt", "value": f"Answer {index % 3}"}]}
    if image:
        row["image"] = image
    return row


@pytest.fixture
def data(tmp_path):
    """A LLaVA JSONL file of 9 rows over images in a subfolder (every third row text-only)."""
    root = tmp_path / "data"
    (root / "pics").mkdir(parents=True)
    rows = []
    for index in range(9):
        image = None
        if index % 3:
            image = f"pics/{index}.png"
            (root / image).write_bytes(b"not read here")
        rows.append(conversation_row(index, image))
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_stored_rows_read_back_as_the_file_reads_and_move_with_their_images(data, tmp_path):
    rows, _ = read_conversations(data, data.parent, "llava", "Be brief.")
    store = RowStore.build(rows, str(data.parent.resolve()))
    assert list(store) == rows and len(store) == 9
    assert store[-1] == rows[-1] and list(store[2:5]) == rows[2:5]
    # Image paths are kept relative to the root, so a copy of the data elsewhere has the same bytes.
    assert str(data.parent.resolve()).encode() not in bytes(store._buffer) and store[1]["images"] == rows[1]["images"]
    moved = tmp_path / "moved"
    shutil.copytree(data.parent, moved)
    moved_rows, _ = read_conversations(moved / "train.jsonl", moved, "llava", "Be brief.")
    moved_store = RowStore.build(moved_rows, str(moved.resolve()))
    assert moved_store._fingerprint == store._fingerprint and list(moved_store) == moved_rows

    store.save(tmp_path / "kept", {"key": "k1"})
    opened, meta = RowStore.open(tmp_path / "kept", "k1")
    assert list(opened) == rows and opened._fingerprint == store._fingerprint and meta["rows"] == 9
    assert RowStore.open(tmp_path / "kept", "another key") is None

    # A view: its own fingerprint, the same rows as the list's, and its summaries.
    train, held = hold_out(opened, 0.34, seed=5)
    train_list, held_list = hold_out(rows, 0.34, seed=5)
    assert list(train) == train_list and list(held) == held_list
    assert len({train._fingerprint, held._fingerprint, opened._fingerprint}) == 3
    assert train.select([0])._fingerprint == opened.select([int(train._indices[0])])._fingerprint
    assert np.array_equal(row_summaries(held).answers, row_summaries(opened).answers[held._indices])
    # DataLoader workers started by spawn get the store pickled: it maps the same files again.
    assert list(pickle.loads(pickle.dumps(held))) == held_list


def test_damaged_store_files_are_not_used(data, tmp_path, caplog):
    rows, _ = read_conversations(data, data.parent, "llava")
    folder = tmp_path / "kept"
    RowStore.build(rows, str(data.parent.resolve())).save(folder, {"key": "k"})
    (folder / ROWS_FILE).write_bytes((folder / ROWS_FILE).read_bytes()[:-10])
    with caplog.at_level(logging.WARNING, logger="common.data.row_store"):
        assert RowStore.open(folder, "k") is None
    assert any("do not match store.json" in message for message in caplog.messages)


def test_a_restart_opens_the_rows_and_a_changed_file_is_read_again(data, tmp_path, caplog, monkeypatch):
    out = tmp_path / "out"
    first, found = stored_conversations(data, data.parent, "auto", None, None, out)
    # What the run goes on with is the saved file, memory-mapped, not the bytes just read.
    assert found == "llava" and len(first) == 9 and first._folder is not None

    # A run folder the rows cannot be kept in: the run goes on with them in memory, and says so.
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the run folder would be")
    with caplog.at_level(logging.WARNING, logger="common.data.formats"):
        in_memory, _ = stored_conversations(data, data.parent, "auto", None, None, blocked)
    assert list(in_memory) == list(first) and in_memory._folder is None
    assert any("could not keep the rows" in message for message in caplog.messages)

    import common.data.formats as formats

    reads = []
    reader = formats.read_part
    monkeypatch.setattr(formats, "read_part", lambda *args: reads.append(args) or reader(*args))
    with caplog.at_level(logging.INFO, logger="common.data.formats"):
        again, found = stored_conversations(data, data.parent, "auto", None, None, out)
    assert reads == [] and found == "llava" and list(again) == list(first) and again._fingerprint == first._fingerprint
    assert any("9 rows opened from" in message for message in caplog.messages)

    # Other options, or the file changed (same size, new time), are read again.
    stored_conversations(data, data.parent, "auto", "A system prompt.", None, out)
    assert len(reads) == 1
    text = data.read_text().replace("Answer 1", "Answer 7")
    data.write_text(text)
    changed, _ = stored_conversations(data, data.parent, "auto", None, None, out)
    assert len(reads) == 2 and changed[1]["messages"][-1]["content"] == "Answer 7"


def test_rows_left_out_are_logged_again_and_stop_a_run_without_skipping(data, tmp_path):
    lines = data.read_text().splitlines()
    lines[4] = json.dumps(conversation_row(4, "pics/missing.png"))
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    first_log, second_log = SkipLog(out / "first"), SkipLog(out / "second")
    kept, _ = stored_conversations(data, data.parent, "llava", None, first_log, out)
    again, _ = stored_conversations(data, data.parent, "llava", None, second_log, out)
    assert len(kept) == len(again) == 8 and first_log.count() == 1
    assert second_log.path.read_text() == first_log.path.read_text()
    with pytest.raises(DataError, match=r"train.jsonl:5: image\[0\]: image file .*missing.png does not exist"):
        stored_conversations(data, data.parent, "llava", None, None, out)


def test_custom_data_warns_from_stored_summaries(data, tmp_path, caplog):
    class Options:
        train_file, eval_file, eval_fraction, image_root, format = str(data), None, 0.34, None, "auto"
        system_prompt, max_train_samples, max_eval_samples, eval_turn = None, None, None, "first"

    lines = data.read_text().splitlines()
    same = [json.dumps({**json.loads(line), "conversations": [json.loads(line)["conversations"][0], {"from": "gpt", "value": "yes"}]})
            for line in lines]
    data.write_text("\n".join(same) + "\n")
    custom = CustomData(Options, seed=1, skip_log=None, run_folder=tmp_path / "out")
    train_set, _ = custom.datasets()
    assert os.path.isdir(tmp_path / "out" / "data_scans") and isinstance(train_set.source, RowStore)
    with caplog.at_level(logging.WARNING, logger="common.data.formats"):
        custom.warn(train_set, batch_size=2, max_steps=20, num_train_epochs=1)
    assert [m for m in caplog.messages if "have the same answer 'yes'" in m] and len(caplog.messages) == 1


def test_another_rank_reads_the_file_when_the_stored_rows_are_not_on_its_disk(data, tmp_path, monkeypatch, caplog):
    import common.data.formats as formats

    main_rows, _ = stored_conversations(data, data.parent, "llava", None, None, tmp_path / "main")
    key = formats.rows_key(data, data.parent, "llava", None)
    # What the main process sends, in turn: no error in opening its rows; its key, format, and that it opened them.
    sent = iter([None, (key, "llava", True)])
    monkeypatch.setattr(formats, "is_main_process", lambda: False)
    monkeypatch.setattr(formats, "from_main", lambda value: next(sent))
    with caplog.at_level(logging.INFO, logger="common.data.formats"):
        rows, _ = stored_conversations(data, data.parent, "llava", None, None, tmp_path / "node-local")
    assert any("are not in" in message and "reading the file" in message for message in caplog.messages)
    assert list(rows) == list(main_rows) and rows._fingerprint == main_rows._fingerprint
    # The main process's error reaches this rank as it is.
    monkeypatch.setattr(formats, "from_main", lambda value: DataError("train.jsonl:3: bad row"))
    with pytest.raises(DataError, match="train.jsonl:3: bad row"):
        stored_conversations(data, data.parent, "llava", None, None, tmp_path / "main")


def messy_file(data, array):
    """The fixture's rows, plus a missing image (line 3), a duplicate of an id 5 rows earlier and one of an id near
    the start, at the end; as JSONL with blank lines or as a JSON array."""
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rows[2]["image"] = "pics/missing.png"
    rows += [{**rows[4], "conversations": rows[5]["conversations"]}, conversation_row(0)]
    rows += [conversation_row(index) for index in range(100, 140)]
    path = data.with_suffix(".json" if array else ".jsonl")
    path.write_text(json.dumps(rows, indent=1) if array else "\n\n".join(json.dumps(row) for row in rows) + "\n")
    return path


@pytest.mark.parametrize("array", [False, True], ids=["jsonl", "array"])
def test_parts_read_by_several_ranks_join_into_what_one_reader_gives(data, tmp_path, array):
    from common.data.formats import joined_parts, read_part

    path = messy_file(data, array)
    root = data.parent.resolve()
    one_log = SkipLog(tmp_path / "one")
    whole = RowStore.build(read_conversations(path, root, "llava", None, one_log)[0], str(root))
    assert one_log.count() == 3
    for count in (1, 2, 3, 7):
        log = SkipLog(tmp_path / f"parts-{count}")
        parts = [read_part(path, root, "llava", None, (k, count)) for k in range(count)]
        joined, reasons = joined_parts(parts, path, log)
        assert list(joined) == list(whole) and joined._fingerprint == whole._fingerprint, count
        # The same rows left out, in the file's order; a duplicate names the row that has the id first.
        assert log.path.read_text() == one_log.path.read_text() and len(reasons) == 3, count
        with pytest.raises(FileNotFoundError, match=r":\d+: image\[0\]: image file .*missing.png does not exist"):
            joined_parts(parts, path, None)
    # A broken row stops the reading at that row, after the rows before it are recorded.
    text = path.read_text()
    broken = text.replace('"Question 120?"', '"Question 120?" oops') if array else text.replace('"Question 120?"}', '"Question 120?"} oops')
    path.write_text(broken)
    log = SkipLog(tmp_path / "broken")
    with pytest.raises(DataError, match="invalid JSON"):
        joined_parts([read_part(path, root, "llava", None, (k, 3)) for k in range(3)], path, log)
    assert log.count() == 3
