"""Bad input, kills and untrusted files: each stops or resumes the run as promised, naming what is wrong."""

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from .recipe_utils import DRIVER, REPO_ROOT, assert_ok, offline_env, run_script, weights

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
    assert f"ucf101_train.jsonl:3" in stderr and message in stderr, stderr
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.fixture
def docvqa_rows(tmp_path):
    from common.synthetic import make_docvqa

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

    from common.arguments import parse_args
    from common.training import load_model

    args, = parse_args(argv=["--model_name_or_path", str(pickled), "--output_dir", str(tmp_path / "o"), "--deepspeed", "none",
                            "--allow_pickle_weights"])
    assert load_model(args).lm_head.weight.shape[0] == 32064


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
    """{LOCAL_RANK: pid} of the torchrun workers whose command line mentions `marker`."""
    workers = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().decode(errors="replace")
            environ = (entry / "environ").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        local_rank = next((item.split("=", 1)[1] for item in environ if item.startswith("LOCAL_RANK=")), None)
        if marker in command and str(DRIVER) in command and local_rank is not None:
            workers[int(local_rank)] = int(entry.name)
    return workers


def kill_args(checkpoint, data, out):
    return ["--model_name_or_path", checkpoint, "--data_dir", data, "--output_dir", out, "--num_crops", "1",
            "--max_steps", "6", "--save_steps", "2", "--batch_size", "2", "--batch_size_per_gpu", "1", "--deepspeed", "none",
            "--skip_eval_before", "--skip_eval_after", "--dataloader_num_workers", "0", "--learning_rate", "1e-3",
            "--warmup_steps", "0", "--seed", "3"]


def start_torchrun(args, tmp_path, env):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(DRIVER),
               "finetune_hf_trainer_ucf101.py", *map(str, args)]
    return subprocess.Popen(command, cwd=REPO_ROOT, env=offline_env(tmp_path, **env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


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
def straight_run(tiny_checkpoint, kill_data, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("straight")
    out = tmp_path / "out"
    assert_ok(run_script("finetune_hf_trainer_ucf101.py", kill_args(tiny_checkpoint, kill_data, out), tmp_path, nproc=2))
    return weights(out / "model.safetensors")


def assert_same_weights(expected, out: Path):
    actual = weights(out / "model.safetensors")
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-6, msg=name)


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
