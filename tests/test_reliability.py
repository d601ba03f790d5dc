"""Bad input, kills and untrusted files: each stops or resumes the run as promised, naming what is wrong."""

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from common.data.dataset import RecipeDataset, data_fingerprint
from common.training.preemption import PREEMPTED_EXIT_CODE, REPEAT_GRACE_S
from common.training.run_folder import RunFolder, file_sha256

from .recipe_utils import DRIVER, REPO_ROOT, assert_ok, offline_env, run_script, small_filesystem, weights

pytestmark = pytest.mark.slow
CLASS_PROMPT = "Classify the video into one of the following classes: Red, Blue ."


def run_main(script: str, argv: list, capsys) -> tuple[int, str]:
    """Run a recipe's main() in this process (fast for errors raised before any training); (exit code, stderr)."""
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as exit_info:
        module.main([str(a) for a in argv])
    return exit_info.value.code, capsys.readouterr().err


@pytest.fixture
def jsonl_dir(tmp_path):
    return write_jsonl_data(tmp_path / "data")


def write_jsonl_data(root: Path) -> Path:
    """A custom-data folder in the converter's format: 4 training videos of 2 frames, 2 validation videos."""
    for split, count in (("train", 4), ("val", 2)):
        lines = []
        for index in range(count):
            frames = []
            for frame in range(2):
                path = root / "images" / split / f"v{index}.{frame}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (40, 30), (200 * (index % 2), 0, 200)).save(path)
                frames.append(f"{split}/v{index}.{frame}.jpg")
            turn = {"images": frames, "user": CLASS_PROMPT, "assistant": "Red" if index % 2 == 0 else "Blue"}
            lines.append(json.dumps({"id": f"{split}-{index:010d}", "source": "test", "conversations": [turn]}))
        (root / f"ucf101_{split}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def replace_train_line(data: Path, line_number: int, text: str) -> None:
    path = data / "ucf101_train.jsonl"
    lines = path.read_text().splitlines()
    lines[line_number - 1] = text
    path.write_text("\n".join(lines) + "\n")


def bad_turn(**changes) -> str:
    turn = {"images": ["train/v2.0.jpg", "train/v2.1.jpg"], "user": CLASS_PROMPT, "assistant": "Red", **changes}
    return json.dumps({"id": "train-0000000002", "conversations": [turn]})


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"id": "train-0000000002", "conversations": [', "invalid JSON"),
        (bad_turn(images=["train/v2.0.jpg", "train/missing.jpg"]), "missing.jpg does not exist"),
        (bad_turn(images=["/etc/passwd"]), "absolute"),
        (bad_turn(images=["../../outside.jpg"]), "outside"),
        (bad_turn(assistant=" "), "empty"),
        (bad_turn(user="<|image_1|>\n" + CLASS_PROMPT), "image"),
        (json.dumps({"id": "train-0000000002"}), "missing key 'conversations'"),
    ],
)
def test_bad_jsonl_line_stops_before_loading_anything(tiny_checkpoint, jsonl_dir, tmp_path, capsys, line, message):
    replace_train_line(jsonl_dir, 3, line)
    code, stderr = run_main("finetune_hf_trainer_ucf101", ["--model_name_or_path", tiny_checkpoint, "--data_dir", jsonl_dir,
                                                           "--output_dir", tmp_path / "out", "--deepspeed", "none"], capsys)
    assert code == 1
    assert "ucf101_train.jsonl:3" in stderr and message in stderr, stderr
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.fixture
def docvqa_rows(tmp_path):
    from common.fixtures.synthetic import make_docvqa

    return make_docvqa(n=8, seed=1)


def save(dataset_dict, path: Path) -> Path:
    dataset_dict.save_to_disk(str(path))
    return path


def test_missing_column_names_the_row_and_the_columns(tiny_checkpoint, docvqa_rows, tmp_path, capsys):
    data = save(docvqa_rows.remove_columns("answers"), tmp_path / "no-answers")
    code, stderr = run_main("finetune_hf_trainer_docvqa", ["--model_name_or_path", tiny_checkpoint, "--dataset_path", data,
                                                           "--output_dir", tmp_path / "out", "--deepspeed", "none"], capsys)
    assert code == 1
    assert "docvqa train row 0" in stderr and "no field 'answers'" in stderr and "'query'" in stderr


