"""One run per output folder: the lock taken before any data is read, and what a second start is told."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from common.run_folder import LOCK_NAME, RunFolderError, _held_locks, _process_start, release_lock, take_lock

from .recipe_utils import DRIVER, REPO_ROOT, offline_env
from .test_reliability import run_main, write_jsonl_data


def holder(path):
    return json.loads(path.read_text())


@pytest.fixture
def folder(tmp_path):
    yield tmp_path / "out"
    for lock in [lock for lock in _held_locks if str(lock).startswith(str(tmp_path))]:
        release_lock(lock, _held_locks[lock])


def test_a_live_holder_is_refused_by_name_and_the_lock_goes_with_its_process(folder):
    child = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                              "from common.run_folder import take_lock; from pathlib import Path; "
                              "take_lock(Path(sys.argv[2]), 'aaaaaaaaaaaa'); print('held', flush=True); time.sleep(60)",
                              str(REPO_ROOT), str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        lock = folder / LOCK_NAME
        written = holder(lock)
        assert written["run_id"] == "aaaaaaaaaaaa" and written["pid"] == child.pid and written["host"] == socket.gethostname()
        with pytest.raises(RunFolderError) as refused:
            take_lock(folder, "bbbbbbbbbbbb")
        message = str(refused.value)
        assert f"{folder} is in use by run aaaaaaaaaaaa (pid {child.pid} on {socket.gethostname()}, since {written['since']})" in message
        assert "\n" not in message and holder(lock)["run_id"] == "aaaaaaaaaaaa"
    finally:
        child.terminate()
        child.wait()
    # Ended by a signal, it could not remove its lock: this host sees the pid gone and takes over.
    assert (folder / LOCK_NAME).is_file()
    mine = take_lock(folder, "cccccccccccc")
    assert holder(folder / LOCK_NAME)["run_id"] == "cccccccccccc"
    release_lock(folder / LOCK_NAME, mine)
    assert not (folder / LOCK_NAME).exists()


def test_a_lock_whose_pid_now_belongs_to_another_process_is_stale(folder, caplog):
    folder.mkdir()
    # Our parent is alive, but it is not the process that took this lock: its start time differs.
    (folder / LOCK_NAME).write_text(json.dumps({"run_id": "dddddddddddd", "host": socket.gethostname(), "pid": os.getppid(),
                                                "started_at": "1", "since": "2026-01-01T00:00:00+00:00"}))
    take_lock(folder, "eeeeeeeeeeee")
    assert holder(folder / LOCK_NAME)["run_id"] == "eeeeeeeeeeee"
    assert "was claimed by run dddddddddddd" in caplog.text and "no longer running: taking it over" in caplog.text


def test_a_lock_from_another_host_is_refused_with_the_file_to_delete(folder):
    folder.mkdir()
    lock = folder / LOCK_NAME
    lock.write_text(json.dumps({"run_id": "ffffffffffff", "host": "node-that-is-not-this-one", "pid": 1,
                                "started_at": None, "since": "2026-01-01T00:00:00+00:00"}))
    with pytest.raises(RunFolderError) as refused:
        take_lock(folder, "gggggggggggg")
    message = str(refused.value)
    assert "in use by run ffffffffffff (pid 1 on node-that-is-not-this-one" in message
    assert f"if that run is really gone, delete {lock}" in message
    assert holder(lock)["run_id"] == "ffffffffffff"


def test_an_empty_lock_is_waited_for_then_refused(folder):
    folder.mkdir()
    (folder / LOCK_NAME).touch()
    started = time.monotonic()
    with pytest.raises(RunFolderError, match="names no run"):
        take_lock(folder, "hhhhhhhhhhhh")
    assert time.monotonic() - started >= 1.5
    assert _process_start(os.getpid()) is not None


@pytest.mark.parametrize("where", ["same", "inside", "containing"])
def test_an_output_dir_on_the_base_model_folder_is_refused_and_the_model_is_untouched(tiny_checkpoint, tmp_path, capsys, where):
    base = tmp_path / "runs" / "base"
    shutil.copytree(tiny_checkpoint, base)
    before = sorted(p.name for p in base.iterdir())
    out = {"same": base, "inside": base / "out", "containing": tmp_path / "runs"}[where]
    data = write_jsonl_data(tmp_path / "data")
    code, stderr = run_main("finetune_hf_trainer_ucf101", ["--model_name_or_path", base, "--data_dir", data, "--output_dir", out,
                                                           "--overwrite_output_dir", "--deepspeed", "none"], capsys)
    relation = {"same": "is", "inside": "is inside", "containing": "contains"}[where]
    assert code == 1 and f"--output_dir {out} {relation} the base model folder --model_name_or_path {base}" in stderr
    assert "Traceback" not in stderr
    assert sorted(p.name for p in base.iterdir()) == before
