"""``ledger.png``: world size, goodput so far and cost so far over the run, preemptions marked."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the ledger draws itself through this module, never the other way round
    from raytrain_spot.cost.ledger import Ledger


def plot_ledger(ledger: Ledger, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on a head node or in CI
    import matplotlib.pyplot as plt

    origin = ledger.sessions[0][0] if ledger.sessions else 0.0
    span_s = (ledger.sessions[-1][1] - origin) if ledger.sessions else 0.0
    scale, unit = (3600.0, "h") if span_s > 3 * 3600 else (60.0, "min") if span_s > 180 else (1.0, "s")

    def x(t: float) -> float:
        return (t - origin) / scale

    figure, (sizes, goodput, cost) = plt.subplots(3, 1, sharex=True, figsize=(10, 7.5))
    if ledger.world_size_curve:
        sizes.step([x(t) for t, _ in ledger.world_size_curve], [w for _, w in ledger.world_size_curve],
                   where="post", label="training world size")
    if ledger.spot_nodes_curve:
        sizes.step([x(t) for t, _ in ledger.spot_nodes_curve], [n for _, n in ledger.spot_nodes_curve],
                   where="post", linestyle="--", label="Spot nodes alive")
    sizes.set_ylabel("workers / nodes")
    sizes.legend(loc="lower left", fontsize="small")
    curve = ledger.goodput_curve
    goodput.plot([x(t) for t, _ in curve], [g for _, g in curve], color="tab:green")
    goodput.set_ylim(0, 1.05)
    goodput.set_ylabel("goodput so far")
    cost.plot([x(t) for t, _ in ledger.cost_curve], [c for _, c in ledger.cost_curve], color="tab:red")
    notional = " (notional)" if ledger.summary["cost"]["notional"] else ""
    cost.set_ylabel(f"cost so far, ${notional}")
    cost.set_xlabel(f"time since start ({unit})")
    for axes in (sizes, goodput, cost):
        for index, t in enumerate(ledger.preemption_times):
            axes.axvline(x(t), color="black", linestyle=":", linewidth=1,
                         label="preemption" if axes is sizes and index == 0 else None)
        for (_, previous_end), (next_start, _) in zip(ledger.sessions, ledger.sessions[1:]):
            axes.axvspan(x(previous_end), x(next_start), color="grey", alpha=0.2)
    if ledger.preemption_times:
        sizes.legend(loc="lower left", fontsize="small")
    summary = ledger.summary
    figure.suptitle(f"{summary['run'] or 'run'}: goodput {summary['goodput'] or 0:.1%}, "
                    f"{summary['disruptions']['preemptions']} preemptions, "
                    f"${summary['cost']['total_usd']:.2f}{notional}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
