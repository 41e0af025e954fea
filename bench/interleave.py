"""Timing several implementations of one thing interleaved, for the ``interleaved_*.py`` scripts:
on this shared 2-core machine the same call moves by up to 2× between phases minutes apart, so
each round runs every implementation once, in an order that rotates from round to round, and
ratios are taken per round."""
import statistics
import time


def interleaved_times(runs, rounds, calls=1):
    """{name: [seconds of each round]} for ``runs`` {name: function of no arguments}, each run
    once first (warm-up, compilation), then once a round in a rotating order. With ``calls`` > 1
    a round runs each implementation ``calls`` + 1 times back to back and records the mean of the
    last ``calls``: its steady state, on caches it has just filled itself (a single call a round
    starts on what the other implementations left in the caches)."""
    if calls < 1:
        raise ValueError(f"calls must be at least 1, got {calls}")
    names = list(runs)
    for run in runs.values():
        run()
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if calls > 1:
                runs[name]()
            start = time.perf_counter()
            for _ in range(calls):
                runs[name]()
            times[name].append((time.perf_counter() - start) / calls)
    return times


def median_ratio(times, a, b):
    """The median over rounds of a's time over b's: how many times slower a ran than b."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))