def corrupt_rows(docvqa_rows):
    def damage(row, index):
        if index == 1:
            row["answers"] = [""]
        if index == 2:
            row["image"] = {"bytes": b"this is not an image", "path": None}
        return row

    train = docvqa_rows["train"].cast_column("image", docvqa_rows["train"].features["image"].__class__(decode=False))
    train = train.map(damage, with_indices=True).cast_column("image", docvqa_rows["train"].features["image"])
    docvqa_rows["train"] = train
    return docvqa_rows


def test_bad_rows_stop_the_run_by_default_and_are_skipped_on_request(tiny_checkpoint, docvqa_rows, tmp_path, capsys):
    data = save(corrupt_rows(docvqa_rows), tmp_path / "damaged")
    args = ["--model_name_or_path", tiny_checkpoint, "--dataset_path", data, "--num_crops", "1", "--deepspeed", "none"]
    code, stderr = run_main("finetune_hf_trainer_docvqa", [*args, "--output_dir", tmp_path / "strict"], capsys)
    assert code == 1 and "docvqa train row 1" in stderr and "empty" in stderr

    out = tmp_path / "skipping"
    result = run_script("finetune_hf_trainer_docvqa.py", [*args, "--output_dir", out, "--skip_bad_examples", "--max_steps", "2",
                                                          "--batch_size", "2", "--max_eval_samples", "2", "--max_new_tokens", "2",
                                                          "--dataloader_num_workers", "0"], tmp_path)
    assert_ok(result)
    skipped = [json.loads(line) for line in (out / "skipped_examples.jsonl").read_text().splitlines()]
    assert len(skipped) == 2
    assert "row 1" in skipped[0]["reason"] and "row 2" in skipped[1]["reason"]
    assert "2 examples were skipped as unusable" in result.stderr
    assert "6 used for training" in result.stderr


def test_too_long_examples_stop_or_are_dropped(tiny_checkpoint, jsonl_dir, tmp_path, capsys):
    # Give one training video 4 frames: only it exceeds the limit.
    long_turn = bad_turn(images=[f"train/v{i}.{f}.jpg" for i in (2, 3) for f in (0, 1)])
    replace_train_line(jsonl_dir, 3, long_turn)
    args = ["--model_name_or_path", tiny_checkpoint, "--data_dir", jsonl_dir, "--num_crops", "1", "--max_length", "1000",
            "--deepspeed", "none"]
    code, stderr = run_main("finetune_hf_trainer_ucf101", [*args, "--output_dir", tmp_path / "strict"], capsys)
    assert code == 1 and "ucf101 train row 2" in stderr and "more than --max_length 1000" in stderr

    out = tmp_path / "dropping"
    result = run_script("finetune_hf_trainer_ucf101.py", [*args, "--output_dir", out, "--skip_bad_examples", "--max_steps", "1",
                                                          "--batch_size", "1", "--max_new_tokens", "2", "--dataloader_num_workers", "0"], tmp_path)
    assert_ok(result)
    assert "3 used for training" in result.stderr and "1 examples were skipped" in result.stderr


def test_pickle_checkpoint_is_refused_unless_allowed(tiny_checkpoint, jsonl_dir, tmp_path, capsys):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for file in tiny_checkpoint.iterdir():
        if file.name != "model.safetensors":
            (pickled / file.name).write_bytes(file.read_bytes())
    torch.save(load_file(str(tiny_checkpoint / "model.safetensors")), pickled / "pytorch_model.bin")
    code, stderr = run_main("finetune_hf_trainer_ucf101", ["--model_name_or_path", pickled, "--data_dir", jsonl_dir,
                                                           "--output_dir", tmp_path / "out", "--deepspeed", "none"], capsys)
    assert code == 1 and "--allow_pickle_weights" in stderr and "no safetensors weights" in stderr

    from common.training.arguments import parse_args
    from common.training.model_setup import load_model

    args, = parse_args(argv=["--model_name_or_path", str(pickled), "--output_dir", str(tmp_path / "o"), "--deepspeed", "none",
                            "--allow_pickle_weights"])
    assert load_model(args.model_name_or_path, **args.model_loading()).lm_head.weight.shape[0] == 32064


