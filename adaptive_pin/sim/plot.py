"""Draw a SimResult over time: miss rate, throughput, migrations, with VM arrivals marked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adaptive_pin.errors import UsageError
from adaptive_pin.sim.runner import SimResult


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError(
            "--plot needs matplotlib, in the 'plot' extra: pip install 'adaptive-pin[plot]'"
        ) from None
    return plt


def check_plot_path(path: str | Path) -> None:
    """Fail early (before a run) unless matplotlib is there and ``path`` names a format it writes."""
    _pyplot()
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in formats:
        got = f"'.{suffix}'" if suffix else "no extension"
        raise UsageError(
            f"--plot {path}: expected a file name ending in a format matplotlib writes "
            f"(.png, .svg, .pdf, ...: {', '.join(sorted(formats))}), got {got}"
        )


def plot_result(result: SimResult, path: str | Path) -> None:
    """Write a PNG (or any format its extension names; matplotlib, Agg backend: no display)."""
    check_plot_path(path)
    plt = _pyplot()
    s = result.series
    if not s.time:
        raise UsageError("nothing to plot: the run kept no time series")
    fig, (ax_miss, ax_ips, ax_mig) = plt.subplots(
        3, 1, sharex=True, figsize=(10, 7.5), height_ratios=[3, 3, 2]
    )
    ax_miss.plot(s.time, [m / 1e6 for m in s.llc_misses_per_s], color="tab:red", lw=1.2, label="LLC misses/s")
    ax_miss.set_ylabel("LLC misses (M/s)")
    twin = ax_miss.twinx()
    twin.plot(
        s.time, [m if m is not None else float("nan") for m in s.mpki], color="tab:purple", lw=0.8, ls="--"
    )
    twin.set_ylabel("MPKI (dashed)", color="tab:purple")
    ax_ips.plot(s.time, [i / 1e9 for i in s.instructions_per_s], color="tab:blue", lw=1.2)
    ax_ips.set_ylabel("throughput (G instr/s)")
    twin2 = ax_ips.twinx()
    twin2.plot(s.time, s.weighted_speedup, color="tab:green", lw=0.8, ls="--")
    twin2.set_ylabel("weighted speedup (dashed)", color="tab:green")
    ax_mig.bar(s.time, s.scheduler_migrations, width=result.tick_s, color="tab:gray", label="scheduler")
    ax_mig.bar(
        s.time,
        s.controller_migrations,
        width=result.tick_s,
        bottom=s.scheduler_migrations,
        color="tab:orange",
        label="controller",
    )
    ax_mig.set_ylabel("migrations / tick")
    ax_mig.set_xlabel("simulated time (s)")
    ax_mig.legend(loc="upper right", fontsize="small")
    for ev in result.events:
        started = ev["kind"] == "started"
        if ev["time"] <= 0 and started:
            continue  # everything present at t=0 would only clutter the plot
        for ax in (ax_miss, ax_ips, ax_mig):
            ax.axvline(ev["time"], color="tab:green" if started else "tab:red", lw=0.6, ls=":", alpha=0.8)
        ax_miss.annotate(
            ("+" if started else "-") + ev["vm"],
            (ev["time"], 1.0),
            xycoords=("data", "axes fraction"),
            fontsize=6,
            rotation=90,
            va="top",
            ha="right",
        )
    for move in result.moves:
        ax_ips.axvline(move.time, color="tab:orange", lw=0.4, alpha=0.35)
    mpki = "n/a" if result.mpki is None else f"{result.mpki:.2f}"
    fig.suptitle(
        f"{result.scenario} under {result.policy}: weighted speedup {result.weighted_speedup:.2f}, "
        f"MPKI {mpki}, migrations {result.migrations['controller']} controller + "
        f"{result.migrations['scheduler']} scheduler",
        fontsize=10,
    )
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as exc:
        raise UsageError(f"{path}: cannot write the plot: {exc.strerror or exc}") from None
    except (ValueError, RuntimeError) as exc:  # a format matplotlib lists but cannot write here
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"{path}: cannot write the plot: {first}") from None
    finally:
        plt.close(fig)
