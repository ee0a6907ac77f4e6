"""The report's pictures, drawn from report.json's data (so a picture shows the numbers the tables
do). matplotlib is optional (the `report` extra): without it the report is its tables.

Every PNG is SIZE at DPI (800 x 450 pixels), drawn with matplotlib's object API on the Agg canvas:
no pyplot state, no display needed.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

from melama_mcore.report.compare import column_label

DPI = 100
SIZE = (8.0, 4.5)  # inches
INSTALL_HINT = "pip install 'melama-mcore[report]' (or pip install matplotlib), then rerun melama report"


@dataclass
class Picture:
    name: str      # file name in the report folder
    caption: str
    png: bytes


def unavailable() -> str | None:
    """Why no pictures can be drawn here, or None."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError:
        return f"matplotlib is not installed: {INSTALL_HINT}"
    return None


def draw(data: dict) -> list[Picture]:
    pictures = []
    runs = data["runs"]
    if runs:
        pictures.append(Picture("training_loss.png", "Training loss against tokens seen, per run", _training_loss(runs)))
        if any(run["validation"] for run in runs):
            pictures.append(Picture("validation_loss.png", "Validation loss per blend source against tokens seen",
                                    _validation_loss(runs)))
        pictures.append(Picture("learning_rate.png", "Learning rate against tokens seen", _learning_rate(runs)))
        pictures.append(Picture("throughput.png", "Throughput (tokens/s, all GPUs) and MFU per logged step",
                                _throughput(runs)))
    for number, group in enumerate(data["perplexity"], 1):
        pictures.append(Picture(f"perplexity_{number}.png", f"Perplexity per domain (group {number})",
                                _perplexity_bars(group)))
    for number, item in enumerate(data["perplexity_series"], 1):
        pictures.append(Picture(f"perplexity_steps_{number}.png", f"Perplexity per domain across the checkpoints "
                                f"of {item['label']}", _perplexity_steps(item)))
    for number, group in enumerate(data["scores"], 1):
        if _score_bars_data(group)[0]:
            pictures.append(Picture(f"scores_{number}.png", f"Scores per task (group {number}, main metric of each)",
                                    _score_bars(group)))
    return pictures


# -- drawing ------------------------------------------------------------------------------------------
def _figure(columns: int = 1):
    from matplotlib.figure import Figure

    figure = Figure(figsize=SIZE, dpi=DPI, layout="constrained")
    axes = figure.subplots(1, columns, squeeze=False)[0]
    return figure, axes


def _png(figure) -> bytes:
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=DPI, metadata={"Software": None})  # no bbox_inches: fixed pixel size
    return out.getvalue()


def _nan(values: list) -> list[float]:
    return [math.nan if v is None else v for v in values]


def _tokens_axis(axis) -> None:
    from matplotlib.ticker import EngFormatter

    axis.set_xlabel("tokens seen")
    axis.xaxis.set_major_formatter(EngFormatter())
    axis.grid(alpha=0.3)


def _legend(axis) -> None:
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize="small")


def _training_loss(runs: list[dict]) -> bytes:
    figure, (axis,) = _figure()
    for run in runs:
        axis.plot(run["train"]["tokens"], _nan(run["train"]["loss"]), label=run["label"])
    axis.set_ylabel("training loss")
    _tokens_axis(axis)
    _legend(axis)
    return _png(figure)


def _validation_loss(runs: list[dict]) -> bytes:
    figure, (axis,) = _figure()
    styles = ("-", "--", ":", "-.")
    for number, run in enumerate(runs):
        for source, values in run["validation"].items():
            label = source if len(runs) == 1 else f"{run['label']}: {source}"
            axis.plot(values["tokens"], _nan(values["loss"]), styles[number % len(styles)], marker="o",
                      markersize=3, label=label)
    axis.set_ylabel("validation loss")
    _tokens_axis(axis)
    _legend(axis)
    return _png(figure)


def _learning_rate(runs: list[dict]) -> bytes:
    figure, (axis,) = _figure()
    for run in runs:
        axis.plot(run["train"]["tokens"], _nan(run["train"]["lr"]), label=run["label"])
    axis.set_ylabel("learning rate")
    axis.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    _tokens_axis(axis)
    _legend(axis)
    return _png(figure)


