"""Training-loss curves and k-NN top-1 over training of several runs, in one PNG.

Each run folder is what a training script writes to --output_dir (log.jsonl and the
checkpoints), plus the JSON files eval_knn.py writes next to each checkpoint it evaluates
(`<checkpoint>_knn.json`). The k-NN point of a checkpoint sits at the iteration that the
checkpoint records, which the JSON file repeats: log.jsonl and the JSON files are enough, the
checkpoints can be gone. A `--compare_init` entry in any of them gives the run's floor (the same
network at initialisation), drawn dashed. Checkpoints also evaluated with --avgpool_patchtokens
(`<checkpoint>_knn_avgpool.json`) get a second, dotted curve ([CLS, mean patch token]), and
--raw_pixels draws the model-free floor that `eval_knn.py --raw_pixels` wrote, dash-dotted.

    python plot_runs.py out/cifar10/simdino out/cifar10/simdinov2 out/cifar10/dino out/cifar10/dinov2 \\
        --output docs/cifar10_curves.png
    python plot_runs.py out/holdout/p8_long --raw_pixels out/holdout/raw_pixels_knn.json --output long.png

matplotlib is needed for this script only (pip install matplotlib); the method files do not use it.
"""
import argparse
import glob
import json
import os
import sys

import torch


def get_args(argv=None):
    p = argparse.ArgumentParser("plot_runs", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="Run folders (each a training script's --output_dir).")
    p.add_argument("--output", default="curves.png", help="PNG to write.")
    p.add_argument("--k", default="20", help="Which k of the k-NN results to plot (DINO quotes 20).")
    p.add_argument("--raw_pixels", nargs="+", default=[], metavar="JSON",
                   help="JSON file(s) of `eval_knn.py --raw_pixels`: the k-NN of the pixels themselves, the floor "
                        "a learned feature has to beat, drawn as a horizontal line (one per file: the data it names).")
    p.add_argument("--smooth", default=20, type=int, help="Moving-average window of the loss curves, in log records.")
    return p.parse_args(argv)


def read_log(run):
    """[(iteration, images seen, loss)] of a run's log.jsonl (the last record of each iteration wins)."""
    records = {}
    with open(os.path.join(run, "log.jsonl")) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                records[r["iteration"]] = r
    return [records[i] for i in sorted(records)]


def read_knn(run, k, suffix="_knn.json"):
    """([(iteration, top-1)] of the run's evaluated checkpoints, top-1 at init or None).

    suffix "_knn_avgpool.json": the results of --avgpool_patchtokens instead of the CLS feature's."""
    points, init = [], None
    for path in sorted(glob.glob(os.path.join(run, "*" + suffix))):
        with open(path) as f:
            result = json.load(f)
        if "knn" not in result:
            continue
        it = result.get("iteration")                # eval_knn.py writes it; older JSON files only name the file
        if it is None:
            ckpt = result.get("checkpoint")
            if not ckpt or not os.path.exists(ckpt):
                continue
            it = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["iteration"]
        points.append((int(it), result["knn"][k]["top1"]))
        if "init" in result:
            init = result["init"]["knn"][k]["top1"]
    return sorted(points), init


def read_raw_pixels(path, k):
    """(data, top-1) of an `eval_knn.py --raw_pixels` JSON file."""
    with open(path) as f:
        result = json.load(f)
    if result.get("features") != "raw_pixels":
        sys.exit(f"error: '{path}' is not a --raw_pixels result of eval_knn.py "
                 f"(its features: {result.get('features')})")
    return result["data"], result["knn"][k]["top1"]


def moving_average(values, window):
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def main(args):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("error: plot_runs.py needs matplotlib: pip install matplotlib")
    n = len(args.runs)
    # one loss panel per run (each method's objective has its own scale), the k-NN curves together below
    fig, axes = plt.subplot_mosaic([[f"loss{i}" for i in range(n)], ["knn"] * n], figsize=(3.2 * max(n, 2), 7.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ax_knn = axes["knn"]
    for i, run in enumerate(args.runs):
        if not os.path.exists(os.path.join(run, "log.jsonl")):
            sys.exit(f"error: '{run}' has no log.jsonl: pass the --output_dir of a training run")
        name, color, ax = os.path.basename(os.path.normpath(run)), colors[i % len(colors)], axes[f"loss{i}"]
        log = read_log(run)
        ax.plot([r["iteration"] for r in log], moving_average([r["loss"] for r in log], args.smooth), color=color)
        ax.set(title=f"{name}: training loss", xlabel="iteration")
        ax.grid(alpha=0.3)
        points, init = read_knn(run, args.k)
        if points:
            ax_knn.plot(*zip(*points), "o-", color=color, label=name)
        pooled, _ = read_knn(run, args.k, "_knn_avgpool.json")
        if pooled:
            ax_knn.plot(*zip(*pooled), "s:", color=color, label=f"{name}, [CLS, mean patch]")
        if init is not None:
            ax_knn.axhline(init, color=color, linestyle="--", linewidth=1, label=f"{name} at init")
    for path in args.raw_pixels:
        data, top1 = read_raw_pixels(path, args.k)
        ax_knn.axhline(top1, color="black", linestyle="-.", linewidth=1, label=f"raw pixels ({data})")
    ax_knn.set(xlabel="iteration", ylabel=f"k-NN top-1 (%), k = {args.k}", title="k-NN top-1 of the teacher")
    ax_knn.grid(alpha=0.3)
    ax_knn.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    fig.savefig(args.output, dpi=120)
    print(f"written to {args.output}")


if __name__ == "__main__":
    main(get_args())