def test_missing_checkpoint_and_unreachable_hub_data_are_one_line_errors(tiny_checkpoint, jsonl_dir, tmp_path, capsys):
    missing = tmp_path / "no-such-checkpoint"
    code, stderr = run_main("finetune_hf_trainer_ucf101", ["--model_name_or_path", missing, "--data_dir", jsonl_dir,
                                                           "--output_dir", tmp_path / "out", "--deepspeed", "none"], capsys)
    assert code == 1 and f"error: could not load the processor from {missing}" in stderr
    assert "local checkpoint folder" in stderr and "Traceback" not in stderr
    # The tests run with the hub switched off, as on a machine without network.
    code, stderr = run_main("finetune_hf_trainer_docvqa", ["--model_name_or_path", tiny_checkpoint,
                                                           "--output_dir", tmp_path / "out", "--deepspeed", "none"], capsys)
    assert code == 1 and "could not load the train split of nielsr/docvqa_1200_examples from the Hugging Face hub" in stderr
    assert "--dataset_path DIR" in stderr and "Traceback" not in stderr


# ------------------------------------------------------------------------------------------------------------
# Kills


def worker_pids(marker: str) -> dict[int, int]:
    """{LOCAL_RANK: pid} of the torchrun workers whose command line mentions `marker` (not their DataLoader
    workers, which share their command line and environment)."""
    candidates = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().decode(errors="replace")
            environ = (entry / "environ").read_bytes().decode(errors="replace").split("\0")
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        local_rank = next((item.split("=", 1)[1] for item in environ if item.startswith("LOCAL_RANK=")), None)
        if marker in command and str(DRIVER) in command and local_rank is not None:
            candidates[int(entry.name)] = int(local_rank), parent
    return {local_rank: pid for pid, (local_rank, parent) in candidates.items() if parent not in candidates}


def kill_args(checkpoint, data, out):
    return ["--model_name_or_path", checkpoint, "--data_dir", data, "--output_dir", out, "--num_crops", "1",
            "--max_steps", "6", "--save_steps", "2", "--batch_size", "2", "--batch_size_per_gpu", "1", "--deepspeed", "none",
            "--skip_eval_before", "--skip_eval_after", "--dataloader_num_workers", "0", "--learning_rate", "1e-3",
            "--warmup_steps", "0", "--seed", "3", "--logging_steps", "1"]


