"""Summarises a bench/tracing.sh run: reads mesh-bench's round lines (the
file named as the only argument) and prints, for each tracing variant and
path, the medians over the rounds and the cost against the same path with
tracing off, taken within each round (so a slow round moves both).

Targets are named PATH-VARIANT (mesh-off, hop-100%, ...); the proxies on
each path are client-V + server-V (mesh) and hop-V (hop); `sink` is the
collector. Exits 1 if any call failed."""

import re
import statistics
import sys

ROUND = re.compile(
    r"^\s*round (\d+)/\d+ (\S+)\s+(closed|\d+/s)\s+(\d+) calls/s\s+p50\s+(\d+) µs\s+"
    r"p99\s+(\d+) µs\s+errors (\d+)\s+CPU µs/call: (.*?)(?:\s+\(load generator.*)?$"
)

runs = {}  # (target, phase) -> {round: run}
order = []
for line in open(sys.argv[1], encoding="utf-8"):
    m = ROUND.match(line)
    if not m:
        continue
    rnd, target, phase = int(m.group(1)), m.group(2), m.group(3)
    phase = "closed" if phase == "closed" else "fixed"
    cpu = {}
    for cell in m.group(8).split(", "):
        if cell.strip():
            name, value = cell.rsplit(" ", 1)
            cpu[name] = float(value)
    if target not in order:
        order.append(target)
    runs.setdefault((target, phase), {})[rnd] = {
        "target": target,
        "rate": float(m.group(4)),
        "p50": float(m.group(5)),
        "p99": float(m.group(6)),
        "errors": int(m.group(7)),
        "cpu": cpu,
    }

if not runs:
    sys.exit("no round lines in " + sys.argv[1])


def proxies(target):
    path, variant = target.split("-", 1)
    return [f"client-{variant}", f"server-{variant}"] if path == "mesh" else [f"hop-{variant}"]


def proxy_cpu(run):
    return sum(run["cpu"].get(p, 0.0) for p in proxies(run["target"]))


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def within(target, phase, f):
    """Median over rounds of f(run, the same round's run with tracing off)."""
    base = runs.get((target.split("-", 1)[0] + "-off", phase), {})
    mine = runs.get((target, phase), {})
    return med([f(run, base[r]) for r, run in mine.items() if r in base])


print()
print(
    "| variant | path | calls/s | × off | p50 µs | p99 µs | p50 µs @ rate | p99 µs @ rate "
    "| Δp50 @ rate | proxy CPU µs/call | +CPU vs off | proxy CPU µs/call @ rate "
    "| +CPU @ rate | collector CPU µs/call | failed calls |"
)
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
failed_total = 0
for path in ("mesh", "hop"):
    for target in order:
        if not target.startswith(path + "-"):
            continue
        variant = target.split("-", 1)[1]
        closed = runs.get((target, "closed"), {})
        fixed = runs.get((target, "fixed"), {})
        col = lambda rs, key: med([r[key] for r in rs.values()])  # noqa: E731
        per_proxy = " + ".join(
            f"{med([r['cpu'].get(p, 0.0) for r in closed.values()]):.1f}" for p in proxies(target)
        )
        failed = sum(r["errors"] for r in list(closed.values()) + list(fixed.values()))
        failed_total += failed
        sink = med([r["cpu"].get("sink", 0.0) for r in closed.values()])
        sink_fixed = med([r["cpu"].get("sink", 0.0) for r in fixed.values()])
        print(
            f"| {variant} | {path} | {col(closed, 'rate'):.0f} "
            f"| {within(target, 'closed', lambda a, b: a['rate'] / b['rate']):.2f} "
            f"| {col(closed, 'p50'):.0f} | {col(closed, 'p99'):.0f} "
            f"| {col(fixed, 'p50'):.0f} | {col(fixed, 'p99'):.0f} "
            f"| {within(target, 'fixed', lambda a, b: a['p50'] - b['p50']):+.0f} µs "
            f"| {med([proxy_cpu(r) for r in closed.values()]):.1f} ({per_proxy}) "
            f"| {within(target, 'closed', lambda a, b: proxy_cpu(a) - proxy_cpu(b)):+.1f} "
            f"| {med([proxy_cpu(r) for r in fixed.values()]):.1f} "
            f"| {within(target, 'fixed', lambda a, b: proxy_cpu(a) - proxy_cpu(b)):+.1f} "
            f"| {sink:.2f} / {sink_fixed:.2f} @ rate "
            f"| {failed} |"
        )
print()
print("proxy CPU µs/call by round, saturated (closed loop):")
for target in order:
    rounds = runs.get((target, "closed"), {})
    print(f"  {target}: " + ", ".join(f"{proxy_cpu(rounds[r]):.1f}" for r in sorted(rounds)))
if failed_total:
    print(f"{failed_total} calls FAILED")
    sys.exit(1)
print("no failed calls")
