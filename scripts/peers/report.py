#!/usr/bin/env python3
"""Summarises a scripts/bench-peers.sh run: one table, the ratios the
performance targets are stated in, and SVG bar charts (no dependencies).

    report.py RUN_DIR [--docs]

--docs copies the charts to docs/img/peers-*.svg and the table to
docs/img/peers-summary.md for docs/benchmarks.md to include.
"""
import json
import math
import os
import shutil
import sys

# Kometa runs once per I/O driver (kometa-io_uring, kometa-epoll); plain
# "kometa" is a run with the default driver.
KOMETAS = ["kometa-io_uring", "kometa-epoll", "kometa"]
SERVERS = KOMETAS + ["floor", "nchan", "node-ws"]
LABELS = {
    "kometa": "Kometa",
    "kometa-io_uring": "Kometa io_uring",
    "kometa-epoll": "Kometa epoll",
    "floor": "floor (send loop)",
    "nchan": "Nginx+Nchan",
    "node-ws": "Node ws",
}
COLORS = ["#2b6cb0", "#718096", "#dd6b20", "#38a169"]


def load(path):
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def get(document, *path):
    for key in path:
        if not isinstance(document, dict) or key not in document:
            return None
        document = document[key]
    return document


def figures(run, server):
    base = os.path.join(run, server)
    idle = load(os.path.join(base, "idle.json"))
    broadcast = load(os.path.join(base, "broadcast.json"))
    fastest = load(os.path.join(base, "max.json"))
    connect = load(os.path.join(base, "connect.json"))
    before = load(os.path.join(base, "tree-before.json"))
    held = load(os.path.join(base, "tree-idle.json"))
    if idle is None and broadcast is None:
        return None
    established = get(idle, "connections", "established") or 0
    tree_bytes = None
    if before and held and established:
        tree_bytes = (held["rss_bytes"] - before["rss_bytes"]) / established

    def cpu(name):
        sample = load(os.path.join(base, f"tree-{name}.json"))
        return None if not sample else sample["after"]["cpu_s"] - sample["before"]["cpu_s"]

    return {
        "connections": established,
        "bytes_per_connection": tree_bytes,
        "slab_per_socket": get(idle, "server", "slab_per_socket_bytes"),
        "last_p50": get(broadcast, "latency_ms", "last_subscriber", "p50_ms"),
        "last_p90": get(broadcast, "latency_ms", "last_subscriber", "p90_ms"),
        "last_p99": get(broadcast, "latency_ms", "last_subscriber", "p99_ms"),
        "last_max": get(broadcast, "latency_ms", "last_subscriber", "max_ms"),
        "delivery_p50": get(broadcast, "latency_ms", "delivery", "p50_ms"),
        "delivery_p99": get(broadcast, "latency_ms", "delivery", "p99_ms"),
        "deliveries_per_s_10": get(broadcast, "deliveries", "per_s"),
        "missing_10": get(broadcast, "deliveries", "missing"),
        "duplicates_10": get(broadcast, "deliveries", "duplicates"),
        "server_cpu_10": cpu("broadcast"),
        "generator_cpu_10": get(broadcast, "generator", "cpu_s"),
        "deliveries_per_s_max": get(fastest, "deliveries", "per_s"),
        "max_last_p50": get(fastest, "latency_ms", "last_subscriber", "p50_ms"),
        "max_last_p99": get(fastest, "latency_ms", "last_subscriber", "p99_ms"),
        "server_cpu_max": cpu("max"),
        "cpu_us_per_delivery": per_delivery_us(cpu("max"), get(fastest, "deliveries", "total")),
        "handshakes_per_s": get(connect, "connections", "connects_per_s"),
        "connect_errors": get(connect, "connections", "connect_errors_total"),
    }


def per_delivery_us(cpu_s, deliveries):
    if cpu_s is None or not deliveries:
        return None
    return cpu_s * 1e6 / deliveries