def start_torchrun(args, tmp_path, env, launcher="torch.distributed.run", script="finetune_hf_trainer_ucf101.py"):
    """2 processes of `script` under `launcher` (torchrun, or our `common.training.launch`), in a session of their own, as a job is."""
    command = [sys.executable, "-m", launcher, "--standalone", "--nproc_per_node=2", str(DRIVER), script, *map(str, args)]
    return subprocess.Popen(command, cwd=REPO_ROOT, env=offline_env(tmp_path, **env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def stop_by_signal(args, tmp_path, send, after: Path, script: str) -> tuple[int, str]:
    """2 processes of `script` under `python -m common.launch` with slowed steps; `send(process)` a stop signal once
    the checkpoint folder `after` is complete. The run must end with exit 75, no DataLoader worker error, and the
    stop line that names its step and how to resume. Returns (that step, the run's output)."""
    process = start_torchrun(args, tmp_path, {"PHI3V_TEST_SLOW_STEPS": "0.5"}, launcher="common.training.launch", script=script)
    try:
        wait_for(lambda: (after / "checkpoint_complete.json").is_file(), process)
        send(process)
        output = process.communicate(timeout=240)[0]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == PREEMPTED_EXIT_CODE, output[-4000:]
    assert "DataLoader worker" not in output, output[-4000:]
    stop_line = output.strip().splitlines()[-1]
    assert stop_line.startswith("stopped by SIGTERM after step ") and "--resume_from_checkpoint latest" in stop_line, stop_line
    return int(stop_line.split("after step ")[1].split(":")[0]), output


def wait_for(condition, process, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        if process.poll() is not None:
            raise AssertionError(f"the run ended before the kill point:\n{process.stdout.read()[-4000:]}")
        time.sleep(0.2)
    raise AssertionError("timed out waiting for the kill point")


@pytest.fixture(scope="module")
def kill_data(tmp_path_factory):
    return write_jsonl_data(tmp_path_factory.mktemp("kill-data"))


@pytest.fixture(scope="module")
def straight_run(tiny_checkpoint, kill_data, tmp_path_factory) -> Path:
    """The output folder of the uninterrupted run every kill test must reproduce (not to be changed by tests)."""
    tmp_path = tmp_path_factory.mktemp("straight")
    out = tmp_path / "out"
    assert_ok(run_script("finetune_hf_trainer_ucf101.py", kill_args(tiny_checkpoint, kill_data, out), tmp_path, nproc=2))
    return out


def assert_same_weights(expected: Path, out: Path, file_name: str = "model.safetensors"):
    """Bit-equal final weights (a whole model's, or `file_name`: an adapter's)."""
    wanted, actual = weights(expected / file_name), weights(out / file_name)
    assert actual.keys() == wanted.keys()
    for name in wanted:
        assert torch.equal(actual[name], wanted[name]), name


def step_losses(out: Path) -> list[tuple]:
    """(step, loss, grad_norm, learning_rate) of every logged step, from the final trainer_state.json."""
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [(e["step"], e["loss"], e["grad_norm"], e["learning_rate"]) for e in history if "loss" in e]


def resume(tiny_checkpoint, jsonl_dir, out, tmp_path):
    result = run_script("finetune_hf_trainer_ucf101.py", [*kill_args(tiny_checkpoint, jsonl_dir, out), "--resume_from_checkpoint",
                                                          "latest"], tmp_path, nproc=2)
    assert_ok(result)
    return result


def test_sigkill_of_one_rank_then_resume_matches_uninterrupted(tiny_checkpoint, kill_data, tmp_path, straight_run):
    jsonl_dir = kill_data
    out = tmp_path / "killed"
    process = start_torchrun(kill_args(tiny_checkpoint, jsonl_dir, out), tmp_path, {"PHI3V_TEST_SLOW_STEPS": "1.0"})
    try:
        wait_for(lambda: (out / "checkpoint-2" / "checkpoint_complete.json").is_file(), process)
        os.kill(worker_pids(str(out))[1], signal.SIGKILL)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode != 0
    assert not (out / "model.safetensors").exists()
    result = resume(tiny_checkpoint, jsonl_dir, out, tmp_path)
    assert "resuming from" in result.stderr
    assert_same_weights(straight_run, out)


def test_kill_during_a_checkpoint_write_keeps_the_previous_one(tiny_checkpoint, kill_data, tmp_path, straight_run):
    jsonl_dir = kill_data
    out = tmp_path / "killed-in-save"
    process = start_torchrun(kill_args(tiny_checkpoint, jsonl_dir, out), tmp_path, {"PHI3V_TEST_DIE_IN_SAVE_AT_STEP": "4"})
    process.wait(timeout=300)
    assert process.returncode != 0
    assert (out / "checkpoint-2" / "checkpoint_complete.json").is_file()
    assert (out / "checkpoint-4").is_dir() and not (out / "checkpoint-4" / "checkpoint_complete.json").exists()
    result = resume(tiny_checkpoint, jsonl_dir, out, tmp_path)
    assert "checkpoint-2" in result.stderr and "never completed" in result.stderr
    assert_same_weights(straight_run, out)


def test_a_second_signal_during_the_stop_checkpoint_exits_at_once_and_keeps_the_previous_one(tiny_checkpoint, kill_data,
                                                                                            tmp_path):
    # As SLURM does: SIGUSR1 to every process of the job (torchrun passes it on once more), later SIGTERM.
    out = tmp_path / "signalled-twice"
    env = {"PHI3V_TEST_SLOW_STEPS": "1.0", "PHI3V_TEST_SLOW_SAVE": "3:20"}
    process = start_torchrun(kill_args(tiny_checkpoint, kill_data, out), tmp_path, env, launcher="common.training.launch")
    try:
        wait_for(lambda: (out / "checkpoint-2" / "checkpoint_complete.json").is_file(), process)
        os.killpg(process.pid, signal.SIGUSR1)
        wait_for(lambda: any((out / f"checkpoint-{n}" / "checkpoint_writing.json").is_file() for n in (3, 4, 5)), process)
        time.sleep(REPEAT_GRACE_S + 0.5)
        started = time.time()
        os.killpg(process.pid, signal.SIGTERM)
        output = process.communicate(timeout=60)[0]
        exit_seconds = time.time() - started
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert exit_seconds < 15, "the second signal must not wait for the 20 s save"
    assert process.returncode not in (0, PREEMPTED_EXIT_CODE)
    assert "SIGTERM again while the checkpoint was being written: stopping now" in output
    assert f"{out / 'checkpoint-2'} is the newest complete checkpoint" in output
    stopped = [c for c in out.glob("checkpoint-*") if c.name != "checkpoint-2"]
    assert len(stopped) == 1 and not (stopped[0] / "checkpoint_complete.json").exists()
    manifest = json.loads((out / "checkpoint-2" / "checkpoint_complete.json").read_text())["files"]
    assert {name: file_sha256(out / "checkpoint-2" / name) for name in manifest} == manifest


# ------------------------------------------------------------------------------------------------------------
# Run folders


def copy_run(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_a_reused_output_dir_stops_at_start_and_resume_refuses_foreign_or_mixed_checkpoints(tiny_checkpoint, kill_data,
                                                                                           tmp_path, straight_run, capsys):
    out = copy_run(straight_run, tmp_path / "out")
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    other_data = relabelled(write_jsonl_data(tmp_path / "other-data"))
    args = [*kill_args(tiny_checkpoint, other_data, out)]
    args[args.index("--max_steps") + 1] = "2"

    code, stderr = run_main("finetune_hf_trainer_ucf101", args, capsys)
    assert code == 1 and "Loading weights" not in stderr
    error = one_error_line(stderr)
    assert f"{out} already holds checkpoint-4, checkpoint-6 and a final model of run {run_id}" in error
    assert "--resume_from_checkpoint latest" in error and "--overwrite_output_dir" in error and "another --output_dir" in error

    code, stderr = run_main("finetune_hf_trainer_ucf101", [*args, "--resume_from_checkpoint", "latest"], capsys)
    error = one_error_line(stderr)
    assert code == 1 and f"{out} holds run {run_id}, trained with other settings" in error
    assert "data " in error and "max_steps 6 -> 2" in error

    # The same settings as the run, but checkpoint-6 took another checkpoint's optimizer.
    same = [*kill_args(tiny_checkpoint, kill_data, out), "--resume_from_checkpoint", "latest"]
    shutil.copyfile(out / "checkpoint-4" / "optimizer.pt", out / "checkpoint-6" / "optimizer.pt")
    code, stderr = run_main("finetune_hf_trainer_ucf101", same, capsys)
    assert code == 1 and f"{out / 'checkpoint-6'} mixes parts" in one_error_line(stderr) and "optimizer.pt" in stderr

    # A checkpoint of another run copied in.
    shutil.rmtree(out / "checkpoint-6")
    marker = out / "checkpoint-4" / "checkpoint_complete.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "run_id": "0123456789ab"}))
    code, stderr = run_main("finetune_hf_trainer_ucf101", same, capsys)
    assert code == 1 and f"belongs to run 0123456789ab (its checkpoint_complete.json), not to run {run_id}" in one_error_line(stderr)
    assert (out / "checkpoint-4" / "optimizer.pt").is_file(), "a refused checkpoint is left as it is"


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def test_overwrite_output_dir_moves_the_previous_run_aside(straight_run, tmp_path):
    out = copy_run(straight_run, tmp_path / "out")
    (out / "my-notes.txt").write_text("mine")
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    RunFolder(SimpleNamespace(output_dir=str(out), resume_from_checkpoint=None, overwrite_output_dir=True)).move_previous_run_aside()
    moved = out / f"previous-run-{run_id}"
    assert sorted(p.name for p in out.iterdir()) == ["my-notes.txt", moved.name]
    assert (moved / "checkpoint-6" / "optimizer.pt").is_file() and (moved / "model.safetensors").is_file()
    assert (moved / "run.json").is_file() and (moved / "trainer_state.json").is_file()


def test_resume_takes_a_complete_checkpoint_without_marker_and_moves_a_partial_one_aside(tiny_checkpoint, kill_data,
                                                                                        tmp_path, straight_run):
    # As the stock Trainer leaves a folder: no run.json, no markers; checkpoint-6 lost parts in a kill.
    out = copy_run(straight_run, tmp_path / "out")
    for name in ("run.json", "model.safetensors", "checkpoint-4/checkpoint_complete.json", "checkpoint-6/checkpoint_complete.json",
                 "checkpoint-6/optimizer.pt", "checkpoint-6/rng_state_1.pth"):
        (out / name).unlink()
    result = resume(tiny_checkpoint, kill_data, out, tmp_path)
    assert "is incomplete (no optimizer.pt, rng_state_1.pth): moved it to" in result.stderr
    assert f"{out / 'checkpoint-4'} has no manifest" in result.stderr and f"resuming from {out / 'checkpoint-4'}" in result.stderr
    assert (out / "incomplete-checkpoint-6" / "model.safetensors").is_file()
    assert (out / "checkpoint-4" / "optimizer.pt").is_file(), "rotation keeps checkpoints this run did not write"
    assert_same_weights(straight_run, out)


def test_a_full_disk_during_a_save_is_one_line_and_the_previous_checkpoint_resumes(tiny_checkpoint, kill_data, tmp_path):
    # One single-process checkpoint of the tiny model takes ~53 MB: the first fits, the second does not (the
    # check before training would refuse this disk: --skip_disk_check lets the write itself fail).
    with small_filesystem(tmp_path / "disk", "80m") as disk:
        out = disk / "out"
        args = [*kill_args(tiny_checkpoint, kill_data, out), "--max_steps", "2", "--save_steps", "1", "--skip_disk_check"]
        result = run_script("finetune_hf_trainer_ucf101.py", args, tmp_path)
        assert result.returncode == 1
        error = one_error_line(result.stderr)
        assert f"could not write {out / 'checkpoint-2'}: no space left on the device (" in error and "free on its filesystem" in error
        assert "checkpoint-1 is complete and intact" in error and "--resume_from_checkpoint latest" in error
        assert not (out / "checkpoint-2").exists()
        subprocess.run(["mount", "-o", "remount,size=400m", str(disk)], check=True)
        resumed = run_script("finetune_hf_trainer_ucf101.py", [*args, "--resume_from_checkpoint", "latest"], tmp_path)
        assert_ok(resumed)
        assert f"resuming from {out / 'checkpoint-1'}" in resumed.stderr
        assert (out / "model.safetensors").is_file()


def test_data_fingerprint_follows_the_rows_not_where_the_data_lies(tmp_path):
    from common.data.dataset import load_jsonl_conversations

    first, second = write_jsonl_data(tmp_path / "a"), write_jsonl_data(tmp_path / "elsewhere" / "b")
    fingerprint = lambda data: data_fingerprint(RecipeDataset(load_jsonl_conversations(data / "ucf101_train.jsonl", data / "images"),
                                                              name="ucf101 train"))
    assert fingerprint(first) == fingerprint(second)
    assert fingerprint(first) != fingerprint(relabelled(second))


def relabelled(data: Path) -> Path:
    """The same videos, the first one with the other class as its answer: other training data."""
    turn = {"images": ["train/v0.0.jpg", "train/v0.1.jpg"], "user": CLASS_PROMPT, "assistant": "Blue"}
    replace_train_line(data, 1, json.dumps({"id": "train-0000000000", "source": "test", "conversations": [turn]}))
    return data
