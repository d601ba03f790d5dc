"""The hateful-memes, NLVR2 and UCF-101 recipes train a few steps on synthetic data and evaluate before/after."""

import json
import subprocess
import sys

import pytest

from .recipe_utils import REPO_ROOT, assert_ok, assert_ranks_in_sync, offline_env, read_eval, run_script
from .test_reliability import run_main

pytestmark = pytest.mark.slow
COMMON = ["--num_crops", "1", "--max_steps", "2", "--eval_batch_size", "4", "--max_new_tokens", "4",
          "--dataloader_num_workers", "0", "--learning_rate", "1e-3", "--warmup_steps", "0", "--logging_steps", "1"]


def assert_recipe_outputs(out, result):
    assert_ok(result)
    read_eval(out, "before"), read_eval(out, "after")
    assert (out / "training_curves.png").stat().st_size > 10_000
    assert "evaluation (after)" in result.stderr + result.stdout


def test_hateful_memes_lora(tiny_checkpoint, tmp_path):
    from common.fixtures.synthetic import make_hateful_memes

    make_hateful_memes(n=16, seed=0).save_to_disk(str(tmp_path / "data"))
    out = tmp_path / "out"
    args = ["--model_name_or_path", tiny_checkpoint, "--dataset_path", tmp_path / "data", "--num_eval_rows", "4",
            "--output_dir", out, "--use_lora", "--lora_rank", "4", "--batch_size", "4", *COMMON]
    result = run_script("finetune_hf_trainer_hateful_memes.py", args, tmp_path)
    assert_recipe_outputs(out, result)
    assert len(read_eval(out, "after")["examples"]) == 4
    assert (out / "adapter_model.safetensors").is_file()


def test_nlvr2_full_two_images_packed_and_grouped(tiny_checkpoint, tmp_path):
    from common.fixtures.synthetic import make_nlvr2

    make_nlvr2(n=12, seed=0).save_to_disk(str(tmp_path / "data"))
    out = tmp_path / "out"
    args = ["--model_name_or_path", tiny_checkpoint, "--dataset_path", tmp_path / "data", "--num_eval_rows", "3",
            "--output_dir", out, "--batch_size", "2", "--batch_size_per_gpu", "2", "--deepspeed", "none",
            "--padding_free", "--train_sampling_strategy", "group_by_length", *COMMON]
    result = run_script("finetune_hf_trainer_nlvr2.py", args, tmp_path)
    assert_recipe_outputs(out, result)
    first = read_eval(out, "before")["examples"][0]
    assert first["references"] and first["id"] == "row-0"


def test_ucf101_converted_videos_two_processes(tiny_checkpoint, tmp_path):
    from common.fixtures.synthetic import write_ucf101_videos

    videos = write_ucf101_videos(tmp_path / "videos", classes=3, videos_per_class=2)
    data = tmp_path / "ucf101"
    converted = subprocess.run([sys.executable, "convert_ucf101.py", "--video_dir", str(videos.root), "--out_dir", str(data),
                                "--num_workers", "1"], cwd=REPO_ROOT, env=offline_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert_ok(converted)
    out, digests = tmp_path / "out", tmp_path / "digests"
    args = ["--model_name_or_path", tiny_checkpoint, "--data_dir", data, "--output_dir", out, "--freeze_vision_model",
            "--batch_size", "4", "--batch_size_per_gpu", "2", "--eval_on_test", "--ddp_backend", "gloo", *COMMON]
    result = run_script("finetune_hf_trainer_ucf101.py", args, tmp_path, nproc=2, env={"PHI3V_TEST_DIGEST_DIR": digests})
    assert_recipe_outputs(out, result)
    assert_ranks_in_sync(digests)
    after = read_eval(out, "after")
    assert after["num_examples"] == 6 and {e["id"] for e in after["examples"]} == {f"val-{i:010d}" for i in range(6)}
    assert json.loads((out / "eval_test.json").read_text())["num_examples"] == 6


def test_ucf101_without_converted_data_says_what_to_run(tiny_checkpoint, tmp_path, capsys):
    # In this process: the check comes before anything is loaded.
    code, stderr = run_main("finetune_hf_trainer_ucf101", ["--model_name_or_path", tiny_checkpoint, "--data_dir",
                                                           tmp_path / "nothing", "--output_dir", tmp_path / "o",
                                                           "--deepspeed", "none"], capsys)
    assert code == 1
    assert "convert_ucf101.py" in stderr
