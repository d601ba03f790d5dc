"""Training-curve figures from an HF Trainer ``state.log_history``.

Usage as a script::

    python -m common.evaluation.plotting output_dir/trainer_state.json curves.png

The figure has one panel per kind of series that was logged: training loss (with ``eval_loss``
overlaid, as both are on the same scale), learning rate, and the other ``eval_*`` metrics.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

# Building the Figure directly on the Agg canvas avoids pyplot, so no display is needed and the
# process-wide backend (which a caller may have chosen) is left alone.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["plot_training_curves", "plot_from_trainer_state", "main"]

logger = logging.getLogger(__name__)

# Bookkeeping that the Trainer logs with every evaluation; none of it is a quality metric.
_EVAL_BOOKKEEPING_SUFFIXES = (
    "runtime",
    "samples_per_second",
    "steps_per_second",
    "epoch",
    "model_preparation_time",
)


def _as_number(value) -> float | None:
    # bool is an int subclass but a flag, never a curve value; NaN/inf would break the axes.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _is_eval_metric(key: str) -> bool:
    return (
        key.startswith("eval_")
        and key != "eval_loss"
        and not key.endswith(_EVAL_BOOKKEEPING_SUFFIXES)
    )


def _collect_series(entries: Iterable[Mapping]) -> dict[str, list[tuple[float, float]]]:
    series: dict[str, list[tuple[float, float]]] = {}
    for entry in entries:
        if not isinstance(entry, Mapping):
            continue
        step = _as_number(entry.get("step"))
        if step is None:
            continue
        for key, raw in entry.items():
            # The end-of-training summary logs "train_loss" (a run average), not "loss", so it
            # does not add a spurious point to the loss curve.
            if key not in ("loss", "learning_rate", "eval_loss") and not _is_eval_metric(key):
                continue
            value = _as_number(raw)
            if value is not None:
                series.setdefault(key, []).append((step, value))
    for points in series.values():
        points.sort(key=lambda point: point[0])
    return series


def _draw(ax, points: list[tuple[float, float]], label: str, marker: str | None = None) -> None:
    steps, values = zip(*points)
    # Sparse evaluations are points, not a curve: a line between them would suggest scores never measured.
    ax.plot(steps, values, label=label, marker=marker, linestyle="none" if marker else "-")


def _build_figure(series: dict[str, list[tuple[float, float]]]) -> Figure:
    panels = []
    if "loss" in series or "eval_loss" in series:
        panels.append("loss")
    if "learning_rate" in series:
        panels.append("lr")
    eval_keys = sorted(key for key in series if _is_eval_metric(key))
    if eval_keys:
        panels.append("eval")

    if not panels:
        fig = Figure(figsize=(6, 4))
        FigureCanvasAgg(fig)
        fig.text(0.5, 0.5, "no logged steps", ha="center", va="center", fontsize=16)
        return fig

    fig = Figure(figsize=(5.5 * len(panels), 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels):
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if panel == "loss":
            ax.set_title("Loss")
            ax.set_ylabel("loss")
            if "loss" in series:
                _draw(ax, series["loss"], "train")
            if "eval_loss" in series:
                # Evaluations are sparse; markers keep single points visible.
                _draw(ax, series["eval_loss"], "eval", marker="o")
            ax.legend()
        elif panel == "lr":
            ax.set_title("Learning rate")
            ax.set_ylabel("learning rate")
            _draw(ax, series["learning_rate"], "learning rate")
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        else:
            ax.set_title("Evaluation")
            ax.set_ylabel("metric")
            for key in eval_keys:
                _draw(ax, series[key], key.removeprefix("eval_"), marker="o")
            ax.legend()
    return fig


def plot_training_curves(
    log_history: list[dict],
    out_path: str | Path,
    extra_points: list[dict] | None = None,
) -> Path | None:
    """Save a PNG of the curves in ``log_history`` (plus ``extra_points``) to ``out_path``.

    ``extra_points`` are entries shaped like log-history ones, e.g. ``{"step": 120,
    "eval_anls": 0.81}`` from an evaluation run outside the Trainer. An empty history still
    gives a figure saying "no logged steps".

    Returns the written path, or None when the figure could not be written: this runs at the
    end of training, after the checkpoint is saved, and a plotting problem must not turn a
    finished run into a failed one. A file system problem is logged as a warning; anything
    else is a bug here, logged as an error with its type and traceback.
    """
    out_path = Path(out_path)
    try:
        series = _collect_series([*(log_history or []), *(extra_points or [])])
        fig = _build_figure(series)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_path, format="png", dpi=100)
    except OSError as error:
        logger.warning("could not write training curves to %s: %s", out_path, error)
        return None
    except Exception as error:
        logger.error("drawing the training curves failed (%s: %s); the run's results are saved, %s is not",
                     type(error).__name__, error, out_path, exc_info=True)
        return None
    return out_path


def plot_from_trainer_state(trainer_state_path: str | Path, out_path: str | Path) -> Path | None:
    """Plot the ``log_history`` of a saved ``trainer_state.json``."""
    with open(trainer_state_path, encoding="utf-8") as f:
        state = json.load(f)
    return plot_training_curves(state.get("log_history", []), out_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m common.evaluation.plotting",
        description="Plot loss, learning rate and eval metrics from an HF trainer_state.json.",
    )
    parser.add_argument("trainer_state", type=Path, help="path to trainer_state.json")
    parser.add_argument("out_png", type=Path, help="where to write the PNG")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    written = plot_from_trainer_state(args.trainer_state, args.out_png)
    if written is None:
        return 1
    print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
