"""Curves of a run from its metrics.jsonl, as a PNG a person would rather look at than read.

    python tools/plot.py outputs/metrics.jsonl                 # -> outputs/metrics.png
    python tools/plot.py outputs/rl/metrics.jsonl --out rl.png

SFT runs (train.py): training and validation loss, the learning rate on a second axis. RL runs (rl.py): reward and
its parts, held-out accuracy, completion length, the fractions of zero-std groups and of truncated samples, the
per-step values with their 10-step trailing mean. Needs matplotlib.
"""
import argparse
import json
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"{path}: not a metrics.jsonl ({e})")


def series(rows: list[dict], key: str) -> tuple[list, list]:
    """(steps, values) of the rows that have `key`."""
    points = [(r["step"], r[key]) for r in rows if key in r]
    return [s for s, _ in points], [v for _, v in points]


def trailing_mean(values: list, window: int) -> list:
    """Each value's mean with the window - 1 before it (fewer at the start): a step's few samples are noisy."""
    return [sum(values[max(0, i + 1 - window):i + 1]) / min(i + 1, window) for i in range(len(values))]


def smoothed(ax, rows, key, label, window=10, **style):
    """The per-step values faint, their trailing mean over `window` steps drawn over them."""
    steps, values = series(rows, key)
    line, = ax.plot(steps, values, alpha=0.25, **style)
    ax.plot(steps, trailing_mean(values, window), color=line.get_color(), label=f"{label} ({window}-step mean)")


def plot_sft(ax, rows):
    ax.plot(*series(rows, "loss"), label="training loss", color="tab:blue")
    ax.plot(*series(rows, "val_loss"), "o-", label="validation loss", color="tab:orange")
    ax.set_ylabel("loss")
    lr = ax.twinx()
    lr.plot(*series(rows, "lr"), color="tab:gray", alpha=0.5, label="learning rate")
    lr.set_ylabel("learning rate")
    ax.legend(loc="upper right")


def plot_rl(axes, rows):
    reward, acc, length, zero = axes
    for key in ("reward", "correct", "format", "reasoning"):
        smoothed(reward, rows, key, key)
    reward.set_ylabel("reward (training samples)")
    reward.legend(fontsize="small")
    acc.plot(*series(rows, "accuracy"), "o-", color="tab:green", label="accuracy")  # step 0: the start
    acc.plot(*series(rows, "eval_format"), "s--", color="tab:olive", label="strict format")
    acc.set_ylabel("held-out, greedy")
    acc.legend(fontsize="small")
    smoothed(length, rows, "len_mean", "mean")
    length.plot(*series(rows, "len_max"), label="max", alpha=0.4)
    length.set_ylabel("completion tokens")
    length.legend(fontsize="small")
    smoothed(zero, rows, "frac_zero_std", "zero-std groups", color="tab:red")
    smoothed(zero, rows, "truncated", "truncated", color="tab:purple")
    zero.set_ylabel("fraction of the samples")
    zero.legend(fontsize="small")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metrics", type=Path, help="a run's metrics.jsonl")
    p.add_argument("--out", type=Path, help="PNG file (default: beside the metrics file)")
    p.add_argument("--title", help="the figure's title (default: the run's folder name)")
    args = p.parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plot.py needs matplotlib: pip install matplotlib")
    rows = read_metrics(args.metrics)
    if not rows:
        raise SystemExit(f"{args.metrics}: no metrics yet")
    rl = any("reward" in r for r in rows)
    fig, axes = plt.subplots(4 if rl else 1, 1, figsize=(8, 10 if rl else 4), sharex=True, squeeze=False)
    plot_rl(axes[:, 0], rows) if rl else plot_sft(axes[0, 0], rows)
    axes[-1, 0].set_xlabel("step")
    run = args.metrics.parent.name or args.metrics.parent.resolve().name
    fig.suptitle(args.title or f"{run}: {'RL' if rl else 'SFT'}")
    fig.tight_layout()
    out = args.out or args.metrics.with_suffix(".png")
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
