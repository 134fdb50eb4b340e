"""Groups a flat `perf report --sort dso,symbol --stdio` (on stdin) by part
of the proxy's stack, and prints the groups and the top symbols.

Used by bench/profile.sh; the groups are the ones bench/RESULTS.md
reports: where a proxy hop's CPU goes."""

import re
import sys

# First match wins: order from the most specific.
GROUPS = [
    ("memory copies (memmove/memcpy)", r"memmove|memcpy|memset"),
    ("allocator (malloc/free)", r"malloc|free|realloc|calloc|_int_|sdallocx|mi_|je_|cfree"),
    ("kernel: network", r"\[k\].*(tcp|ip_|sock|skb|net_|__dev|loopback|napi|inet)"),
    ("kernel: scheduling and wake-ups", r"\[k\].*(sched|schedule|futex|wake|switch|epoll|ep_|pick_next|enqueue|dequeue|update_curr|finish_task)"),
    ("kernel: other", r"\[k\]"),
    ("TLS (rustls, ring)", r"rustls|ring::|ring_core|aes|gcm|chacha|poly1305|sha"),
    ("h2", r"\bh2::"),
    ("hyper", r"hyper|hyper_util"),
    ("tokio", r"tokio::|mio::"),
    ("the proxy's own code", r"mesh_proxy::|trellis::"),
    ("http, bytes, tracing, other crates", r"http::|bytes::|tracing|indexmap|hashbrown|prometheus|arc_swap|core::|alloc::|std::"),
]

rows = []
for line in sys.stdin:
    m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+(\[[.k]\])\s+(.*)", line)
    if not m:
        continue
    pct, dso, kind, symbol = float(m.group(1)), m.group(2), m.group(3), m.group(4).strip()
    rows.append((pct, dso, kind, symbol))

totals = {}
for pct, dso, kind, symbol in rows:
    text = f"{kind} {symbol}"
    for name, pattern in GROUPS:
        if re.search(pattern, text):
            break
    else:
        name = "other"
    totals[name] = totals.get(name, 0.0) + pct

for name, pct in sorted(totals.items(), key=lambda kv: -kv[1]):
    print(f"{pct:6.1f} %  {name}")
print()
print("== top symbols (self time) ==")
for pct, dso, kind, symbol in sorted(rows, key=lambda r: -r[0])[:25]:
    print(f"{pct:6.2f} %  {kind} {symbol[:110]}")
