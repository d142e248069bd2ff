"""One picture of a run (plots.png): held-out reward over iterations, the meta-learner's weight
curve h_phi(score) after each iteration, and the training losses and meta weights per step."""
from __future__ import annotations

from pathlib import Path


def plot_run(rows: list[dict], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [r for r in rows if r["event"] == "eval"]
    iters = [r for r in rows if r["event"] == "iteration"]
    steps = [r for r in rows if r["event"] == "train_step"]
    metas = [r for r in rows if r["event"] == "meta_update"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))

    ax = axes[0][0]
    ax.plot([r["iteration"] for r in evals], [r["reward"] for r in evals], "o-")
    ax.set(title="held-out reward of policy samples", xlabel="iteration (0 = start)", ylabel="mean reward")

    ax = axes[0][1]
    for r in iters:
        if r.get("meta_curve"):
            xs, ys = r["meta_curve"]
            ax.plot(xs, ys, label=f"after iteration {r['iteration']}")
    ax.set(title="meta-learner weight w = h(offline score)", xlabel="offline preference score", ylabel="w")
    if iters and iters[0].get("meta_curve"):
        ax.legend()

    ax = axes[1][0]
    if steps:
        x = [r["step"] for r in steps]
        ax.plot(x, [r["loss_offline"] for r in steps], label="offline pair loss")
        ax.plot(x, [r["loss_online"] for r in steps], label="online pair loss")
        ax.plot(x, [r["loss"] for r in steps], label="Eq. 5 loss")
        ax.legend()
    ax.set(title="policy losses", xlabel="optimiser step")

    ax = axes[1][1]
    if steps:
        ax.plot([r["step"] for r in steps], [r["meta_weight_mean"] for r in steps], label="mean meta weight (batch)")
    if metas:
        ax.plot([r["step"] for r in metas], [r["meta_loss"] for r in metas], "x-", label="meta loss (Eq. 6)")
    if steps or metas:
        ax.legend()
    ax.set(title="meta-learner", xlabel="optimiser step")

    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
