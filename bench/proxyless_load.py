"""Open-loop load for bench/proxyless.sh: unary Echo calls at a fixed rate.

    python proxyless_load.py --target 127.0.0.1:PORT [--xds] \
        --rate 2000 --duration 10 [--warmup 2] [--proc NAME=PID ...]

One grpc.aio channel. Call i is due at start + i / rate whatever happened
to the calls before it (open loop: a slow answer does not delay the next
call), and its latency is counted from when it was due, so time a call
waited for the client itself to get round to it is in the latency too.
Each call has a 128-byte payload and a 5 s deadline.

Without --xds the channel is plaintext h2c (echo itself, or a sidecar's
outbound port). With --xds the target is an xds:/// name and the channel
uses grpc.xds_channel_credentials (endpoints, routes and mTLS from the
control plane named by GRPC_XDS_BOOTSTRAP), as
mesh-proxy/tests/python/xds_client.py does.

Prints one JSON line: calls, achieved rate, p50/p90/p99 in microseconds,
errors by code, how late the client was in sending (p99), CPU seconds
(utime + stime from /proc/PID/stat) of this process and of every --proc
over the measured window, and the machine's steal time from /proc/stat
over the same window. The warm-up (same rate) is not measured.
"""

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter

import grpc
from trellis.echo.v1 import echo_pb2, echo_pb2_grpc

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_ticks(pid: int) -> int:
    """utime + stime of PID, in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name may hold spaces: split after its closing ')'.
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is the state (field 3); utime and stime are fields 14, 15.
    return int(fields[11]) + int(fields[12])


def machine_ticks() -> tuple[int, int]:
    """(steal, total) ticks of all CPUs from /proc/stat."""
    with open("/proc/stat") as f:
        cpu = f.readline().split()
    assert cpu[0] == "cpu"
    # user nice system idle iowait irq softirq steal [guest guest_nice]:
    # guest time is already counted in user, so the first 8 make the total.
    values = [int(v) for v in cpu[1:9]]
    return values[7], sum(values)


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values)) - 1))
    return sorted_values[i]


async def run(args: argparse.Namespace) -> dict:
    if args.xds:
        credentials = grpc.xds_channel_credentials(
            fallback_credentials=grpc.ssl_channel_credentials()
        )
        channel = grpc.aio.secure_channel(args.target, credentials)
    else:
        channel = grpc.aio.insecure_channel(args.target)
    stub = echo_pb2_grpc.EchoServiceStub(channel)
    request = echo_pb2.EchoRequest(message="bench", payload=b"x" * args.payload)

    # Connected (and, through xDS, resolved) before anything is timed.
    deadline = time.monotonic() + args.connect_timeout
    while True:
        try:
            await stub.Echo(request, timeout=5, wait_for_ready=True)
            break
        except grpc.aio.AioRpcError as e:
            if time.monotonic() > deadline:
                raise SystemExit(f"no answer from {args.target}: {e.code().name}: {e.details()}")
            await asyncio.sleep(0.2)

    procs = {}
    for spec in args.proc:
        name, pid = spec.split("=", 1)
        procs[name] = int(pid)
    procs["client"] = os.getpid()

    latencies: list[float] = []
    lateness: list[float] = []
    codes: Counter = Counter()
    errors: list[str] = []
    measuring = False

    async def one(due: float) -> None:
        try:
            await stub.Echo(request, timeout=args.timeout)
            code = "OK"
        except grpc.aio.AioRpcError as e:
            code = e.code().name
            if measuring and len(errors) < 5:
                errors.append(f"{code}: {e.details()}")
        if measuring:
            latencies.append(time.perf_counter() - due)
            codes[code] += 1

    async def phase(seconds: float) -> float:
        """Calls at args.rate for `seconds`; returns the wall time taken
        until the last of them has answered."""
        n = int(seconds * args.rate)
        interval = 1.0 / args.rate
        tasks = set()
        start = time.perf_counter()
        for i in range(n):
            due = start + i * interval
            wait = due - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            if measuring:
                lateness.append(max(0.0, time.perf_counter() - due))
            task = asyncio.create_task(one(due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(list(tasks))
        return time.perf_counter() - start

    if args.warmup > 0:
        await phase(args.warmup)

    measuring = True
    before = {name: cpu_ticks(pid) for name, pid in procs.items()}
    steal0, total0 = machine_ticks()
    elapsed = await phase(args.duration)
    steal1, total1 = machine_ticks()
    after = {name: cpu_ticks(pid) for name, pid in procs.items()}
    measuring = False
    await channel.close()

    latencies.sort()
    lateness.sort()
    calls = len(latencies)
    cpu = {name: (after[name] - before[name]) / CLK_TCK for name in procs}
    return {
        "target": args.target,
        "calls": calls,
        "offered_rate": args.rate,
        "rate": calls / elapsed,
        "elapsed_s": elapsed,
        "p50_us": percentile(latencies, 0.50) * 1e6,
        "p90_us": percentile(latencies, 0.90) * 1e6,
        "p99_us": percentile(latencies, 0.99) * 1e6,
        "max_us": (latencies[-1] if latencies else float("nan")) * 1e6,
        "send_late_p99_us": percentile(lateness, 0.99) * 1e6,
        "codes": dict(codes),
        "errors": calls - codes.get("OK", 0),
        "error_samples": errors,
        "cpu_s": cpu,
        "cpu_s_per_1k": {name: (s * 1000 / calls if calls else float("nan")) for name, s in cpu.items()},
        "steal_pct": 100.0 * (steal1 - steal0) / max(1, total1 - total0),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", required=True, help="host:port, or xds:///NAME with --xds")
    p.add_argument("--xds", action="store_true", help="xDS credentials (GRPC_XDS_BOOTSTRAP)")
    p.add_argument("--rate", type=float, default=2000.0, help="calls per second offered (2000)")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds (10)")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first (2)")
    p.add_argument("--payload", type=int, default=128, help="payload bytes (128)")
    p.add_argument("--timeout", type=float, default=5.0, help="each call's deadline, s (5)")
    p.add_argument("--connect-timeout", type=float, default=30.0, help="s to wait for a first answer (30)")
    p.add_argument("--proc", action="append", default=[], metavar="NAME=PID",
                   help="a process whose CPU time to report (repeatable)")
    args = p.parse_args()
    result = asyncio.run(run(args))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())
