"""Evaluation report: the numbers as `eval_report.json`, and PNG plots a person would rather look at than read.

The report holds the generated-label accuracy, macro-F1 and per-class precision/recall/F1 with the confusion
matrix, perplexity, and, for comparison with the PEFT IA3 guide, its teacher-forced argmax accuracy. Plots (these,
and a sweep's objective) need matplotlib (`pip install "ia3-trainer[plots]"`); without it only the JSON is written.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np

from ia3_trainer.evaluation.metrics import (
    confusion_matrix,
    decode,
    decode_texts,
    label_accuracy,
    macro_f1,
    per_class_scores,
    perplexity,
)
from ia3_trainer.jsonfiles import finite, read_json, write_bytes, write_json
from ia3_trainer.layout import CONFUSION_PNG, CURVES_PNG, REPORT_FILE, checkpoint_folders


logger = logging.getLogger(__name__)

# The plot shows the most frequent reference classes; the others are summed into one row and one column (a plot of
# every class grew quadratically: 150 labels took 2 minutes and 5 GB to draw, 2000 did not finish in 15).
PLOT_CLASSES = 30
OTHER_CLASSES = "(other classes)"
# Up to this many classes the JSON holds the whole matrix ("counts"); above it only its non-zero cells ("cells":
# [reference index, prediction index, count], at most one a distinct pair of the evaluation), so the file grows with
# the examples, not with the square of the classes. Per-class scores are always there for every class.
DENSE_MATRIX_CLASSES = 200
OTHER_PREDICTIONS_SHOWN = 20  # "other_predictions": the most frequent generations that are no label, with counts
TEACHER_FORCED_NOTE = (
    "Not a label accuracy: the share of examples whose teacher-forced argmax over the label positions decodes to "
    "the label. Each position sees the gold previous token, so a model can score high by copying its decoder "
    "input (an untrained tiny T5 with tied embeddings does). It is the PEFT IA3 guide's metric (96.9 % for "
    "mt0-large), given only for comparison; label_accuracy generates the label freely."
)


def build_report(outputs, tokenizer, label_names: list[str] | None = None, **info) -> dict:
    """The report of one evaluation from its per-example [`~ia3_trainer.modeling.scoring.EvalOutputs`] (the trainer's
    `last_evaluation.outputs` or `IA3Predictor.score`); `info` (adapter, data, ...) is kept as given. Per-class
    scores and the confusion matrix need a label set (`label_names`).

    Predictions are the generated labels; when evaluation did not generate (its metrics did not ask for it) they
    are the rank-classification choices, and `predictions` says which.
    """
    references = decode(outputs.labels, tokenizer)
    names = decode_texts(label_names, tokenizer) if label_names else None  # as the references decode
    if outputs.generated is not None:
        predictions, source = decode(outputs.generated, tokenizer), "generated"
    elif outputs.rank_choice is not None and names:
        predictions, source = [names[i] for i in np.asarray(outputs.rank_choice).tolist()], "rank classification"
    else:
        predictions, source = None, None
    report = {
        **info,
        "examples": len(references),
        "predictions": source,
        "label_accuracy": label_accuracy(predictions, references) if predictions is not None else None,
        "macro_f1": None,
        "loss": outputs.loss,
        "perplexity": perplexity(outputs.loss) if outputs.nll_sum is not None else None,
        "teacher_forced_accuracy": label_accuracy(decode(outputs.teacher_forced, tokenizer), references)
        if outputs.teacher_forced is not None else None,
        "teacher_forced_accuracy_note": TEACHER_FORCED_NOTE,
    }
    if names and predictions is not None:
        labels = list(names) + sorted({r.strip() for r in references} - set(names))
        matrix, columns = confusion_matrix(predictions, references, labels)
        report["per_class"] = per_class_scores(matrix, labels)
        report["macro_f1"] = macro_f1(report["per_class"])
        report["confusion_matrix"] = {"references": labels, "predictions": columns}
        known = {label.strip() for label in labels}
        others = Counter(text.strip() for text in predictions if text.strip() not in known)
        report["other_predictions"] = dict(others.most_common(OTHER_PREDICTIONS_SHOWN))  # what "(other)" counts
        if len(labels) <= DENSE_MATRIX_CLASSES:
            report["confusion_matrix"]["counts"] = matrix.tolist()
        else:
            report["confusion_matrix"]["cells"] = [[int(i), int(j), int(matrix[i, j])] for i, j in np.argwhere(matrix)]
    return report


def confusion_counts(report: dict) -> np.ndarray:
    """The report's confusion matrix as an array (rows references, columns predictions), dense or from its cells."""
    matrix = report["confusion_matrix"]
    if "counts" in matrix:
        return np.asarray(matrix["counts"], dtype=np.int64)
    counts = np.zeros((len(matrix["references"]), len(matrix["predictions"])), dtype=np.int64)
    for i, j, count in matrix["cells"]:
        counts[i, j] = count
    return counts


