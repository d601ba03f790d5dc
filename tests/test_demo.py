"""demo.sh end to end: tiny checkpoint, synthetic videos, conversion, 2-process fine-tuning that really learns.

The demo runs as a user runs it (`bash demo.sh`), only with DEMO_DIR pointing into tmp_path so that the
checkout's ./demo_run is left alone and concurrent runs cannot collide.
"""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO = REPO_ROOT / "demo.sh"
# ~2 minutes on 2 idle cores, ~3 on a loaded machine.
TIME_LIMIT_S = 360
SUMMARY = re.compile(
    r"^accuracy before -> after: (?P<before>[0-9.]+) -> (?P<after>[0-9.]+) "
    r"\(chance (?P<chance>[0-9.]+): (?P<classes>\d+) classes, (?P<videos>\d+) validation videos\)$",
    re.MULTILINE,
)


def demo_env(tmp_path: Path, demo_dir: Path) -> dict:
    # A torchrun parent's rendezvous variables would make the demo's own torchrun join the wrong group.
    env = {key: value for key, value in os.environ.items() if not key.startswith(("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_"))}
    env.update(DEMO_DIR=str(demo_dir), HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    env.pop("DEMO_SEED", None)
    return env


def run_demo(tmp_path: Path, demo_dir: Path, timeout: int = TIME_LIMIT_S) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(DEMO)], cwd=tmp_path, env=demo_env(tmp_path, demo_dir), capture_output=True, text=True, timeout=timeout
    )


def summary_path(stdout: str, label: str) -> str:
    match = re.search(rf"^{re.escape(label)}:\s+(.+)$", stdout, re.MULTILINE)
    assert match, f"no '{label}:' line in the summary:\n{stdout[-3000:]}"
    return match.group(1).strip()


@pytest.mark.slow
def test_demo_learns_and_prints_its_summary(tmp_path):
    demo_dir = (tmp_path / "demo_run").resolve()
    result = run_demo(tmp_path, demo_dir)
    assert result.returncode == 0, (
        f"exit {result.returncode}\n--- stdout ---\n{result.stdout[-5000:]}\n--- stderr ---\n{result.stderr[-5000:]}"
    )
    out = result.stdout
    assert "demo summary" in out

    match = SUMMARY.search(out)
    assert match, f"no accuracy line in the summary:\n{out[-3000:]}"
    before, after, chance = float(match["before"]), float(match["after"]), float(match["chance"])
    classes, videos = int(match["classes"]), int(match["videos"])
    assert classes >= 3 and chance == pytest.approx(1 / classes, abs=1e-3)
    assert after > before
    assert after > chance
    assert after >= 2 * chance, f"accuracy after training {after} is not clearly above chance {chance}"

    model = Path(summary_path(out, "model"))
    assert model == demo_dir / "model"
    assert (model / "model.safetensors").is_file() and (model / "config.json").is_file()
    assert (model / "preprocessor_config.json").is_file() and (model / "tokenizer.json").is_file()

    evaluations = [Path(path) for path in summary_path(out, "evaluations").split(", ")]
    assert evaluations == [model / "eval_before.json", model / "eval_after.json"]
    scores = [json.loads(path.read_text()) for path in evaluations]
    # The printed numbers are the files' numbers, over the same validation videos.
    assert [round(s["score"], 3) for s in scores] == [before, after]
    assert scores[0]["num_examples"] == scores[1]["num_examples"] == videos == len(scores[1]["examples"])
    assert len({reference for example in scores[1]["examples"] for reference in example["references"]}) == classes

    curves = Path(summary_path(out, "training curves"))
    assert curves == model / "training_curves.png"
    assert curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and curves.stat().st_size > 10_000
    assert Path(summary_path(out, "logs")) == demo_dir / "logs"
    assert (demo_dir / "logs" / "train.log").is_file()

    state = json.loads((model / "trainer_state.json").read_text())
    assert state["global_step"] > 0 and any("loss" in entry for entry in state["log_history"])
    # Two processes trained as one: the Trainer's global batch is per-device batch x accumulation x 2.
    train_log = (demo_dir / "logs" / "train.log").read_text()
    numbers = {
        name: int(re.search(rf"{re.escape(text)} = (\d+)", train_log)[1])
        for name, text in (
            ("total", "Total train batch size (w. parallel, distributed & accumulation)"),
            ("per_device", "Instantaneous batch size per device"),
            ("accumulation", "Gradient Accumulation steps"),
        )
    }
    assert numbers["total"] == numbers["per_device"] * numbers["accumulation"] * 2, numbers


def test_demo_refuses_to_delete_a_folder_it_did_not_make(tmp_path):
    foreign = tmp_path / "precious"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not the demo's\n")
    result = run_demo(tmp_path, foreign, timeout=120)
    assert result.returncode != 0
    assert "refusing to delete" in result.stderr
    assert (foreign / "keep.txt").read_text() == "not the demo's\n"


def test_demo_is_executable_as_the_readme_runs_it():
    assert os.access(DEMO, os.X_OK), "the README runs ./demo.sh: keep its executable bit (git update-index --chmod=+x demo.sh)"
