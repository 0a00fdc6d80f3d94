#!/usr/bin/env python3
"""The capacity report of scripts/capacity.sh: its results as JSON, and docs/capacity.md and
docs/capacity.svg rendered from that JSON alone (so the report can be regenerated).

    scripts/capacity_report.py [docs/capacity.json]   render capacity.md and capacity.svg beside it
    scripts/capacity_report.py collect WORK OUT.json  the results of a run's scratch directory
    scripts/capacity_report.py wrk FILE [MEMORY.json] one line about one wrk run (progress)
"""

import datetime
import json
import os
import platform
import re
import shlex
import sys

# The old stack's published line (Gunicorn + Uvicorn + FastAPI + DuckDB, 4 workers on 2 CPUs and
# 2 GB): concurrent users, requests a second, latency.
OLD_STACK = {
    "stack": "Gunicorn + Uvicorn + FastAPI + DuckDB, 4 workers on 2 CPUs / 2 GB (published)",
    "points": [
        {"users": 10, "rps": 20, "latency": "under 100 ms", "latency_ms": [None, 100]},
        {"users": 30, "rps": 50, "latency": "100–300 ms", "latency_ms": [100, 300]},
        {"users": 50, "rps": 80, "latency": "300–500 ms", "latency_ms": [300, 500]},
        {"users": 100, "rps": None, "latency": "degraded, above 500 ms", "latency_ms": [500, None]},
    ],
}

DESCRIPTIONS = {
    "health": "`GET /healthz`: liveness, never touches DuckDB.",
    "lookup": "One order by a random existing key (`SELECT * FROM orders WHERE o_orderkey = $1`; "
    "TPC-H keeps the first 8 of every 32 keys: `floor(n / 8) * 32 + n % 8` for a uniform n in "
    "1..orders). No sort key: the snapshot's zone maps find it.",
    "dashboard_cached": "The dashboard aggregate (`SELECT o_orderstatus, count(*), "
    "sum(o_totalprice) FROM orders GROUP BY 1`), fixed: after the warm-up every answer is a "
    "result-cache hit.",
    "dashboard_nocache": "The same statement with `Cache-Control: no-cache`: DuckDB runs every "
    "request.",
    "q1": "TPC-H Q1 (`scripts/tpch/q01.sql`: all 6 million lines of lineitem), "
    "`Cache-Control: no-cache`.",
    "export_json": "10,000 rows of lineitem (all 16 columns) from a random order key on "
    "(`WHERE l_orderkey >= $1 LIMIT 10000`: each request a different slice, about 1.5 MB), JSON.",
    "export_arrow": "The same slices as an Arrow IPC stream (`format=arrow`, about 1.7 MB).",
    "bimix": "`scripts/wrk/bimix.lua`, a BI dashboard's mix: 50 % an order by a random key in "
    "1..6,000,000 (a quarter of them exist), 15 % an order's lines, 20 % an order-status "
    "aggregate from a random date on (365 variants), 10 % the top 10 customers of a random "
    "30-day window (1,501 variants), 5 % a Q1-like aggregate over lineitem (61 variants). The "
    "result cache answers repeated aggregates; raw DuckDB runs every one.",
}

UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0, "h": 3600000.0}
UNITS_BYTES = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


def parse_duration_ms(text):
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    return float(m.group(1)) * UNITS_MS[m.group(2)] if m else None