def most_frequent_classes(matrix: np.ndarray, rows: list[str], columns: list[str], limit: int = PLOT_CLASSES):
    """`(matrix, rows, columns)` cut to the `limit` references with the most examples (most first), every other
    reference summed into an `OTHER_CLASSES` row and every prediction outside them into an `OTHER_CLASSES` column;
    as given when there are no more than `limit` classes."""
    if len(rows) <= limit:
        return matrix, rows, columns
    keep = np.argsort(-matrix.sum(axis=1), kind="stable")[:limit]
    position = {name: j for j, name in enumerate(columns)}
    kept_columns = [position[rows[i]] for i in keep]  # a reference class is a prediction column too
    rest_rows = np.setdiff1d(np.arange(len(rows)), keep)
    rest_columns = np.setdiff1d(np.arange(len(columns)), kept_columns)
    cut = np.zeros((limit + 1, limit + 1), dtype=matrix.dtype)
    for new, part in ((slice(0, limit), matrix[keep]), (limit, matrix[rest_rows].sum(axis=0))):
        cut[new, :limit] = part[..., kept_columns]
        cut[new, limit] = part[..., rest_columns].sum(axis=-1)
    names = [rows[i] for i in keep] + [OTHER_CLASSES]
    return cut, names, names


def write_report(report: dict, output_dir: str | Path, log_history: list[dict] | None = None) -> list[Path]:
    """Write `eval_report.json` and, with matplotlib, `confusion_matrix.png` and `training_curves.png` (from the
    Trainer's `log_history`) to `output_dir`. Returns the paths written."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        logger.warning('matplotlib is not installed, so no PNG plots were written; pip install "ia3-trainer[plots]"')
    else:
        if "confusion_matrix" in report:
            written.append(plot_confusion_matrix(report, output_dir / CONFUSION_PNG))
        if log_history and any("loss" in entry or "eval_loss" in entry for entry in log_history):
            written.append(plot_training_curves(log_history, output_dir / CURVES_PNG))
    report = {**report, "plots": [path.name for path in written]}
    path = write_json(output_dir / REPORT_FILE, finite(report))
    return [path, *written]


def read_log_history(folder: str | Path) -> list[dict]:
    """The Trainer's `log_history` from `trainer_state.json` in `folder`, else from its latest `checkpoint-*`."""
    folder = Path(folder)
    candidates = [folder / "trainer_state.json"] + [c / "trainer_state.json" for c in checkpoint_folders(folder)]
    for path in candidates:
        if path.is_file():
            try:
                state = read_json(path, allow_nan=True)  # a non-finite loss is logged as NaN
            except (OSError, ValueError) as error:
                logger.warning("Cannot read %s (%s); no training curves", path, error)
                return []
            history = state.get("log_history") if isinstance(state, dict) else None
            if not isinstance(history, list):
                logger.warning("%s has no log_history list; no training curves", path)
                return []
            return [entry for entry in history if isinstance(entry, dict)]
    return []


def _save_figure(figure, path: Path) -> None:
    """The PNG whole or not at all (a crash never leaves a truncated picture beside the report)."""
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    write_bytes(path, buffer.getvalue())


