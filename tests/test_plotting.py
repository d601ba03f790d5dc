import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from common.evaluation.plotting import plot_from_trainer_state, plot_training_curves

REPO_ROOT = Path(__file__).resolve().parents[1]


def _synthetic_log_history():
    history = []
    for step in range(1, 11):
        history.append(
            {
                "epoch": step / 10,
                "grad_norm": 1.5,
                "learning_rate": 1e-4 * (1 - step / 10),
                "loss": 2.0 / step,
                "step": step,
            }
        )
        if step in (5, 10):
            history.append(
                {
                    "epoch": step / 10,
                    "eval_loss": 1.0 / step,
                    "eval_accuracy": step / 12,
                    "eval_runtime": 3.2,
                    "eval_samples_per_second": 10.0,
                    "eval_steps_per_second": 1.0,
                    "step": step,
                }
            )
    history.append(
        {
            "epoch": 1.0,
            "step": 10,
            "total_flos": 1.0e12,
            "train_loss": 0.6,
            "train_runtime": 42.0,
            "train_samples_per_second": 2.0,
            "train_steps_per_second": 0.25,
        }
    )
    return history


def _assert_png(path, min_width=200, min_height=150):
    assert path.is_file()
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert width >= min_width and height >= min_height
    return width, height


def test_full_history_makes_a_three_panel_png(tmp_path):
    out = plot_training_curves(
        _synthetic_log_history(),
        tmp_path / "plots" / "curves.png",
        extra_points=[{"step": 7, "eval_anls": 0.8}],
    )
    assert out == tmp_path / "plots" / "curves.png"
    width, height = _assert_png(out)
    # Loss, learning rate and eval panels side by side.
    assert width > 2 * height


def test_empty_history_still_makes_a_png(tmp_path):
    out = plot_training_curves([], tmp_path / "empty.png")
    _assert_png(out)


def test_history_without_steps_or_numbers_still_makes_a_png(tmp_path):
    history = [{"train_runtime": 1.0}, {"step": 1, "loss": float("nan")}, {"step": 2, "loss": None}]
    out = plot_training_curves(history, tmp_path / "odd.png")
    _assert_png(out)


def test_unwritable_destination_returns_none(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert plot_training_curves(_synthetic_log_history(), blocker / "curves.png") is None


def test_plot_from_trainer_state_and_cli(tmp_path):
    state = tmp_path / "trainer_state.json"
    state.write_text(json.dumps({"global_step": 10, "log_history": _synthetic_log_history()}))
    _assert_png(plot_from_trainer_state(state, tmp_path / "api.png"))

    result = subprocess.run(
        [sys.executable, "-m", "common.evaluation.plotting", str(state), str(tmp_path / "cli.png")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    _assert_png(tmp_path / "cli.png")