def fmt(value, digits=1, unit=""):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}{unit}"
    return f"{value:,}{unit}"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def bar_chart(title, unit, groups, series, values, log=False):
    """groups: x labels; series: legend names; values[g][s]: number or None.
    log: a logarithmic axis, for figures that differ by orders of magnitude."""
    width, height, bottom, top = 760, 360, 70, 50
    present = [v for row in values for v in row if v is not None and v > 0]
    peak = max(present + [1])
    if log:
        low = 10 ** math.floor(math.log10(min(present + [peak])))
        high = 10 ** math.ceil(math.log10(peak))
        if high <= low:
            high = low * 10

        def scale(value):
            return (math.log10(value) - math.log10(low)) / (math.log10(high) - math.log10(low))

        ticks = [low * 10 ** step for step in range(round(math.log10(high / low)) + 1)]
    else:
        # Round steps (1, 2 or 5 times a power of ten), four to six of them.
        magnitude = 10 ** math.floor(math.log10(peak / 4))
        step = next(m * magnitude for m in (1, 2, 5, 10) if peak / (m * magnitude) <= 5)
        top_tick = math.ceil(peak / step) * step

        def scale(value):
            return value / top_tick

        ticks = [step * n for n in range(round(top_tick / step) + 1)]
    # Room for the widest tick label (about 7 px a character) and the axis title.
    left = 30 + 7 * max(len(f"{value:,.0f}") for value in ticks)
    plot_w, plot_h = width - left - 20, height - bottom - top
    bar_group = plot_w / max(len(groups), 1)
    bar_w = bar_group * 0.8 / max(len(series), 1)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="15" font-weight="bold">{title}</text>']
    for value in ticks:
        y = top + plot_h - plot_h * (scale(value) if value > 0 else 0)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" stroke="#e2e8f0"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{value:,.0f}</text>')
    axis = unit + (" (log scale)" if log else "")
    out.append(f'<text x="16" y="{top + plot_h / 2}" transform="rotate(-90 16 {top + plot_h / 2})" text-anchor="middle">{axis}</text>')
    for g, group in enumerate(groups):
        x0 = left + g * bar_group + bar_group * 0.1
        for s, _ in enumerate(series):
            value = values[g][s]
            if value is None or value <= 0:
                x = x0 + s * bar_w + bar_w / 2
                out.append(f'<text x="{x:.1f}" y="{top + plot_h - 6}" text-anchor="middle" font-size="10" fill="#64748b">not measured</text>')
                continue
            h = plot_h * max(scale(value), 0)
            x = x0 + s * bar_w
            y = top + plot_h - h
            out.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w - 2:.1f}" height="{h:.1f}" fill="{COLORS[s % len(COLORS)]}"/>')
            out.append(f'<text x="{x + bar_w / 2 - 1:.1f}" y="{y - 3:.1f}" text-anchor="middle" font-size="10">{value:,.0f}</text>')
        out.append(f'<text x="{x0 + bar_group * 0.4:.1f}" y="{top + plot_h + 18}" text-anchor="middle">{group}</text>')
    if len(series) > 1:
        for s, name in enumerate(series):
            x = left + s * 150
            out.append(f'<rect x="{x}" y="{height - 28}" width="12" height="12" fill="{COLORS[s % len(COLORS)]}"/>')
            out.append(f'<text x="{x + 16}" y="{height - 18}">{name}</text>')
    out.append("</svg>")
    return "\n".join(out)