def parse_wrk(text):
    """wrk's report (with --latency) as numbers: req/s, percentiles in ms, errors."""
    out = {"requests": None, "duration_s": None, "rps": None, "latency_ms": {},
           "non2xx": 0, "socket_errors": {"connect": 0, "read": 0, "write": 0, "timeout": 0},
           "bytes_per_s": None}
    m = re.search(r"^\s*Latency\s+(\S+)\s+(\S+)\s+(\S+)", text, re.M)
    if m:
        out["latency_ms"]["avg"] = parse_duration_ms(m.group(1))
        out["latency_ms"]["max"] = parse_duration_ms(m.group(3))
    for pct, value in re.findall(r"^\s*(50|75|90|99)%\s+(\S+)", text, re.M):
        out["latency_ms"][f"p{pct}"] = parse_duration_ms(value)
    m = re.search(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h)", text, re.M)
    if m:
        out["requests"] = int(m.group(1))
        out["duration_s"] = float(m.group(2)) * UNITS_MS[m.group(3)] / 1000
    m = re.search(r"^Requests/sec:\s*([\d.]+)", text, re.M)
    if m:
        out["rps"] = float(m.group(1))
    m = re.search(r"^Transfer/sec:\s*([\d.]+)(\w+)", text, re.M)
    if m:
        out["bytes_per_s"] = float(m.group(1)) * UNITS_BYTES.get(m.group(2), 1)
    m = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", text)
    if m:
        out["non2xx"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        out["socket_errors"] = dict(zip(("connect", "read", "write", "timeout"),
                                        map(int, m.groups())))
    return out


def parse_metrics(path):
    """Prometheus text: {name{labels}: value}."""
    values = {}
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("#") or not line.strip():
                    continue
                key, _, value = line.rstrip().rpartition(" ")
                try:
                    values[key] = float(value)
                except ValueError:
                    pass
    except OSError:
        return None
    return values


def metrics_delta(before, after):
    if before is None or after is None:
        return None

    def d(key):
        return int(after.get(key, 0) - before.get(key, 0))

    exits = {}
    for key in after:
        m = re.fullmatch(r'ferrocorn_worker_exits_total\{cause="(\w+)"\}', key)
        if m and d(key):
            exits[m.group(1)] = d(key)
    return {
        "result_cache_hits": d("ferrocorn_result_cache_hits_total"),
        "result_cache_misses": d("ferrocorn_result_cache_misses_total"),
        "worker_exits": exits,
    }


def read_tsv(path):
    rows = []
    try:
        with open(path) as f:
            for line in f:
                if line.strip():
                    rows.append(line.rstrip("\n").split("\t"))
    except OSError:
        pass
    return rows


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def machine():
    info = {"nproc": len(os.sched_getaffinity(0)), "cpus_online": os.cpu_count(),
            "kernel": platform.release(), "arch": platform.machine()}
    try:
        cpuinfo = open("/proc/cpuinfo").read()
        m = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.M)
        info["cpu_model"] = m.group(1).strip() if m else None
    except OSError:
        info["cpu_model"] = None
    try:
        m = re.search(r"^MemTotal:\s*(\d+) kB", open("/proc/meminfo").read(), re.M)
        info["memory_mib"] = int(m.group(1)) // 1024
    except (OSError, AttributeError):
        info["memory_mib"] = None
    try:
        m = re.search(r'^PRETTY_NAME="?(.*?)"?$', open("/etc/os-release").read(), re.M)
        info["os"] = m.group(1) if m else None
    except OSError:
        info["os"] = None
    return info


def collect(work, out_path):
    meta = dict(read_tsv(os.path.join(work, "meta.tsv")))
    commands = []
    try:
        with open(os.path.join(work, "commands.tsv")) as f:
            for line in f:
                key, *argv = line.rstrip("\n").split("\x1f")
                commands.append({"key": key, "argv": argv, "command": shlex.join(argv)})
    except OSError:
        pass
    users = [int(u) for u in meta.get("users", "").split()]
    seconds = int(meta["seconds"])
    raw = {}
    for name in sorted(os.listdir(os.path.join(work, "raw"))):
        if name.endswith(".json"):
            raw[name[:-5]] = read_json(os.path.join(work, "raw", name))
    bare = {}
    for c in users:
        path = os.path.join(work, "bare", f"{c}.wrk")
        if os.path.exists(path):
            text = open(path).read()
            bare[str(c)] = dict(parse_wrk(text), wrk_output=text)
    workloads, cells = [], []
    for name, title, ceiling, raw_key in read_tsv(os.path.join(work, "workloads.tsv")):
        workloads.append({"name": name, "title": title, "ceiling": ceiling,
                          "raw_key": raw_key or None, "description": DESCRIPTIONS.get(name, "")})
        warmup = os.path.join(work, "cells", f"{name}.warmup.wrk")
        if os.path.exists(warmup):
            workloads[-1]["warmup"] = parse_wrk(open(warmup).read())
        for c in users:
            prefix = os.path.join(work, "cells", f"{name}.{c}")
            if not os.path.exists(prefix + ".wrk"):
                continue
            text = open(prefix + ".wrk").read()
            cell = dict(parse_wrk(text), workload=name, users=c)
            cell["memory"] = read_json(prefix + ".memory.json")
            cell["metrics"] = metrics_delta(parse_metrics(prefix + ".metrics.before"),
                                            parse_metrics(prefix + ".metrics.after"))
            fractions = {}
            if cell["rps"] is not None:
                b = bare.get(str(c), {}).get("rps")
                if b:
                    fractions["bare_hyper"] = cell["rps"] / b
                r = (raw.get(raw_key) or {}).get("queries_per_second")
                if raw_key and r:
                    fractions["raw_duckdb"] = cell["rps"] / r
            cell["of_ceiling"] = fractions
            cell["wrk_output"] = text
            cells.append(cell)
    try:
        config = open(os.path.join(work, "config.txt")).read()
    except OSError:
        config = None
    result = {
        "generated_by": "scripts/capacity.sh",
        "seconds": seconds,
        "users": users,
        "smoke": meta.get("smoke") == "1",
        "meta": meta,
        "machine": machine(),
        "commands": commands,
        "config": config,
        "workloads": workloads,
        "cells": cells,
        "ceilings": {"bare_hyper": bare, "raw_duckdb": raw},
        "old_stack": OLD_STACK,
    }
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
        f.write("\n")


