"""finetune_hf_trainer_custom.py trains on each data format and evaluates: messages with content parts and a system
turn, and a save_to_disk dataset with column options, under torchrun with 2 processes; a LLaVA array, LLaVA JSONL
with <image> mid-text and this project's JSONL in one process. predict answers what the evaluation answered."""

import json
import random

import datasets
import pytest

from common.fixtures.synthetic import _shapes_image, write_custom_llava
from common.outputs import predict

from .recipe_utils import assert_ok, assert_ranks_in_sync, read_eval, run_script

pytestmark = pytest.mark.slow
SCRIPT = "finetune_hf_trainer_custom.py"
COMMON = ["--num_crops", "1", "--max_steps", "2", "--eval_batch_size", "4", "--max_new_tokens", "4", "--use_lora",
          "--lora_rank", "4", "--learning_rate", "1e-3", "--warmup_steps", "0", "--logging_steps", "1", "--skip_eval_before"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def shape_images(folder, count, seed=0):
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for index in range(count):
        names.append(f"s{index}.png")
        _shapes_image(rng, index % 4 + 1).save(folder / names[-1])
    return names


def messages_rows(names, start):
    rows = []
    for index in range(start, start + 4):
        if index % 2:
            user = [{"type": "image", "path": names[index]}, {"type": "text", "text": "How many shapes?"}]
        else:
            user = [{"type": "text", "text": "Compare"}, {"type": "image", "path": names[index]}, {"type": "image", "path": names[index + 1]}]
        rows.append({"id": f"m{index}", "messages": [
            {"role": "system", "content": "Answer with a number."}, {"role": "user", "content": user},
            {"role": "assistant", "content": str(index % 4 + 1)},
            {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "yes" if index % 3 else "no"}]})
    return rows


@pytest.fixture(scope="module")
def messages_run(tiny_checkpoint, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("custom-messages")
    names = shape_images(tmp_path / "images", 13)
    train = write_jsonl(tmp_path / "train.jsonl", messages_rows(names, 0) + messages_rows(names, 4))
    held = write_jsonl(tmp_path / "val.jsonl", messages_rows(names, 8))
    out, digests = tmp_path / "out", tmp_path / "digests"
    args = ["--model_name_or_path", tiny_checkpoint, "--train_file", train, "--eval_file", held, "--image_root", tmp_path / "images",
            "--eval_turn", "all", "--output_dir", out, "--batch_size", "4", "--batch_size_per_gpu", "2",
            "--ddp_backend", "gloo", "--dataloader_num_workers", "2", *COMMON]
    result = run_script(SCRIPT, args, tmp_path, nproc=2, env={"PHI3V_TEST_DIGEST_DIR": digests})
    return tmp_path, out, digests, result


def test_messages_with_parts_and_a_system_turn_under_torchrun(messages_run):
    _, out, digests, result = messages_run
    assert_ok(result)
    assert_ranks_in_sync(digests)
    assert "val.jsonl: read as messages" in result.stderr and "train.jsonl: read as messages" in result.stderr
    after = read_eval(out, "after")
    assert [e["id"] for e in after["examples"]] == [f"m{i}#{turn}" for i in range(8, 12) for turn in (1, 2)]
    assert after["examples"][1]["references"] == ["yes"] and after["metric"] == "accuracy"
    assert (out / "adapter_model.safetensors").is_file()


def test_predict_answers_the_evaluation_file_as_the_evaluation_did(messages_run, tmp_path):
    folder, out, _, result = messages_run
    assert_ok(result)
    output = tmp_path / "predictions.jsonl"
    predict.main(["--model", str(out), "--jsonl", str(folder / "val.jsonl"), "--image_root", str(folder / "images"),
                  "--output", str(output), "--max_new_tokens", "4"])
    predicted = [json.loads(line) for line in output.read_text().splitlines()]
    first_turns = [e for e in read_eval(out, "after")["examples"] if e["id"].endswith("#1")]
    assert [p["id"] for p in predicted] == [f"m{i}" for i in range(8, 12)]
    assert [p["prediction"] for p in predicted] == [e["prediction"] for e in first_turns]
    assert [p["references"] for p in predicted] == [e["references"] for e in first_turns]


def test_save_to_disk_dataset_with_column_options_and_loss_only_under_torchrun(tiny_checkpoint, tmp_path):
    rng = random.Random(2)
    rows = []
    for index in range(10):
        count = index % 3
        rows.append({"pictures": [_shapes_image(rng, k + 1) for k in range(count)], "dialogue": [
            {"from": "human", "value": "<image>" * count + f"Row {index}: how many pictures?"}, {"from": "gpt", "value": str(count)}]})
    datasets.Dataset.from_list(rows).cast_column("pictures", datasets.List(datasets.Image())).save_to_disk(str(tmp_path / "data"))
    out = tmp_path / "out"
    args = ["--model_name_or_path", tiny_checkpoint, "--dataset_path", tmp_path / "data", "--messages_column", "dialogue",
            "--images_column", "pictures", "--eval_fraction", "0.2", "--metric", "none", "--output_dir", out,
            "--batch_size", "4", "--batch_size_per_gpu", "2", "--ddp_backend", "gloo", "--dataloader_num_workers", "0",
            *[flag for flag in COMMON if flag != "--skip_eval_before"]]
    result = run_script(SCRIPT, args, tmp_path, nproc=2)
    assert_ok(result)
    before, after = (json.loads((out / f"eval_{name}.json").read_text()) for name in ("before", "after"))
    assert before["metric"] == after["metric"] == "loss" and before["num_examples"] == 2
    assert after["score"] != before["score"]
    assert "evaluation (after): loss" in result.stderr
    assert not any(out.glob("eval_step*.json"))


def our_jsonl_rows(names):
    return [{"id": f"o{i}", "conversations": [{"images": [names[i]], "user": "How many?", "assistant": str(i % 4 + 1)}]} for i in range(8)]


@pytest.mark.parametrize("kind", ["llava_array", "llava_jsonl_mid_text", "our_jsonl"])
def test_file_formats_train_and_evaluate(kind, tiny_checkpoint, tmp_path):
    if kind == "llava_array":
        train = write_custom_llava(tmp_path / "data", n=8)
        flags, expected = ["--eval_fraction", "0.25"], "llava"
    elif kind == "llava_jsonl_mid_text":
        names = shape_images(tmp_path / "data", 10)
        rows = [{"id": f"l{i}", "image": [names[i], names[i + 1]], "conversations": [
            {"from": "human", "value": f"First <image> then <image>: which has more, {i}?"}, {"from": "gpt", "value": str(i % 4)}]}
            for i in range(9)]
        train = write_jsonl(tmp_path / "data" / "train.jsonl", rows[:6])
        flags, expected = ["--eval_file", write_jsonl(tmp_path / "data" / "val.jsonl", rows[6:]), "--eval_turn", "last"], "llava"
    else:
        names = shape_images(tmp_path / "data", 8)
        train = write_jsonl(tmp_path / "data" / "train.jsonl", our_jsonl_rows(names))
        flags, expected = ["--eval_fraction", "0.25", "--metric", "exact_match", "--system_prompt", "Count."], "jsonl"
    out = tmp_path / "out"
    args = ["--model_name_or_path", tiny_checkpoint, "--train_file", train, "--output_dir", out, "--batch_size", "2",
            "--batch_size_per_gpu", "2", "--dataloader_num_workers", "0", *flags, *COMMON]
    result = run_script(SCRIPT, args, tmp_path)
    assert_ok(result)
    assert f"read as {expected}" in result.stderr
    after = read_eval(out, "after")
    assert after["num_examples"] in (2, 3)
    assert "optimizer steps (fewer than 10)" in result.stderr