def plot_confusion_matrix(report: dict, path: Path) -> Path:
    """Confusion matrix with counts in each cell, coloured by the share of each reference row. With more than
    `PLOT_CLASSES` classes, the most frequent references are shown and the rest summed (`most_frequent_classes`)."""
    references = report["confusion_matrix"]["references"]
    matrix, rows, columns = most_frequent_classes(confusion_counts(report), references,
                                                  report["confusion_matrix"]["predictions"])
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    figure = _agg_figure(figsize=(1.6 + 0.9 * len(columns), 1.4 + 0.7 * len(rows)), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(matrix):
        axes.text(j, i, str(count), ha="center", va="center", color="white" if shares[i, j] > 0.5 else "black")
    axes.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    axes.set_yticks(range(len(rows)), rows)
    axes.set_xlabel("generated")
    axes.set_ylabel("reference")
    macro = report.get("macro_f1")
    title = f"accuracy {report['label_accuracy']:.1%}" + (f", macro-F1 {macro:.3f}" if macro is not None else "")
    cut = len(references) > PLOT_CLASSES
    shown = f"; the {PLOT_CLASSES} most frequent of {len(references)} classes" if cut else ""
    axes.set_title(f"{title}\n{report['examples']} examples{shown}", fontsize=10)
    figure.colorbar(image, ax=axes, label="share of row", shrink=0.8)
    _save_figure(figure, path)
    return path


def plot_training_curves(log_history: list[dict], path: Path) -> Path:
    """Training and eval loss by step, and eval label accuracy by step when evaluation ran during training."""
    def series(key):
        points = [(entry["step"], entry[key]) for entry in log_history if key in entry and "step" in entry]
        return [p[0] for p in points], [p[1] for p in points]

    accuracy_keys = [key for key in ("eval_label_accuracy", "eval_rank_accuracy") if series(key)[0]]
    figure = _agg_figure(figsize=(8 if accuracy_keys else 4.5, 3.2), dpi=100, layout="constrained")
    loss_axes = figure.add_subplot(1, 2 if accuracy_keys else 1, 1)
    for key, label, style in (("loss", "train", "-"), ("eval_loss", "eval", "o-")):
        steps, values = series(key)
        if steps:
            loss_axes.plot(steps, values, style, label=label, markersize=4)
    loss_axes.set(xlabel="step", ylabel="loss (mean token NLL)", title="Loss")
    loss_axes.legend()
    loss_axes.grid(alpha=0.3)
    if accuracy_keys:
        accuracy_axes = figure.add_subplot(1, 2, 2, sharex=loss_axes)
        for key in accuracy_keys:
            steps, values = series(key)
            accuracy_axes.plot(steps, values, "o-", label=key.removeprefix("eval_"), markersize=4)
        accuracy_axes.set(xlabel="step", ylabel="eval accuracy", title="Accuracy", ylim=(-0.02, 1.02))
        accuracy_axes.legend()
        accuracy_axes.grid(alpha=0.3)
    _save_figure(figure, path)
    return path


def plot_objective(rows: list[dict], params: list, objective: str, path: Path) -> Path | None:
    """A search's objective against each searched key (`params`: its `ia3_trainer.training.sweep.SearchParam`s),
    pruned trials hollow, at their last reported value. None without matplotlib, as the report's plots."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    figure = _agg_figure(figsize=(4 * len(params), 3.2), dpi=100, layout="constrained")
    for index, param in enumerate(params):
        axes = figure.add_subplot(1, len(params), index + 1)
        for state, fill in (("COMPLETE", "C0"), ("PRUNED", "none")):
            shown = [row for row in rows if row["state"] == state and isinstance(row.get("objective"), (int, float))
                     and row.get(param.key) is not None]
            x = [row[param.key] if param.kind != "choice" else json.dumps(row[param.key]) for row in shown]
            axes.scatter(x, [row["objective"] for row in shown], facecolors=fill, edgecolors="C0",
                         label=state.lower())
        if param.kind == "log":
            axes.set_xscale("log")
        axes.set_xlabel(param.key.rsplit(".", 1)[-1])
        axes.set_ylabel(objective)
        axes.legend(fontsize="small")
    _save_figure(figure, path)
    return path


def summary_text(report: dict, paths) -> str:
    """What `ia3-trainer train` and `evaluate` print about a report: its main numbers and the files written."""
    shown = "  ".join(f"{key}={report[key]:.4f}" for key in ("label_accuracy", "macro_f1", "perplexity")
                      if report.get(key) is not None)
    teacher = report.get("teacher_forced_accuracy")
    if teacher is not None:
        shown += f"  teacher_forced_accuracy={teacher:.4f} (argmax given the true prefix; not a label accuracy)"
    return f"{shown}\nreport: {', '.join(str(path) for path in paths)}"


def _agg_figure(**kwargs):
    """A figure drawn by the Agg canvas: files only, no window, no display needed, and pyplot's global backend
    (a notebook's, say) is left alone."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(**kwargs)
    FigureCanvasAgg(figure)
    return figure

