"""Per-step metrics: a JSONL file a person or a script can read, a reward-curve picture, and the picture of the
evaluations made while training."""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

from safediff.common.errors import UserInputError


class PhaseTimer:
    """Wall seconds per named phase of a step: `with timer("train"): ...`, then `timer.seconds["train"]`. `sync`
    (e.g. torch.cuda.synchronize) runs at each phase's end, so work a device queued is charged to the phase that
    queued it, not to the next one that waits for it."""

    def __init__(self, sync: Callable[[], None] | None = None):
        self.seconds: dict[str, float] = defaultdict(float)
        self.sync = sync

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
            if self.sync is not None:
                self.sync()
        finally:
            self.seconds[phase] += time.perf_counter() - start


class MetricsLog:
    """Appends one JSON object per line and flushes it, so a killed run keeps every finished step."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")


    def truncate(self, before_step: int) -> None:
        """Keep only the records of steps < before_step (a resumed run recomputes the rest)."""
        kept = [r for r in read_metrics(self.path) if r["step"] < before_step] if self.path.is_file() else []
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")


def numeric_fields(record: dict) -> dict[str, float]:
    """The fields of a step record that are finite numbers (booleans, None, strings, NaN and inf left out): what the
    dashboard gauges and the experiment trackers plot."""
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def read_metrics(path: str | Path) -> list[dict]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def plot_reward_curve(records: list[dict], out_png: str | Path, title: str = "reward") -> Path:
    """reward_mean (+- reward_std) against step, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = [r for r in records if r.get("reward_mean") is not None]
    steps = [r["step"] for r in rows]
    mean = [r["reward_mean"] for r in rows]
    std = [r.get("reward_std") or 0.0 for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, mean, marker="o", ms=3, label="reward mean")
    ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                    alpha=0.2, label="+- std")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return Path(out_png)


def plot_evaluations(rows: list[dict], out_png: str | Path, metric: str, guard: str | None, best_step: int | None,
                     title: str = "evaluation while training") -> Path:
    """The evaluations made while training against step: `metric` and its parts (fields named <metric>_<part>, e.g.
    unsafe_rate_glyph), `guard`, each with +- its standard error when the row has <field>_se; the selected step
    marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fields = [metric] + sorted(k for k in rows[0] if k.startswith(metric + "_") and not k.endswith("_se"))
    fields += [guard] if guard else []
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for field in fields:
        values = [r[field] for r in rows]
        style = {"lw": 2.0} if field in (metric, guard) else {"lw": 1.0, "ls": "--"}
        ax.plot(steps, values, marker="o", ms=3, label=field, **style)
        if field + "_se" in rows[0]:
            se = [r[field + "_se"] for r in rows]
            ax.fill_between(steps, [v - e for v, e in zip(values, se)], [v + e for v, e in zip(values, se)], alpha=0.15)
    if best_step is not None:
        ax.axvline(best_step, color="grey", ls=":", label=f"selected: step {best_step}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return Path(out_png)


# What `safediff compare` draws when no metric is named: the reward, the update's size, the hacking signals and the
# live evaluation, each only where a run logged it.
COMPARED = ("reward_mean", "reward_std", "approx_kl", "clipfrac", "cos_prompt_mean", "diversity_mean",
            "eval_unsafe_rate", "eval_benign_accuracy")


def compare_runs(run_dirs: list[Path], out: Path, metrics: tuple[str, ...] = ()) -> str:
    """The metrics of training runs (their metrics.jsonl) drawn together, a panel per metric (<out>/compare.png), and
    a markdown table (<out>/compare.md, also returned): per run and metric, its first and last logged value and the
    mean over the last quarter of the steps that logged it (a less noisy end point than the last step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {}
    for run_dir in run_dirs:
        path = Path(run_dir) / "metrics.jsonl"
        if not path.is_file():
            raise UserInputError(f"{run_dir}: no metrics.jsonl (is it a training run's directory?)")
        runs[Path(run_dir).name if Path(run_dir).name not in runs else str(run_dir)] = read_metrics(path)
    logged = {k for records in runs.values() for r in records for k, v in r.items() if isinstance(v, (int, float))}
    fields = list(metrics) or [m for m in COMPARED if m in logged]
    missing = [m for m in fields if m not in logged]
    if missing:
        raise UserInputError(f"--metrics: no run logged {', '.join(missing)} (they log: {', '.join(sorted(logged))})")
    out.mkdir(parents=True, exist_ok=True)
    cols = min(len(fields), 3)
    rows_n = -(-len(fields) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3 * rows_n), dpi=100, squeeze=False)
    lines = ["| run | metric | steps | first | last | mean of the last quarter |", "|---|---|---:|---:|---:|---:|"]
    for ax, field in zip(axes.flat, fields):
        for colour, (name, records) in enumerate(runs.items()):  # a run keeps its colour in every panel
            points = [(r["step"], r[field]) for r in records if isinstance(r.get(field), (int, float))]
            if not points:
                continue
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o", ms=2, label=name, color=f"C{colour}")
            tail = values[len(values) - max(1, len(values) // 4):]
            lines.append(f"| {name} | {field} | {len(values)} | {values[0]:.4g} | {values[-1]:.4g} | "
                         f"{sum(tail) / len(tail):.4g} |")
        ax.set_title(field, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(fields):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "compare.png")
    plt.close(fig)
    table = "\n".join(lines) + "\n"
    (out / "compare.md").write_text(f"# {' vs '.join(runs)}\n\n![metrics](compare.png)\n\n{table}")
    return table
