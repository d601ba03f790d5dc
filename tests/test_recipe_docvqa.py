"""The DocVQA recipe end to end on the tiny checkpoint and synthetic data, in every training mode."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.model.modeling_phi3v import Phi3VForCausalLM

from .recipe_utils import REPO_ROOT, assert_ok, assert_ranks_in_sync, launched_as_one_process, offline_env, read_eval, run_script, weights

SCRIPT = "finetune_hf_trainer_docvqa.py"
VISION = "model.vision_embed_tokens."
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def docvqa_data(tmp_path_factory):
    from common.fixtures.synthetic import make_docvqa

    path = tmp_path_factory.mktemp("docvqa")
    make_docvqa(n=12, seed=0).save_to_disk(str(path))
    return path


def base_args(checkpoint, data, output_dir, *extra):
    return [
        "--model_name_or_path", checkpoint, "--dataset_path", data, "--output_dir", output_dir,
        "--num_crops", "1", "--max_steps", "2", "--max_eval_samples", "3", "--eval_batch_size", "2",
        "--max_new_tokens", "4", "--dataloader_num_workers", "0", "--logging_steps", "1",
        "--learning_rate", "1e-3", "--warmup_steps", "0", "--save_steps", "1", *extra,
    ]


def changed(before: dict, after: dict, prefix: str) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix) and k in after)


def periodic_evaluations(output_dir, metric: str = "anls") -> tuple[list[dict], list[int]]:
    """The evaluations during training in the log history, and the steps at which each became the best so far:
    a later one replaces the best only when strictly better (lower for the loss), so the last of these steps is
    the best checkpoint the Trainer must have recorded."""
    state = json.loads((output_dir / "trainer_state.json").read_text())
    evaluations = [entry for entry in state["log_history"] if f"eval_{metric}" in entry]
    sign = -1 if metric == "loss" else 1
    improved, best = [], None
    for entry in evaluations:
        if best is None or sign * entry[f"eval_{metric}"] > sign * best:
            improved.append(entry["step"])
            best = entry[f"eval_{metric}"]
    assert state["best_metric"] == best
    assert Path(state["best_model_checkpoint"]).name == f"checkpoint-{improved[-1]}"
    assert all("eval_loss" in entry for entry in evaluations)
    assert all((output_dir / f"eval_step{entry['step']}.json").is_file() for entry in evaluations)
    return evaluations, improved


def predictions(output_dir, evaluation: str) -> list[str]:
    return [record["prediction"] for record in read_eval(output_dir, evaluation)["examples"]]


def test_full_finetuning_zero2_two_processes(tiny_checkpoint, docvqa_data, tmp_path):
    out, digests = tmp_path / "out", tmp_path / "digests"
    rates = {"decoder": 1e-3, "vision tower": 1e-4, "projection": 5e-4}
    args = base_args(tiny_checkpoint, docvqa_data, out, "--batch_size", "4", "--eval_strategy", "steps", "--eval_steps", "1",
                     "--load_best_model_at_end", "--vision_learning_rate", "1e-4", "--projection_learning_rate", "5e-4")
    result = run_script(SCRIPT, args, tmp_path, nproc=2, env={"PHI3V_TEST_DIGEST_DIR": digests})
    assert_ok(result)
    assert (out / "checkpoint-2" / "global_step2").is_dir(), "the default full fine-tuning must run DeepSpeed ZeRO-2"
    assert all(re.search(rf"{part}\s+{rate:g}\s", result.stderr) for part, rate in rates.items()), "each part's rate is logged"
    # The part groups reached DeepSpeed's optimizer, and one step of linear decay halved each part's own rate.
    zero_state, = (out / "checkpoint-1" / "global_step1").glob("*zero_pp_rank_0_*optim_states.pt")
    groups = torch.load(zero_state, weights_only=False)["optimizer_state_dict"]["base_optimizer_state"]["param_groups"]
    assert [(g["part"], g["lr"]) for g in groups] == [(part, pytest.approx(rate / 2)) for part, rate in rates.items() for _ in (0, 1)]
    assert_ranks_in_sync(digests)
    evaluations, improved = periodic_evaluations(out)
    assert [entry["step"] for entry in evaluations] == [1, 2]
    # ANLS by default (the recipe's metric); the untrained tiny model scores the same at both steps, so the best
    # is the first checkpoint, not the last, and the final model must hold its weights.
    assert improved == [1]
    before, after = weights(tiny_checkpoint / "model.safetensors"), weights(out / "model.safetensors")
    kept = weights(out / "checkpoint-1" / "model.safetensors")
    assert all(torch.equal(after[name], kept[name].to(after[name].dtype)) for name in kept), "the final model is the best checkpoint"
    assert predictions(out, "step1") == predictions(out, "after")
    assert set(after) == set(before), "the final model has exactly the base's weight names"
    assert set(Phi3VForCausalLM.from_pretrained(out).state_dict()) <= set(after)
    assert changed(before, after, "model.layers.") and changed(before, after, VISION)
    read_eval(out, "before"), read_eval(out, "after")
    assert (out / "training_curves.png").stat().st_size > 10_000
    assert (out / "preprocessor_config.json").is_file() and (out / "tokenizer.json").is_file()


def test_frozen_vision_keeps_tower_bit_identical(tiny_checkpoint, docvqa_data, tmp_path):
    out = tmp_path / "out"
    args = base_args(tiny_checkpoint, docvqa_data, out, "--freeze_vision_model", "--batch_size", "2", "--save_dtype", "bfloat16",
                     "--report_to", "tensorboard")
    result = run_script(SCRIPT, args, tmp_path)
    assert_ok(result)
    assert any(path.stat().st_size > 0 for path in out.rglob("events.out.tfevents.*")), "--report_to tensorboard writes events"
    before, after = weights(tiny_checkpoint / "model.safetensors"), weights(out / "model.safetensors")
    # The final model is written in --save_dtype, with exactly the base's weight names; checkpoints stay fp32.
    assert set(after) == set(before) and {t.dtype for t in after.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert {t.dtype for t in weights(out / "checkpoint-2" / "model.safetensors").values()} == {torch.float32}
    assert json.loads((out / "checkpoint-2" / "config.json").read_text())["rope_scaling"]["type"] == "su"
    frozen = [k for k in after if k.startswith(VISION)]
    assert frozen and all(torch.equal(before[k].to(torch.bfloat16), after[k]) for k in frozen)
    before = {k: v.to(torch.bfloat16) for k, v in before.items()}
    assert changed(before, after, "model.layers.") and changed(before, after, "model.embed_tokens.")
    assert "vision tower" in result.stderr + result.stdout
    read_eval(out, "before"), read_eval(out, "after")


def test_lora_two_processes_with_merge(tiny_checkpoint, docvqa_data, tmp_path):
    out, digests = tmp_path / "out", tmp_path / "digests"
    args = base_args(tiny_checkpoint, docvqa_data, out, "--use_lora", "--lora_rank", "4", "--batch_size", "4",
                     "--batch_size_per_gpu", "2", "--merge_lora", "--eval_strategy", "steps", "--eval_steps", "1",
                     "--save_strategy", "best", "--load_best_model_at_end")
    result = run_script(SCRIPT, args, tmp_path, nproc=2, env={"PHI3V_TEST_DIGEST_DIR": digests})
    assert_ok(result)
    assert_ranks_in_sync(digests)
    evaluations, improved = periodic_evaluations(out)
    assert [entry["step"] for entry in evaluations] == [1, 2]
    # --save_strategy best writes a checkpoint only when the score improves: the untrained model's ANLS does not.
    assert improved == [1] and sorted(path.name for path in out.glob("checkpoint-*")) == ["checkpoint-1"]
    adapter = weights(out / "adapter_model.safetensors")
    assert any("vision_model.encoder.layers" in k for k in adapter) and any("qkv_proj" in k for k in adapter)
    assert any(k.endswith("lora_B.weight") and torch.count_nonzero(v) for k, v in adapter.items())
    assert all(".lora_A." in k or ".lora_B." in k for k in adapter), "an adapter holds no copy of base weights"
    kept = weights(out / f"checkpoint-{improved[-1]}" / "adapter_model.safetensors")
    assert all(".lora_" in k for k in kept)
    assert kept.keys() == adapter.keys() and all(torch.equal(adapter[k], kept[k]) for k in kept), "the final adapter is the best one"
    merged = Phi3VForCausalLM.from_pretrained(out / "merged")
    base = weights(tiny_checkpoint / "model.safetensors")
    assert changed(base, merged.state_dict(), "model.layers.")
    assert set(weights(out / "merged" / "model.safetensors")) == set(base)
    assert json.loads((out / "merged" / "generation_config.json").read_text())["eos_token_id"] == [32007, 32000, 2]
    read_eval(out, "before"), read_eval(out, "after")


def test_qlora_single_process(tiny_checkpoint, docvqa_data, tmp_path):
    out = tmp_path / "out"
    args = base_args(tiny_checkpoint, docvqa_data, out, "--use_qlora", "--bf16", "--lora_rank", "4", "--batch_size", "2",
                     "--batch_size_per_gpu", "2")
    result = run_script(SCRIPT, args, tmp_path)
    assert_ok(result)
    adapter = weights(out / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and torch.count_nonzero(v) for k, v in adapter.items())
    read_eval(out, "before"), read_eval(out, "after")


def test_resume_matches_an_uninterrupted_run(tiny_checkpoint, docvqa_data, tmp_path):
    # Full fine-tuning without DeepSpeed: the Trainer loads the checkpoint's model.safetensors back. A stopped run
    # writes the same checkpoint as one that goes on, so the interrupted run is the uninterrupted one's
    # checkpoint-2 alone in a new folder, with its run.json.
    common = ["--batch_size", "2", "--deepspeed", "none", "--skip_eval_before", "--skip_eval_after", "--max_steps", "4",
              "--save_total_limit", "3"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert_ok(run_script(SCRIPT, base_args(tiny_checkpoint, docvqa_data, straight, *common), tmp_path))
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    shutil.copy2(straight / "run.json", resumed / "run.json")
    second = run_script(SCRIPT, base_args(tiny_checkpoint, docvqa_data, resumed, *common, "--resume_from_checkpoint", "latest"), tmp_path)
    assert_ok(second)
    assert "resuming from" in second.stderr + second.stdout
    # The checkpoint carries the base's unused tower tensors, which loading it back must pass over in silence.
    assert "unexpected keys" not in second.stderr + second.stdout
    a, b = weights(straight / "model.safetensors"), weights(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "flags, reason",
    [
        (["--use_flash_attention"], "--bf16"),
        (["--fp16"], "--fp16 needs a CUDA GPU"),
        (["--train_sampling_strategy", "batch_rebalance"], "batch_rebalance is not supported"),
        (["--num_crops", "17"], "num_crops"),
        (["--batch_size", "3", "--batch_size_per_gpu", "2"], "divisible"),
        (["--merge_lora"], "--merge_lora"),
        (["--report_to", "wandb"], "pip install wandb"),
        (["--eval_strategy", "steps", "--metric_for_best_model", "bleu"], "this recipe's evaluations report anls"),
        (["--fsdp", "full_shard auto_wrap"], "--fsdp needs CUDA GPUs: on CPU accelerate ignores it and would train plain DDP"),
    ],
)
def test_impossible_flag_combinations_fail_before_loading(tmp_path, capsys, monkeypatch, flags, reason):
    # In this process: exit 2 comes from the parser, whereas loading the missing model would exit 1.
    from transformers import TrainingArguments

    from finetune_hf_trainer_docvqa import main

    def process_group_setup(self):
        raise AssertionError("the refusal must come before TrainingArguments sets up the default ZeRO-2's process group")

    launched_as_one_process(monkeypatch)
    monkeypatch.setattr(TrainingArguments, "__post_init__", process_group_setup)
    with pytest.raises(SystemExit) as stopped:
        main(["--model_name_or_path", str(tmp_path / "does-not-exist"), "--output_dir", str(tmp_path / "o"), *flags])
    assert stopped.value.code == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and reason in error_lines[0]


def test_an_impossible_flag_stops_the_script_before_loading(tmp_path):
    command = [sys.executable, SCRIPT, "--model_name_or_path", str(tmp_path / "does-not-exist"), "--output_dir", str(tmp_path / "o"), "--fp16"]
    result = subprocess.run(command, cwd=REPO_ROOT, env=offline_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    error_lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and "--fp16 needs a CUDA GPU" in error_lines[0]
    assert "Loading weights" not in result.stderr


def test_full_finetuning_zero3_two_processes_saves_whole_weights(tiny_checkpoint, docvqa_data, tmp_path):
    out = tmp_path / "out"
    args = base_args(tiny_checkpoint, docvqa_data, out, "--batch_size", "4", "--deepspeed", REPO_ROOT / "ds_configs" / "zero3.json",
                     "--eval_strategy", "steps", "--eval_steps", "2")
    assert_ok(run_script(SCRIPT, args, tmp_path, nproc=2))
    # Generation during training with the ZeRO-3 engine (3 examples on 2 ranks: synced generation) answers as
    # the saved model does when loaded afresh.
    assert predictions(out, "step2") == predictions(out, "after")
    before, after = weights(tiny_checkpoint / "model.safetensors"), weights(out / "model.safetensors")
    assert set(after) == set(before), "the final model has exactly the base's weight names"
    assert set(Phi3VForCausalLM.from_pretrained(out).state_dict()) <= set(after)
    assert all(after[k].shape == before[k].shape for k in after), "ZeRO-3 must gather whole tensors for the final save"
    assert changed(before, after, "model.layers.") and changed(before, after, VISION)
    assert (out / "checkpoint-2" / "checkpoint_complete.json").is_file()
    read_eval(out, "before"), read_eval(out, "after")
