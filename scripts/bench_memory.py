#!/usr/bin/env python3
"""Fire N concurrent heavy queries at a ferrocorn pool and sample the pool's memory.

Usage: scripts/bench_memory.py [--workers 4] [--clients 100] [--storage snapshot|parquet]
                               [--tpch data/tpch-sf1] [--bin PATH]

Starts ferrocorn on the TPC-H tables (snapshots kept in TPCH.cache, built on the first run; or
views over Parquet), waits until every table is served as asked, sends every client's TPC-H Q1
at once, samples the summed RSS of the master and all its workers every 100 ms, and reports the
peak, the budget (duckdb_memory_limit) and the answers by status. The result cache is off, so
that every request runs the query. Loopback only; bounded.
"""
import argparse
import collections
import json
import os
import re
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request

def rss_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def children(pid):
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            kids.append(int(entry))
    return kids


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--budget", default="2GB")
    parser.add_argument("--storage", default="snapshot", choices=["snapshot", "parquet"])
    parser.add_argument("--queries", default="q1", choices=["q1", "tpch"],
                        help="every client sends Q1, or client i sends TPC-H query i mod 22")
    parser.add_argument("--wait", action="store_true",
                        help="queue every query until it runs (no 503) instead of the default "
                             "2 s queue timeout and depth 16 per worker")
    parser.add_argument("--tpch", default=os.path.join(here, "..", "data", "tpch-sf1"))
    parser.add_argument(
        "--bin",
        default=os.path.join(
            os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/ferrocorn-target")),
            "debug",
            "ferrocorn",
        ),
    )
    args = parser.parse_args()

    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    tpch = os.path.abspath(args.tpch)
    config = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
    config.write(f"""
bind = ["127.0.0.1:0"]
workers = {args.workers}
data_dir = {json.dumps(tpch)}
cache_dir = {json.dumps(tpch + ".cache")}
storage = "{args.storage}"
result_cache = false
duckdb_memory_limit = "{args.budget}"
max_requests = 0
query_timeout_ms = 600000
{"query_queue_depth = 1000" if args.wait else ""}
{"query_queue_timeout_ms = 600000" if args.wait else ""}

[datasets.orders]
sort_key = "o_orderkey"

[datasets.lineitem]
sort_key = "l_orderkey"
""")
    config.close()
    proc = subprocess.Popen(
        [args.bin, "--config", config.name], stderr=log, stdout=subprocess.DEVNULL,
    )
    port = None
    deadline = time.time() + 120
    while time.time() < deadline:
        text = open(log.name).read()
        m = re.search(r"listening address=127\.0\.0\.1:(\d+)", text)
        if m and "all workers ready" in text:
            port = int(m.group(1))
            break
        time.sleep(0.05)
    if port is None:
        proc.kill()
        raise SystemExit("ferrocorn did not become ready:\n" + open(log.name).read())

    def served_as_asked():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/datasets", timeout=10) as r:
                datasets = json.load(r)["datasets"]
        except OSError:
            return False
        return datasets and all(
            d["storage"] == args.storage and d["pending_version"] is None for d in datasets)

    deadline = time.time() + 600
    while not served_as_asked():
        if time.time() > deadline:
            proc.kill()
            raise SystemExit("the datasets are not served as asked after 10 minutes")
        time.sleep(0.5)

    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            total = rss_kb(proc.pid) + sum(rss_kb(k) for k in children(proc.pid))
            peak[0] = max(peak[0], total)
            time.sleep(0.1)

    statuses = collections.Counter()
    latencies = []
    lock = threading.Lock()
    numbers = [1] if args.queries == "q1" else range(1, 23)
    bodies = []
    for n in numbers:
        with open(os.path.join(here, "tpch", f"q{n:02}.sql")) as f:
            bodies.append(json.dumps({"sql": f.read()}).encode())

    def client(i):
        body = bodies[i % len(bodies)]
        started = time.time()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/query", data=body,
            headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=900) as response:
                response.read()
                status = response.status
        except urllib.error.HTTPError as e:
            status = e.code
        except Exception as e:  # a reset or a refused connection is a failure to report
            status = f"error: {e}"
        with lock:
            statuses[status] += 1
            latencies.append(time.time() - started)

    sampler = threading.Thread(target=sample)
    sampler.start()
    idle = rss_kb(proc.pid) + sum(rss_kb(k) for k in children(proc.pid))
    started = time.time()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.time() - started
    stop.set()
    sampler.join()
    proc.terminate()
    proc.wait(timeout=60)

    latencies.sort()
    print(f"workers={args.workers} clients={args.clients} budget={args.budget} "
          f"storage={args.storage} queries={args.queries} wait={args.wait}")
    print(f"idle pool RSS: {idle / 1024:.0f} MiB; peak pool RSS: {peak[0] / 1024:.0f} MiB")
    print(f"answers: {dict(statuses)} in {elapsed:.1f} s; median latency "
          f"{latencies[len(latencies) // 2]:.2f} s")


if __name__ == "__main__":
    main()