# --- Rendering -------------------------------------------------------------------------------------

def fmt_ms(ms):
    if ms is None:
        return "–"
    if ms >= 1000:
        return f"{ms / 1000:.2f} s"
    if ms >= 100:
        return f"{ms:.0f} ms"
    if ms >= 10:
        return f"{ms:.1f} ms"
    return f"{ms:.2f} ms"


def fmt_rate(r):
    if r is None:
        return "–"
    return f"{r:,.0f}" if r >= 100 else f"{r:,.1f}"


def fmt_mib(b):
    return "–" if b is None else f"{b / 2**20:,.0f}"


def fmt_fraction(f):
    if f is None:
        return "–"
    return f"{f * 100:.0f} %" if f < 10 else f"{f:,.0f}×"


def errors(cell):
    parts = []
    if cell.get("non2xx"):
        parts.append(f"{cell['non2xx']:,} non-2xx")
    for kind, n in (cell.get("socket_errors") or {}).items():
        if n:
            parts.append(f"{n:,} {kind}")
    return ", ".join(parts) or "0"


def ceiling_text(workload, cell):
    f = cell.get("of_ceiling") or {}
    if workload["ceiling"] == "bare_hyper":
        return f"{fmt_fraction(f.get('bare_hyper'))} of bare hyper"
    text = f"{fmt_fraction(f.get('raw_duckdb'))} of raw DuckDB"
    if workload["name"] == "dashboard_cached" and f.get("bare_hyper") is not None:
        text += f" ({fmt_fraction(f['bare_hyper'])} of bare hyper)"
    return text


def memory_text(cell):
    m = cell.get("memory")
    if not m:
        return "–"
    counter = m.get("counter_peak_bytes") if m.get("peak_reset") else None
    return (f"{fmt_mib(counter)} / {fmt_mib(m.get('sampled_peak_bytes'))} / "
            f"{fmt_mib(m.get('sampled_anon_peak_bytes'))}")