def _throughput(runs: list[dict]) -> bytes:
    figure, (speed, mfu) = _figure(2)
    any_mfu = False
    for run in runs:
        speed.plot(run["train"]["tokens"], _nan(run["train"]["tokens_per_s"]), label=run["label"])
        if any(v is not None for v in run["train"]["mfu"]):
            any_mfu = True
            mfu.plot(run["train"]["tokens"], [math.nan if v is None else v * 100 for v in run["train"]["mfu"]],
                     label=run["label"])
    speed.set_ylabel("tokens/s")
    mfu.set_ylabel("MFU (%)")
    _tokens_axis(speed)
    if any_mfu:
        _tokens_axis(mfu)
    else:
        mfu.set_axis_off()
        mfu.text(0.5, 0.5, "MFU not recorded\n(CPU, or a GPU of unknown peak:\nset logging.peak_tflops)",
                 ha="center", va="center", transform=mfu.transAxes)
    _legend(speed)
    return _png(figure)


def _grouped_bars(axis, categories: list[str], values: dict[str, list]) -> None:
    """One cluster per category, one bar per model (a missing value leaves a gap)."""
    width = 0.8 / max(1, len(values))
    for number, (label, row) in enumerate(values.items()):
        positions = [i + (number - (len(values) - 1) / 2) * width for i in range(len(categories))]
        bars = axis.bar(positions, _nan(row), width, label=label)
        axis.bar_label(bars, labels=["" if v is None else f"{v:.3g}" for v in row], fontsize="x-small")
    axis.set_xticks(range(len(categories)), categories)
    axis.grid(axis="y", alpha=0.3)


def _perplexity_bars(group: dict) -> bytes:
    figure, (axis,) = _figure()
    sources = list(group["sources"])
    _grouped_bars(axis, sources, {column_label(group, label): [group["sources"][s].get(label, {}).get("perplexity")
                                                               for s in sources] for label in group["models"]})
    axis.set_ylabel("perplexity")
    _legend(axis)
    return _png(figure)


def _perplexity_steps(item: dict) -> bytes:
    figure, (axis,) = _figure()
    for number, (source, values) in enumerate(item["sources"].items()):
        color = f"C{number % 10}"
        axis.plot(item["steps"], _nan(values["perplexity"]), marker="o", markersize=3, color=color, label=source)
        reference = item["baseline_perplexity"].get(source)
        if reference is not None:
            axis.axhline(reference, color=color, linestyle=":", linewidth=1, label=f"{source}: {item['baseline']}")
    from matplotlib.ticker import MaxNLocator

    axis.set_xlabel("checkpoint step")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_ylabel("perplexity")
    axis.grid(alpha=0.3)
    _legend(axis)
    return _png(figure)


def main_metric(metrics: dict) -> str | None:
    """The metric a task's bar shows: its first, the chosen extractor's, that is not a missing rate."""
    return next((m for m in metrics if "@" not in m and m != "missing_rate"), None)


def _score_bars_data(group: dict) -> tuple[list[str], dict[str, list]]:
    categories, rows = [], {label: [] for label in group["models"]}
    for task, entry in group["tasks"].items():
        metric = main_metric(entry["metrics"])
        if metric is None:
            continue
        categories.append(f"{entry['dataset'] or task}\n{metric}")
        for label in group["models"]:
            rows[label].append(entry["metrics"][metric].get(label, {}).get("value"))
    return categories, rows


def _score_bars(group: dict) -> bytes:
    figure, (axis,) = _figure()
    categories, rows = _score_bars_data(group)
    _grouped_bars(axis, categories, rows)
    values = [v for row in rows.values() for v in row if v is not None]
    if values and 0 <= min(values) and max(values) <= 1:  # fractions: the whole scale, so zeros show as zeros
        axis.set_ylim(0, 1.05)
    axis.tick_params(axis="x", labelsize="small")
    axis.set_ylabel("score")
    _legend(axis)
    return _png(figure)
