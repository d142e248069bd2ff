"""One picture of a run (plots.png), from its metrics.jsonl rows: the held-out reward per
iteration with a 95% interval over the held-out prompts; the meta-learner's weight curve
w = h(offline score) at the start and after each iteration (paper Figure 3, right); offline score
against potential online gain, sampled and unsampled prompts apart (paper Figure 2, middle); and
the policy losses and mean meta weight per optimiser step, meta-learner updates marked."""
from __future__ import annotations

import math
from pathlib import Path

SAMPLED, UNSAMPLED = "tab:blue", "tab:orange"  # the paper's Figure 2 colours


def plot_run(rows: list[dict], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_event = {}
    for r in rows:
        by_event.setdefault(r["event"], []).append(r)
    fig, axes = plt.subplots(2, 2, figsize=(14, 10))
    _reward_panel(axes[0][0], by_event.get("eval", []))
    _meta_curve_panel(axes[0][1], by_event.get("iteration", []))
    _gain_panel(axes[1][0], by_event.get("gain", []))
    _training_panel(axes[1][1], by_event.get("train_step", []), by_event.get("meta_update", []),
                    by_event.get("iteration", []))
    setup = by_event.get("setup", [{}])[0]
    fig.suptitle(f"{setup.get('algorithm', 'run')}: {setup.get('pairs', '?')} offline preference pairs, "
                 f"{setup.get('eval_prompts', '?')} held-out prompts", fontsize=13)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def mean_and_interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its normal-approximation 95% interval (1.96 standard errors)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, 1.96 * math.sqrt(var / n)


def _reward_panel(ax, evals: list[dict]) -> None:
    x = [r["iteration"] for r in evals]
    stats = [mean_and_interval(r["prompt_rewards"]) if r.get("prompt_rewards") else (r["reward"], 0.0) for r in evals]
    means, halves = [m for m, _ in stats], [h for _, h in stats]
    prompts = max((len(r.get("prompt_rewards") or []) for r in evals), default=0)
    ax.fill_between(x, [m - h for m, h in stats], [m + h for m, h in stats], color="tab:green", alpha=0.2,
                    label=f"95% interval over {prompts} held-out prompts" if prompts else "no per-prompt rewards")
    ax.errorbar(x, means, yerr=halves, fmt="o-", color="tab:green", capsize=4, label="mean reward")
    ax.set_xticks(x)
    ax.set(title="Held-out reward of policy samples per iteration",
           xlabel="iteration (0 = starting policy)", ylabel="mean reward on held-out prompts")
    start, end = (evals[0].get("prompt_rewards"), evals[-1].get("prompt_rewards")) if len(evals) > 1 else (None, None)
    wins = None
    if start and end and len(start) == len(end):
        from metaapo_nemo.algorithm.diagnostics import win_rate

        wins = (f"iteration {evals[-1]['iteration']} beats the start on {win_rate(end, start):.0%} of held-out "
                "prompts (win rate, ties half)")
    if evals:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.11), ncol=2, title=wins, fontsize=9, title_fontsize=9)


def _meta_curve_panel(ax, iters: list[dict]) -> None:
    import matplotlib.pyplot as plt
    import torch

    from metaapo_nemo.algorithm.diagnostics import untrained_meta_learner

    curves = [r for r in iters if r.get("meta_curve")]
    low = min((min(r["meta_curve"][0]) for r in curves), default=-4.0)
    high = max((max(r["meta_curve"][0]) for r in curves), default=0.0)
    xs = torch.linspace(low, high, 41)
    ax.plot(xs.tolist(), untrained_meta_learner().weights(xs).tolist(), color="gray", lw=2.5,
            label="initial (untrained)")
    colours = plt.cm.viridis([i / max(1, len(curves) - 1) * 0.85 for i in range(len(curves))])
    for r, colour in zip(curves, colours):
        xs_r, ws = r["meta_curve"]
        updates = r.get("meta_updates")
        ax.plot(xs_r, ws, color=colour, lw=1.8, ls="--",
                label=f"after iteration {r['iteration']}" + (f" ({updates} update{'s' * (updates != 1)} so far)"
                                                            if updates is not None else ""))
    ax.set_ylim(0, 1)
    ax.set(title="Meta-learner weight w = h(offline score), per iteration",
           xlabel="offline preference score of the pair (policy at the decision)",
           ylabel="meta weight w (sampled when draw u > w)")
    ax.legend(loc="best", fontsize=9)