def render_markdown(data):
    meta, mach = data["meta"], data["machine"]
    workloads = {w["name"]: w for w in data["workloads"]}
    cells = {(c["workload"], c["users"]): c for c in data["cells"]}
    old = {p["users"]: p for p in data["old_stack"]["points"]}
    bare = data["ceilings"]["bare_hyper"]
    raw = data["ceilings"]["raw_duckdb"]
    lines = []
    add = lines.append
    add("# ferrocorn — capacity in the old stack's container")
    add("")
    add(f"Generated by `scripts/capacity.sh` ({meta.get('started', '?')} to "
        f"{meta.get('finished', '?')}, {meta.get('elapsed_s', '?')} s) from `docs/capacity.json`; "
        "do not edit: run it again, or `scripts/capacity_report.py docs/capacity.json` to render "
        "the JSON again.")
    add("")
    if data.get("smoke"):
        add(f"> **Smoke run** ({data['seconds']} s a cell, users {' '.join(map(str, data['users']))}, "
            f"workloads: {meta.get('workloads')}): it shows that the command works end to end; "
            "its figures are not the capacity. For those, run `scripts/capacity.sh` (10 s a "
            "cell, every level and workload) on a quiet machine.")
        add("")
    add("One container with the limits of the stack ferrocorn replaces (`--cpus 2 --memory 2g`, "
        "read-only root, the TPC-H SF1 Parquet files mounted read-only, a fresh volume for the "
        "cache) and the configuration the image ships: nothing tuned, no sort keys. wrk "
        f"(`-t2 -c USERS -d{data['seconds']}s --latency --timeout 30s`) runs on the same machine, "
        "outside the container, one workload at a time, each user level after a warm-up of "
        f"{meta.get('warmup', '?')} s and once no request is in flight.")
    add("")
    add("![throughput and p99 latency against concurrent users](capacity.svg)")
    add("")

    add("## The machine")
    add("")
    add("| | |")
    add("| --- | --- |")
    add(f"| CPUs (nproc) | {mach.get('nproc')} ({mach.get('cpu_model') or 'unknown model'}) |")
    add(f"| memory | {mach.get('memory_mib') or 0:,} MiB |")
    add(f"| kernel | {mach.get('kernel')} ({mach.get('os') or '?'}, {mach.get('arch')}) |")
    add(f"| load average (1, 5, 15 min) | before {meta.get('load_before', '?')}, "
        f"after {meta.get('load_after', '?')} |")
    add(f"| Docker server | {meta.get('docker', '?')} |")
    add(f"| wrk | {meta.get('wrk', '?')} |")
    add(f"| ferrocorn | {meta.get('ferrocorn', '?')}, commit {meta.get('git', '?')} |")
    add(f"| container | `--cpus {meta.get('cpus')} --memory {meta.get('memory')}`, memory cgroup "
        f"`{meta.get('cgroup') or 'not found'}` |")
    add(f"| start | healthy after {meta.get('healthy_after_s', '?')} s, every dataset on its "
        f"snapshot after {meta.get('snapshots_after_s', '?')} s |")
    add("")

    add("## The configuration")
    add("")
    add(f"The image's own (`/etc/ferrocorn/ferrocorn.toml`, the documented defaults): "
        f"{meta.get('workers', '?')} workers from the cgroup's CPU quota, each with "
        f"{meta.get('duckdb_threads_each', '?')} DuckDB thread(s) and {meta.get('duckdb_memory_each', '?')} "
        "of DuckDB memory (three quarters of the 2 GB limit, shared), the result cache on, "
        "recycling after 1,000 API requests. As the running pool sees it "
        "(`docker exec NAME ferrocorn --config /etc/ferrocorn/ferrocorn.toml --print-config`, "
        "the entrypoint's configuration file):")
    add("")
    add("```toml")
    add((data.get("config") or "(not captured)").rstrip())
    add("```")
    add("")

    add("## Workloads")
    add("")
    add("| workload | what | ceiling |")
    add("| --- | --- | --- |")
    for w in data["workloads"]:
        ceiling = ("bare hyper at the same users" if w["ceiling"] == "bare_hyper"
                   else f"raw DuckDB, `{w['raw_key']}` queries")
        add(f"| {w['title']} | {w['description']} | {ceiling} |")
    add("")

    add("## At a glance: req/s (p99)")
    add("")
    add("| workload | " + " | ".join(f"{u} users" for u in data["users"]) + " |")
    add("| --- |" + " --- |" * len(data["users"]))
    row = []
    for u in data["users"]:
        p = old.get(u)
        row.append("–" if not p else
                   (f"≈ {p['rps']} ({p['latency']})" if p["rps"] else p["latency"]))
    add(f"| **old stack (published)** | " + " | ".join(row) + " |")
    for w in data["workloads"]:
        row = []
        for u in data["users"]:
            c = cells.get((w["name"], u))
            row.append("–" if not c else
                       f"{fmt_rate(c['rps'])} ({fmt_ms(c['latency_ms'].get('p99'))})")
        add(f"| {w['title']} | " + " | ".join(row) + " |")
    add("")

    add("## The table")
    add("")
    add("Peak memory is the container's memory cgroup's, in MiB: the kernel's peak of its usage, "
        "reset before each cell / the highest usage sampled every 200 ms / the highest anonymous "
        "memory sampled (RSS: what reclaim cannot free without swap). Usage counts the page "
        "cache the container's reads are charged for (the snapshot files, the results' files), "
        "which the kernel reclaims at the limit: a usage at 2,048 means the cache filled the "
        "limit, not that the pool needs it. Errors: answers other than 2xx or "
        "3xx, and wrk's socket errors (connect, read, write, timeout after 30 s). The fraction is "
        "of the workload's ceiling (below) at the same number of users.")
    add("")
    for u in data["users"]:
        add(f"### {u} concurrent users")
        add("")
        add("| workload | req/s | p50 | p90 | p99 | errors | peak MiB: usage (reset) / usage (sampled) / RSS | of its ceiling |")
        add("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for w in data["workloads"]:
            c = cells.get((w["name"], u))
            if not c:
                continue
            lat = c["latency_ms"]
            add(f"| {w['title']} | {fmt_rate(c['rps'])} | {fmt_ms(lat.get('p50'))} | "
                f"{fmt_ms(lat.get('p90'))} | {fmt_ms(lat.get('p99'))} | {errors(c)} | "
                f"{memory_text(c)} | {ceiling_text(w, c)} |")
        p = old.get(u)
        if p:
            add(f"| *old stack (published)* | {'≈ ' + str(p['rps']) if p['rps'] else 'degraded'} | "
                f"{p['latency']} | | | | (2 GB limit) | |")
        add("")

    add("### Recycles and result cache during the cells")
    add("")
    add("| workload | users | requests | result-cache hits / misses | worker exits |")
    add("| --- | --- | --- | --- | --- |")
    for c in data["cells"]:
        m = c.get("metrics") or {}
        exits = ", ".join(f"{n} {cause}" for cause, n in (m.get("worker_exits") or {}).items()) or "0"
        hits = (f"{m.get('result_cache_hits', 0):,} / {m.get('result_cache_misses', 0):,}"
                if m else "–")
        add(f"| {workloads[c['workload']]['title']} | {c['users']} | "
            f"{(c.get('requests') or 0):,} | {hits} | {exits} |")
    add("")

    add("## Ceilings, measured in the same run")
    add("")
    if bare:
        add(f"**Bare hyper** (`crates/supervisor/examples/bare_hyper.rs`: {meta.get('workers', '?')} "
            "processes on `SO_REUSEPORT` listeners, a constant body, in a container with the same "
            "limits; ferrocorn's container paused meanwhile), the same wrk against `/healthz`:")
        add("")
        add("| users | req/s | p50 | p90 | p99 | errors |")
        add("| --- | --- | --- | --- | --- | --- |")
        for u in data["users"]:
            b = bare.get(str(u))
            if b:
                lat = b["latency_ms"]
                add(f"| {u} | {fmt_rate(b['rps'])} | {fmt_ms(lat.get('p50'))} | "
                    f"{fmt_ms(lat.get('p90'))} | {fmt_ms(lat.get('p99'))} | {errors(b)} |")
        add("")
    if raw:
        add(f"**Raw DuckDB** in-process (`crates/query-core/benches/raw_queries.rs`): "
            f"{meta.get('workers', '?')} instances of {meta.get('duckdb_threads_each', '?')} "
            f"thread(s) and {meta.get('duckdb_memory_each', '?')} each, like the pool's workers, on "
            "the container's own snapshot files (attached read-only, on the search path, as a "
            "worker does), each statement prepared once, each result materialised as Arrow, the "
            "same parameter generators as wrk's; ferrocorn's container paused meanwhile. No "
            "HTTP, no encoding, no result cache.")
        add("")
        add("| queries | queries/s | empty results |")
        add("| --- | --- | --- |")
        for key, r in raw.items():
            if r:
                add(f"| {key} | {fmt_rate(r.get('queries_per_second'))} | "
                    f"{r.get('empty_results', 0):,} of {r.get('queries', 0):,} |")
        add("")

    add("## Commands")
    add("")
    add("```sh")
    add(f"{meta.get('invocation', 'scripts/capacity.sh')}")
    add("```")
    add("")
    add("which ran (USERS stands for each level; the port and names are this run's):")
    add("")
    add("```sh")
    for c in data["commands"]:
        add(f"# {c['key']}")
        add(c["command"])
    add("```")
    add("")

    add("## Notes")
    add("")
    add("- wrk and the container share the machine: on a 2-core machine wrk's own CPU comes out "
        "of what the container's quota could use; bare hyper and raw DuckDB pay the same.")
    add("- The dashboard's cache hits do no DuckDB work, so their fraction of raw DuckDB (which "
        "executes the statement each time) can exceed 100 %; bare hyper is their HTTP ceiling.")
    add("- The BI mix's aggregates repeat (365, 1,501 and 61 variants), so the result cache "
        "answers part of them; raw DuckDB executes every one.")
    add("- Point lookups: without a sort key (the image tunes nothing) DuckDB finds an order "
        "through the snapshot's zone maps (orders are stored in key order), not an index.")
    add("- Memory: the kernel's peak (`memory.max_usage_in_bytes` on cgroup v1, reset by writing "
        "0; `memory.peak` on v2, reset where the kernel allows it) and the sampled usage "
        "(`memory.usage_in_bytes` / `memory.current`) count the same thing, so a peak shorter "
        "than 200 ms shows only in the first. RSS is `memory.stat`'s `total_rss` (v1) or `anon` "
        "(v2); docker stats' working set (usage less inactive files) is in capacity.json.")
    add("")
    return "\n".join(lines)


def render_chart(data, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matplotlib.rcParams["svg.hashsalt"] = "ferrocorn-capacity"
    users = data["users"]
    cells = {(c["workload"], c["users"]): c for c in data["cells"]}
    fig, (ax_rps, ax_p99) = plt.subplots(1, 2, figsize=(13, 6.5))
    markers = "osD^v<>ph*"
    for i, w in enumerate(data["workloads"]):
        xs, rps, p99 = [], [], []
        for u in users:
            c = cells.get((w["name"], u))
            if c and c["rps"]:
                xs.append(u)
                rps.append(c["rps"])
                p99.append(c["latency_ms"].get("p99") or float("nan"))
        if xs:
            style = dict(marker=markers[i % len(markers)], label=w["title"], linewidth=1.5)
            ax_rps.plot(xs, rps, **style)
            ax_p99.plot(xs, p99, **style)
    bare = data["ceilings"]["bare_hyper"]
    bx = [u for u in users if (bare.get(str(u)) or {}).get("rps")]
    if bx:
        ax_rps.plot(bx, [bare[str(u)]["rps"] for u in bx], color="grey", linestyle=":",
                    marker=".", label="ceiling: bare hyper /healthz")
    old = data["old_stack"]["points"]
    ox = [p["users"] for p in old if p["rps"]]
    ax_rps.plot(ox, [p["rps"] for p in old if p["rps"]], color="black", linestyle="--",
                marker="x", label="old stack: req/s (published)")
    lx = [p["users"] for p in old if p["latency_ms"][1]]
    ax_p99.plot(lx, [p["latency_ms"][1] for p in old if p["latency_ms"][1]], color="black",
                linestyle="--", marker="x", label="old stack: latency, upper bound (published)")
    degraded = [p for p in old if p["latency_ms"][1] is None]
    if degraded:
        ax_p99.plot([p["users"] for p in degraded], [p["latency_ms"][0] for p in degraded],
                    color="black", linestyle="none", marker="^", markersize=9,
                    label="old stack: degraded, above 500 ms")
    ticks = sorted(set(users) | {p["users"] for p in old})
    for ax, title, ylabel in ((ax_rps, "throughput", "requests per second (log)"),
                              (ax_p99, "p99 latency", "p99 latency, ms (log)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("concurrent users (wrk connections)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="major", alpha=0.3)
    # One legend for both, under them: the lines are the same workloads.
    handles, labels = {}, []
    for ax in (ax_rps, ax_p99):
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label not in handles:
                handles[label] = h
                labels.append(label)
    fig.legend([handles[label] for label in labels], labels, loc="lower center", ncol=4,
               fontsize=8, frameon=False)
    m = data["meta"]
    title = (f"ferrocorn in a 2-CPU / 2 GB container, {m.get('workers', '?')} workers, TPC-H SF1, "
             f"{data['seconds']} s a cell")
    if data.get("smoke"):
        title += " — smoke run, not capacity figures"
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, format="svg", metadata={"Date": None})
    plt.close(fig)


def render(json_path):
    with open(json_path) as f:
        data = json.load(f)
    stem = os.path.splitext(json_path)[0]
    with open(stem + ".md", "w") as f:
        f.write(render_markdown(data))
    render_chart(data, stem + ".svg")


def wrk_line(path, memory_path=None):
    w = parse_wrk(open(path).read())
    lat = w["latency_ms"]
    line = (f"{fmt_rate(w['rps'])} req/s, p50 {fmt_ms(lat.get('p50'))}, "
            f"p90 {fmt_ms(lat.get('p90'))}, p99 {fmt_ms(lat.get('p99'))}, errors {errors(w)}")
    m = read_json(memory_path) if memory_path else None
    if m:
        line += (f", peak {fmt_mib(m.get('counter_peak_bytes') if m.get('peak_reset') else None)}"
                 f" / sampled {fmt_mib(m.get('sampled_peak_bytes'))} MiB,"
                 f" RSS {fmt_mib(m.get('sampled_anon_peak_bytes'))} MiB")
    return line


def main(argv):
    if len(argv) >= 2 and argv[1] == "wrk":
        print(wrk_line(argv[2], argv[3] if len(argv) > 3 else None))
    elif len(argv) == 4 and argv[1] == "collect":
        collect(argv[2], argv[3])
    elif len(argv) <= 2:
        default = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs",
                               "capacity.json")
        render(argv[1] if len(argv) == 2 else os.path.normpath(default))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
