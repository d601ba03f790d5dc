"""export and predict: a stop signal keeps what predict wrote, its resume follows the model's content, and bad
inputs or a full disk are one line with nothing half-written under the final name."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.fixtures.tiny import build_tiny_checkpoint
from common.outputs import export, predict
from common.training.preemption import PREEMPTED_EXIT_CODE

from .recipe_utils import REPO_ROOT, offline_env, small_filesystem
from .test_export import make_adapter
from .test_predict import PROMPT, count_lines, write_images


class SignalReachedTheTest(Exception):
    """The signal was not handled by predict (it would have ended the process)."""


@pytest.fixture
def no_death_by_signal(monkeypatch):
    """A SIGTERM that predict does not handle fails the test instead of killing pytest."""
    def fail(signum, frame):
        raise SignalReachedTheTest(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, fail)
    yield
    signal.signal(signal.SIGTERM, previous)


def signal_after_first_batch(monkeypatch, signum=signal.SIGTERM):
    """Deliver `signum` to this process once the first batch is answered, as a scheduler's stop would arrive."""
    from common.evaluation.generation import AnswerGenerator

    original, calls = AnswerGenerator.__call__, []

    def answer(self, examples):
        answers = original(self, examples)
        calls.append(len(examples))
        if len(calls) == 1:
            os.kill(os.getpid(), signum)
        return answers

    monkeypatch.setattr(AnswerGenerator, "__call__", answer)
    return calls


def run_predict(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as stopped:
        predict.main([str(a) for a in argv])
    return stopped.value.code, capsys.readouterr().err


def one_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.fixture(scope="module")
def other_size_base(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("small-base"), hidden_size=32, num_heads=4)


@pytest.fixture(scope="module")
def lora(tiny_checkpoint, tmp_path_factory) -> Path:
    return make_adapter(tiny_checkpoint, tmp_path_factory.mktemp("lora") / "lora")


def predict_args(model, folder, output):
    return ["--model", model, "--image_dir", folder, "--prompt", PROMPT, "--batch_size", "2", "--max_new_tokens", "4",
            "--num_crops", "1", "--output", output]


def test_sigterm_keeps_the_predictions_and_a_swapped_model_is_refused_while_a_moved_one_goes_on(
        tiny_checkpoint, tmp_path, monkeypatch, capsys, no_death_by_signal):
    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, model)
    folder = tmp_path / "scans"
    write_images(folder, 6)
    output = tmp_path / "predictions.jsonl"
    parts = output.with_name(output.name + ".parts")
    calls = signal_after_first_batch(monkeypatch)
    code, stderr = run_predict(predict_args(model, folder, output), capsys)
    assert code == PREEMPTED_EXIT_CODE and calls == [2], stderr
    assert f"stopped by SIGTERM: 2 of 6 predictions are kept in {parts}; run the same command to go on" in stderr
    kept = (parts / "rank0.jsonl").read_text().splitlines()
    assert len(kept) == 2 and not output.exists()
    monkeypatch.undo()

    # Another model's weights under the same folder name: its answers must not join the first model's.
    original = model / "model.safetensors"
    saved = tmp_path / "saved.safetensors"
    shutil.copyfile(original, saved)
    shutil.copyfile(build_tiny_checkpoint(tmp_path / "other", seed=1) / "model.safetensors", original)
    code, stderr = run_predict(predict_args(model, folder, output), capsys)
    assert code == 1
    assert f"{parts} holds predictions of another run (model differ)" in one_error(stderr)

    # The same weights in another folder are the same model: the run goes on.
    shutil.copyfile(saved, original)
    moved = tmp_path / "moved-model"
    model.rename(moved)
    predict.main([str(a) for a in predict_args(moved, folder, output)])
    lines = output.read_text().splitlines()
    assert len(lines) == 6 and lines[:2] == kept and not parts.exists()


def test_an_adapter_on_a_base_of_another_size_is_one_line(lora, other_size_base, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        export.main(["--adapter", str(lora), "--base", str(other_size_base), "--out", str(tmp_path / "out")])
    assert stopped.value.code == 1
    error = one_error(capsys.readouterr().err)
    assert f"the adapter {lora} does not fit the base {other_size_base} (size mismatch for " in error
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))

    image = write_images(tmp_path / "images", 1)[0]
    code, stderr = run_predict(["--model", other_size_base, "--adapter", lora, "--image", image, "--prompt", PROMPT], capsys)
    assert code == 1 and f"the adapter {lora} does not fit the model {other_size_base} (size mismatch for " in one_error(stderr)