def _gain_panel(ax, gains: list[dict]) -> None:
    points = [(x, g, s) for r in gains for x, g, s in zip(r["score_offline"], r["gain"], r["sampled"])]
    ax.set(xlabel="offline preference score of the pair (policy at the decision)",
           ylabel="potential online gain\n(online pair's score minus offline pair's)")
    if not points:
        ax.set_title("Potential online gain per offline prompt")
        ax.text(0.5, 0.5, "No potential gain was measured in this run.\n\nSet algo.probe_unsampled=N (N > 0) to measure"
                " it\nfor the sampled prompts and N unsampled ones per iteration\n(strategies that score the offline "
                "pairs only).", ha="center", va="center", transform=ax.transAxes, fontsize=11,
                bbox=dict(boxstyle="round", facecolor="whitesmoke", edgecolor="gray"))
        ax.set_xticks([])
        ax.set_yticks([])
        return
    for sampled, colour, name in ((True, SAMPLED, "sampled"), (False, UNSAMPLED, "unsampled (probed only)")):
        mine = [(x, g) for x, g, s in points if s == sampled]
        ax.scatter([x for x, _ in mine], [g for _, g in mine], s=12, alpha=0.6, color=colour,
                   label=f"{name}: {len(mine)} prompts")
    ax.axhline(0.0, color="gray", lw=1, ls=":")
    iterations = sorted({r["iteration"] for r in gains})
    which = f"iteration {iterations[0]}" if len(iterations) == 1 else f"iterations {iterations[0]}-{iterations[-1]}"
    ax.set_title(f"Potential online gain per offline prompt ({which})")
    ax.legend(loc="best", title=f"points of {which}; above 0: the\nonline pair scores higher", fontsize=9,
              title_fontsize=9)


def _training_panel(ax, steps: list[dict], metas: list[dict], iters: list[dict]) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set(title="Policy losses and mean meta weight per optimiser step", xlabel="policy optimiser step",
           ylabel="loss (batch mean)")
    if not steps:
        ax.text(0.5, 0.5, "no optimiser step was taken", ha="center", va="center", transform=ax.transAxes)
        return
    x = [r["step"] for r in steps]
    handles = [ax.plot(x, [r["loss_offline"] for r in steps], color="tab:purple", label="offline pair loss")[0],
               ax.plot(x, [r["loss_online"] for r in steps], color="tab:red", label="online pair loss")[0],
               ax.plot(x, [r["loss"] for r in steps], color="black", lw=2, label="Eq. 5 loss (weighted sum)")[0]]
    for k, r in enumerate(metas):
        line = ax.axvline(r["step"], color="tab:cyan", lw=1, alpha=0.45,
                          label="meta-learner update (Eq. 6)" if k == 0 else None)
        if k == 0:
            handles.append(line)
    for r in iters[:-1]:  # where the next slice of offline data begins
        ax.axvline(r["step"] + 0.5, color="gray", ls="--", lw=1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    right = ax.twinx()
    handles += right.plot(x, [r["meta_weight_mean"] for r in steps], color="tab:green", ls="-.",
                          label="mean meta weight w (right axis)")
    right.set_ylim(0, 1)
    right.set_ylabel("mean meta weight w of the batch")
    # Below the axes: per-step curves fill the whole panel, so any legend inside would hide some.
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.11), ncol=3, fontsize=9,
              title="dashed gray line: a new iteration begins" if len(iters) > 1 else None, title_fontsize=9)
