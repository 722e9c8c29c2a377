"""Measure what a step allocates, for checking the plan's memory model (tests, benches).

`allocation_peak(step)` runs `step()` under torch's profiler and replays its allocation events:
the peak of bytes allocated and not yet freed during the step (tensors that existed before it, such
as inputs and weights, are not counted). Deterministic, unlike RSS, and the same on any allocator.
"""

from __future__ import annotations


def allocation_peak(step) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak
