"""Shared timing of the benchmarks that compare whole steps: interleaved repeats, medians, a ratio table."""

import statistics
from collections.abc import Callable


def interleaved_medians(arms: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Median seconds of each arm (a call that returns the seconds it measured); the arms alternate within every
    repeat, so drift of the machine hits all alike, and a first round warms up uncounted."""
    times: dict[str, list[float]] = {name: [] for name in arms}
    for repeat in range(repeats + 1):
        for name, run in arms.items():
            seconds = run()
            if repeat:
                times[name].append(seconds)
    return {name: statistics.median(values) for name, values in times.items()}


def ratio_table(medians: dict[str, float], baseline: str) -> str:
    """A markdown table of the medians and their ratio to the `baseline` arm."""
    lines = [f"| step | seconds | × {baseline} |", "|---|---|---|"]
    lines += [f"| {name} | {value:.3f} | {value / medians[baseline]:.2f} |" for name, value in medians.items()]
    return "\n".join(lines)
