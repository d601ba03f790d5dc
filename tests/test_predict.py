"""python -m common.predict: one prompt, batch mode over JSONL or a folder, torchrun sharding, kill and resume."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.data.dataset import jsonl_prediction_examples
from common.evaluation.generation import evaluate
from common.model.modeling_phi3v import Phi3VForCausalLM
from common.model.processing_phi3v import Phi3VProcessor
from common.outputs import predict

from .recipe_utils import REPO_ROOT, assert_ok, offline_env
from .test_export import make_adapter

PROMPT = "What is shown here? Answer briefly."


def write_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        path = folder / f"img{index:03d}.png"
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    return write_images(tmp_path_factory.mktemp("images"), 3)


def evaluation_predictions(model, processor, examples, tmp_path) -> list[str]:
    """What the recipes' evaluation answers for the same examples."""
    evaluate(model, processor, examples, "accuracy", tmp_path / "eval.json", 
             batch_size=2, max_new_tokens=6)
    return [record["prediction"] for record in json.loads((tmp_path / "eval.json").read_text())["examples"]]


def test_one_prompt_prints_the_answer_the_evaluation_gives(tiny_checkpoint, images, tmp_path, capsys):
    predict.main(["--model", str(tiny_checkpoint), "--image", str(images[0]), str(images[1]), "--prompt", PROMPT,
                  "--max_new_tokens", "6", "--num_crops", "1"])
    printed = capsys.readouterr().out.strip().splitlines()
    example = predict.prompt_example("prompt", [Image.open(images[0]).convert("RGB"), Image.open(images[1]).convert("RGB")], PROMPT, ["-"])
    assert example["messages"][0]["content"] == f"<|image_1|><|image_2|>\n{PROMPT}"
    model = Phi3VForCausalLM.from_pretrained(tiny_checkpoint).eval()
    processor = Phi3VProcessor.from_pretrained(tiny_checkpoint, num_crops=1)
    assert printed[-1:] == evaluation_predictions(model, processor, [example], tmp_path)


def test_jsonl_batch_with_an_adapter_run_writes_one_line_per_example_in_order(tiny_checkpoint, images, tmp_path):
    from peft import PeftModel

    adapter = make_adapter(tiny_checkpoint, tmp_path / "lora")
    lines = [
        {"id": "b", "conversations": [{"images": [images[1].name], "user": PROMPT, "assistant": "cat"}]},
        {"id": "a", "conversations": [{"images": [images[0].name, images[2].name], "user": "Same?"}]},
        {"id": "c", "conversations": [{"user": "No image here.", "assistant": ""}, {"user": "later turn", "assistant": "x"}]},
    ]
    jsonl = tmp_path / "inputs.jsonl"
    jsonl.write_text("".join(json.dumps(line) + "\n" for line in lines))
    output = tmp_path / "predictions.jsonl"
    # The LoRA run's output alone: its adapter_config.json names the base.
    predict.main(["--model", str(adapter), "--jsonl", str(jsonl), "--image_root", str(images[0].parent),
                  "--output", str(output), "--batch_size", "2", "--max_new_tokens", "6"])
    records = read_jsonl(output)
    assert [r["id"] for r in records] == ["b", "a", "c"]
    assert records[0]["references"] == ["cat"] and "references" not in records[1]
    assert records[1]["images"] == [str(images[0]), str(images[2])]
    assert not output.with_name(output.name + ".parts").exists()

    model = PeftModel.from_pretrained(Phi3VForCausalLM.from_pretrained(tiny_checkpoint), adapter).eval()
    processor = Phi3VProcessor.from_pretrained(adapter)
    examples = [
        predict.open_images({**example, "references": example["references"] or ["-"]})
        for example in jsonl_prediction_examples(jsonl, images[0].parent)
    ]
    assert [r["prediction"] for r in records] == evaluation_predictions(model, processor, examples, tmp_path)


def count_lines(parts: Path) -> int:
    return sum(path.read_text().count("\n") for path in parts.glob("rank*.jsonl")) if parts.is_dir() else 0


@pytest.mark.slow
def test_torchrun_batch_killed_then_resumed_equals_an_uninterrupted_run(tiny_checkpoint, tmp_path):
    folder = tmp_path / "scans"
    write_images(folder / "sub", 4, seed=1)
    write_images(folder, 28, seed=2)
    flags = ["--model", str(tiny_checkpoint), "--image_dir", str(folder), "--prompt", PROMPT, "--batch_size", "2",
             "--max_new_tokens", "24", "--num_crops", "1"]
    straight = tmp_path / "straight.jsonl"
    assert_ok(subprocess.run([sys.executable, "-m", "common.predict", *flags, "--output", str(straight)], cwd=REPO_ROOT,
                             env=offline_env(tmp_path), capture_output=True, text=True, timeout=300))

    output = tmp_path / "resumed.jsonl"
    parts = output.with_name(output.name + ".parts")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "common.predict",
               *flags, "--output", str(output)]
    first = subprocess.Popen(command, cwd=REPO_ROOT, env=offline_env(tmp_path), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while count_lines(parts) < 6 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    # torchrun starts its workers in sessions of their own: kill the whole tree, as a lost node would.
    import psutil

    tree = psutil.Process(first.pid)
    for process in [*tree.children(recursive=True), tree]:
        process.kill()
    first.wait()
    done_before = count_lines(parts)
    assert not output.exists() and 6 <= done_before < 32, f"the kill came too late or too early ({done_before} lines)"

    second = subprocess.run(command, cwd=REPO_ROOT, env=offline_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert_ok(second)
    assert "already predicted" in second.stderr
    expected, resumed = read_jsonl(straight), read_jsonl(output)
    assert [r["id"] for r in resumed] == [r["id"] for r in expected] and len(resumed) == 32
    assert resumed == expected
    assert not parts.exists()


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_model", "does not exist"),
        ("adapter_without_base", "names no base model"),
        ("undecodable_image", "is not a readable image"),
        ("truncated_image", "does not decode"),
        ("empty_jsonl", "holds no examples"),
        ("existing_output", "already exists"),
    ],
)
def test_bad_inputs_are_one_line_errors(tiny_checkpoint, images, tmp_path, capsys, case, message):
    argv = ["--model", str(tiny_checkpoint), "--image", str(images[0]), "--prompt", PROMPT, "--max_new_tokens", "2"]
    if case == "missing_model":
        argv[1] = str(tmp_path / "no-such-run")
    elif case == "adapter_without_base":
        adapter = tmp_path / "adapter"
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
        argv[1] = str(adapter)
    elif case in ("undecodable_image", "truncated_image"):
        broken = tmp_path / "broken.png"
        data = images[0].read_bytes()
        broken.write_bytes(b"not an image at all" if case == "undecodable_image" else data[: len(data) // 2])
        argv[3] = str(broken)
    elif case == "empty_jsonl":
        (tmp_path / "empty.jsonl").write_text("\n")
        argv = argv[:2] + ["--jsonl", str(tmp_path / "empty.jsonl"), "--output", str(tmp_path / "p.jsonl")]
    elif case == "existing_output":
        (tmp_path / "p.jsonl").write_text("{}\n")
        argv = argv[:2] + ["--image_dir", str(images[0].parent), "--prompt", PROMPT, "--output", str(tmp_path / "p.jsonl")]
    with pytest.raises(SystemExit) as stopped:
        predict.main(argv)
    assert stopped.value.code == 1
    stderr = capsys.readouterr().err
    error = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(error) == 1 and error[0].startswith("error: ") and message in error[0], stderr
    assert "Traceback" not in stderr and "Loading weights" not in stderr, "bad input must stop before the model loads"