def main():
    run = sys.argv[1]
    docs = "--docs" in sys.argv[2:]
    results = {server: figures(run, server) for server in SERVERS}
    results = {server: data for server, data in results.items() if data}
    with open(os.path.join(run, "summary.json"), "w") as handle:
        json.dump(results, handle, indent=2)

    rows = [
        ("connections held", "connections", 0, ""),
        ("user-space bytes per idle connection", "bytes_per_connection", 0, " B"),
        ("kernel slab per socket", "slab_per_socket", 0, " B"),
        ("10/s: last subscriber p50", "last_p50", 1, " ms"),
        ("10/s: last subscriber p99", "last_p99", 1, " ms"),
        ("10/s: last subscriber max", "last_max", 1, " ms"),
        ("10/s: per delivery p50 / p99", None, 1, ""),
        ("10/s: missing / duplicates", None, 0, ""),
        ("10/s: server CPU / generator CPU (s)", None, 1, ""),
        ("max rate: deliveries/s", "deliveries_per_s_max", 0, ""),
        ("max rate: last subscriber p50", "max_last_p50", 0, " ms"),
        ("max rate: last subscriber p99", "max_last_p99", 0, " ms"),
        ("max rate: server CPU per delivery", "cpu_us_per_delivery", 2, " µs"),
        ("handshakes/s", "handshakes_per_s", 0, ""),
    ]
    servers = list(results)
    lines = ["| | " + " | ".join(LABELS[s] for s in servers) + " |", "|---|" + "---|" * len(servers)]
    for label, key, digits, unit in rows:
        cells = []
        for server in servers:
            data = results[server]
            if key:
                cells.append(fmt(data[key], digits, unit))
            elif "per delivery" in label:
                cells.append(f"{fmt(data['delivery_p50'], 1)} / {fmt(data['delivery_p99'], 1)} ms")
            elif "missing" in label:
                cells.append(f"{fmt(data['missing_10'])} / {fmt(data['duplicates_10'])}")
            else:
                cells.append(f"{fmt(data['server_cpu_10'], 1)} / {fmt(data['generator_cpu_10'], 1)}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    checks = []

    def target(name, value, goal, satisfied):
        verdict = "-" if value is None else ("met" if satisfied(value) else "NOT met")
        checks.append(f"| {name} | {goal} | {fmt(value, 2)} | {verdict} |")

    for server in [k for k in KOMETAS if k in results]:
        kometa = results[server]
        who = LABELS[server]
        target(f"{who}: bytes per idle connection", kometa.get("bytes_per_connection"), "≤ 200 B", lambda v: v <= 200)
        for peer, goal in (("node-ws", 3.0), ("nchan", 1.5), ("floor", 0.7)):
            value = ratio(kometa.get("deliveries_per_s_max"), results.get(peer, {}).get("deliveries_per_s_max"))
            target(f"{who}: deliveries/s vs {LABELS[peer]}", value, f"≥ {goal}×", lambda v, g=goal: v >= g)
        target(f"{who}: last subscriber p99 at 10/s", kometa.get("last_p99"), "≤ 20 ms", lambda v: v <= 20)
        target(f"{who}: last subscriber p99 at max rate", kometa.get("max_last_p99"), "≤ 400 ms", lambda v: v <= 400)
        value = ratio(kometa.get("handshakes_per_s"), results.get("nchan", {}).get("handshakes_per_s"))
        target(f"{who}: handshakes/s vs Nginx+Nchan", value, "≥ 1.5×", lambda v: v >= 1.5)
    summary = "\n".join(lines) + "\n\n| target | goal | measured | |\n|---|---|---|---|\n" + "\n".join(checks) + "\n"
    print(summary)
    with open(os.path.join(run, "summary.md"), "w") as handle:
        handle.write(summary)

    labels = [LABELS[s] for s in servers]
    charts = {
        "peers-latency.svg": bar_chart(
            "Broadcast to every subscriber at 10/s: time until the last one has it",
            "milliseconds",
            labels,
            ["p50", "p90", "p99"],
            [[results[s]["last_p50"], results[s]["last_p90"], results[s]["last_p99"]] for s in servers],
            log=True,
        ),
        "peers-memory.svg": bar_chart(
            "Server memory per idle connection (user space)",
            "bytes",
            labels,
            ["bytes per connection"],
            [[results[s]["bytes_per_connection"]] for s in servers],
            log=True,
        ),
        "peers-throughput.svg": bar_chart(
            "Deliveries per second at the highest publish rate",
            "deliveries per second",
            labels,
            ["deliveries/s"],
            [[results[s]["deliveries_per_s_max"]] for s in servers],
            log=True,
        ),
        "peers-handshakes.svg": bar_chart(
            "WebSocket handshakes per second (connect, upgrade, close)",
            "handshakes per second",
            labels,
            ["handshakes/s"],
            [[results[s]["handshakes_per_s"]] for s in servers],
        ),
    }
    for name, svg in charts.items():
        with open(os.path.join(run, name), "w") as handle:
            handle.write(svg)
    if docs:
        os.makedirs("docs/img", exist_ok=True)
        for name in charts:
            shutil.copy(os.path.join(run, name), os.path.join("docs/img", name))
        shutil.copy(os.path.join(run, "summary.md"), "docs/img/peers-summary.md")
        print("report: charts and summary copied to docs/img/")


if __name__ == "__main__":
    main()