def test_a_truncated_model_file_is_one_line_naming_it(tiny_checkpoint, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(SystemExit) as stopped:
        export.main(["--model", str(model), "--out", str(tmp_path / "out")])
    assert stopped.value.code == 1 and f"{weights} is cut short or damaged" in one_error(capsys.readouterr().err)
    image = write_images(tmp_path / "images", 1)[0]
    code, stderr = run_predict(["--model", model, "--image", image, "--prompt", PROMPT], capsys)
    assert code == 1 and f"{weights} is cut short or damaged" in one_error(stderr)


def test_predict_wording_and_limits(tiny_checkpoint, lora, tmp_path, capsys):
    image = write_images(tmp_path / "images", 1)[0]
    code, stderr = run_predict(["--model", tiny_checkpoint, "--image", image, "--prompt", PROMPT, "--max_new_tokens",
                                "1000000000"], capsys)
    error = one_error(stderr)
    assert code == 1 and "--max_new_tokens 1000000000 does not fit the model's context of 131072 tokens" in error

    orphan = tmp_path / "orphan"
    shutil.copytree(lora, orphan)
    config = json.loads((orphan / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (orphan / "adapter_config.json").write_text(json.dumps(config))
    code, stderr = run_predict(["--model", orphan, "--image", image, "--prompt", PROMPT], capsys)
    error = one_error(stderr)
    assert code == 1 and "--base" not in error and f"as --model, with --adapter {orphan}" in error


def test_a_missing_base_path_is_named_as_a_path(lora, tmp_path, capsys):
    missing = tmp_path / "no-such-base"
    with pytest.raises(SystemExit) as stopped:
        export.main(["--adapter", str(lora), "--base", str(missing), "--out", str(tmp_path / "out")])
    assert stopped.value.code == 1 and f"--base {missing} does not exist" in one_error(capsys.readouterr().err)


def test_export_removes_a_stale_partial_folder_and_follows_the_umask(tiny_checkpoint, tmp_path, caplog):
    out = tmp_path / "exports" / "model"
    stale = out.parent / ".model.k1ll3d.partial"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    previous = os.umask(0o022)
    try:
        export.main(["--model", str(tiny_checkpoint), "--out", str(out)])
    finally:
        os.umask(previous)
    assert not stale.exists() and f"removing {stale}" in caplog.text
    assert (out / "model.safetensors").is_file() and (out.stat().st_mode & 0o777) == 0o755
    assert sorted(p.name for p in out.parent.iterdir()) == ["model"]


@pytest.fixture
def small_disk(tmp_path):
    with small_filesystem(tmp_path / "disk", "12m") as disk:
        yield disk


def test_a_full_disk_during_export_is_one_line_and_leaves_nothing(tiny_checkpoint, small_disk, capsys):
    # The tiny model's weights take 17 MB: they do not fit in 12 MB.
    out = small_disk / "model"
    with pytest.raises(SystemExit) as stopped:
        export.main(["--model", str(tiny_checkpoint), "--out", str(out)])
    assert stopped.value.code == 1
    error = one_error(capsys.readouterr().err)
    assert f"could not write {out}: no space left on the device" in error and f"nothing was written under {out}" in error
    assert list(small_disk.iterdir()) == []


def test_a_full_disk_during_predicts_merge_is_one_line_and_keeps_the_predictions(tiny_checkpoint, small_disk, tmp_path,
                                                                                 monkeypatch, capsys, no_death_by_signal):
    folder = tmp_path / "scans"
    write_images(folder, 4)
    output = small_disk / "predictions.jsonl"
    parts = output.with_name(output.name + ".parts")
    signal_after_first_batch(monkeypatch)
    assert run_predict(predict_args(tiny_checkpoint, folder, output), capsys)[0] == PREEMPTED_EXIT_CODE
    monkeypatch.undo()
    predicted = len((parts / "rank0.jsonl").read_text().splitlines())
    # A full disk: the rest of the predictions still fit in the page their file has, the merged file does not.
    subprocess.run(["dd", "if=/dev/zero", f"of={small_disk / 'filler'}", "bs=4k"], capture_output=True)
    code, stderr = run_predict(predict_args(tiny_checkpoint, folder, output), capsys)
    assert code == 1
    error = one_error(stderr)
    assert f"could not write {output}: no space left on the device" in error and f"are kept in {parts}" in error
    assert not output.exists() and len((parts / "rank0.jsonl").read_text().splitlines()) == 4 > predicted


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_every_predict_rank_with_exit_75(tiny_checkpoint, tmp_path):
    folder = tmp_path / "scans"
    write_images(folder, 24)
    output = tmp_path / "predictions.jsonl"
    parts = output.with_name(output.name + ".parts")
    command = [sys.executable, "-m", "common.launch", "--standalone", "--nproc_per_node=2", "-m", "common.predict",
               *map(str, predict_args(tiny_checkpoint, folder, output)), "--batch_size", "1", "--max_new_tokens", "24"]
    launcher = subprocess.Popen(command, cwd=REPO_ROOT, env=offline_env(tmp_path), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while count_lines(parts) < 2 and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    launcher.send_signal(signal.SIGTERM)
    log = launcher.communicate(timeout=120)[0]
    assert launcher.returncode == PREEMPTED_EXIT_CODE, log[-3000:]
    kept = count_lines(parts)
    assert 2 <= kept < 24 and not output.exists()
    assert f"stopped by SIGTERM: {kept} of 24 predictions are kept in {parts}" in log
