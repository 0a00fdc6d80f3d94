#!/usr/bin/env bash
# The capacity table (issue 19, item 3), in one command: the container with the old stack's
# limits (2 CPUs, 2 GB, read-only root, the image's own configuration: nothing tuned), each
# workload at 10, 30, 50 and 100 concurrent users under wrk, beside its ceiling measured in the
# same run on the same machine, written to docs/capacity.json and rendered from it into
# docs/capacity.md and docs/capacity.svg (scripts/capacity_report.py).
#
# Usage (as root: Docker, the container's cgroup and its volume):
#   scripts/capacity.sh [--quick] [SECONDS] [TPCH_DIR]      (default: 10 s a cell, data/tpch-sf1)
#
#   SECONDS=2 scripts/capacity.sh          the same as the argument (bash imports SECONDS)
#   --quick                                a smoke run: 2 s a cell, 1 s warm-ups
#   USERS="10 100"                         other user levels (default "10 30 50 100")
#   WORKLOADS="health lookup"              a subset of the workloads (default: all, below)
#   WARMUP=3                               seconds of discarded load before a workload's cells
#   CAPACITY_OUT=docs                      where capacity.{json,md,svg} go
#
# Workloads (wrk -t2 -c USERS -d SECONDS --latency --timeout 30s; scripts/wrk/query.lua draws
# each request's parameters):
#   health             GET /healthz
#   lookup             an order by a random existing key (TPC-H keeps 8 of every 32 keys)
#   dashboard_cached   the dashboard aggregate over orders, fixed: result-cache hits
#   dashboard_nocache  the same with Cache-Control: no-cache: DuckDB every time
#   q1                 TPC-H Q1 (scripts/tpch/q01.sql), Cache-Control: no-cache
#   export_json        10,000 rows of lineitem from a random order key on, JSON
#   export_arrow       the same as an Arrow IPC stream
#   bimix              scripts/wrk/bimix.lua: 50 % order lookups, 15 % an order's lines, 20 % a
#                      status aggregate, 10 % a top-10 over 30 days, 5 % a Q1-like aggregate
#
# Ceilings, after the cells: (a) bare hyper (crates/supervisor/examples/bare_hyper.rs, as many
# processes as the pool has workers) in a container with the same limits, under the same wrk at
# each user level; (b) raw DuckDB running each workload's queries in-process
# (crates/query-core/benches/raw_queries.rs: one instance per worker, the worker's threads and
# memory limit) on the container's own snapshot files, the container paused meanwhile.
#
# Memory: the container's cgroup peak, reset before each cell (v1 memory.max_usage_in_bytes; v2
# memory.peak where the kernel lets a reader reset it), and the highest of its usage sampled every
# 200 ms. wrk runs on the same machine as the container: on a small machine they share cores.
# shellcheck disable=SC2016  # $1 in the SQL is DuckDB's positional parameter, not the shell's
set -euo pipefail
# First: bash takes SECONDS from the environment (SECONDS=2 scripts/capacity.sh), then counts on.
env_seconds="$SECONDS"
SECONDS=0
cd "$(dirname "$0")/.."
invocation="scripts/capacity.sh${*:+ $*}"

seconds=10
warmup="${WARMUP:-3}"
quick=
if [ "$env_seconds" -gt 0 ]; then
  seconds="$env_seconds"
  invocation="SECONDS=$env_seconds $invocation"
fi
positional=()
for arg in "$@"; do
  case "$arg" in
    --quick) quick=1; seconds=2; warmup="${WARMUP:-1}" ;;
    -h|--help) sed -n '2,/^# shellcheck/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "unknown option $arg (see --help)" >&2; exit 64 ;;
    *) positional+=("$arg") ;;
  esac
done
if [ "${#positional[@]}" -ge 1 ]; then seconds="${positional[0]}"; fi
tpch="${positional[1]:-data/tpch-sf1}"
[[ "$seconds" =~ ^[1-9][0-9]*$ ]] || { echo "SECONDS must be a whole number of seconds: $seconds" >&2; exit 64; }
all_users="10 30 50 100"
all_workloads="health lookup dashboard_cached dashboard_nocache q1 export_json export_arrow bimix"
users="${USERS:-$all_users}"
workloads="${WORKLOADS:-$all_workloads}"
for w in $workloads; do
  [[ " $all_workloads " == *" $w "* ]] || { echo "unknown workload $w (of: $all_workloads)" >&2; exit 64; }
done
for variable in USERS WORKLOADS WARMUP CAPACITY_OUT; do
  if [ -n "${!variable:-}" ]; then invocation="$variable=\"${!variable}\" $invocation"; fi
done
out="${CAPACITY_OUT:-docs}"
# The old stack's limits.
cpus=2
memory=2g

log() { printf '[%4ds] %s\n' "$SECONDS" "$*" >&2; }
die() { log "error: $*"; exit 1; }
[ "$(id -u)" -eq 0 ] || die "run as root (Docker, the container's cgroup and its volume's files)"

# --- Preparation ---------------------------------------------------------------------------------
target="${CARGO_TARGET_DIR:-$HOME/.cache/ferrocorn-target}"
bin="$target/debug/ferrocorn"
bare="$target/debug/examples/bare_hyper"
# newest [-x] FILE...: the most recently modified of the files (with -x: of the executable ones;
# cargo's dep-info files aside).
newest() {
  local f found='' executable=''
  if [ "${1:-}" = -x ]; then executable=1; shift; fi
  for f in "$@"; do
    [[ "$f" != *.d && -f "$f" ]] || continue
    [ -z "$executable" ] || [ -x "$f" ] || continue
    if [ -z "$found" ] || [ "$f" -nt "$found" ]; then found="$f"; fi
  done
  echo "$found"
}
raw="$(newest -x "$target"/debug/deps/raw_queries-*)"
if [ ! -x "$bin" ] || [ ! -x "$bare" ] || [ ! -x "$raw" ]; then
  log "building ferrocorn, bare_hyper and the raw_queries bench (cargo build --workspace --all-targets)"
  CARGO_TARGET_DIR="$target" cargo build --workspace --all-targets >&2
  raw="$(newest -x "$target"/debug/deps/raw_queries-*)"
fi
if [ ! -f "$tpch/orders.parquet" ] || [ ! -f "$tpch/lineitem.parquet" ]; then
  [ "$tpch" = data/tpch-sf1 ] || die "no TPC-H data in $tpch"
  log "generating TPC-H SF1 (scripts/gen_tpch.sh 1)"
  scripts/gen_tpch.sh 1 >&2
fi
tpch="$(realpath "$tpch")"
command -v wrk >/dev/null ||
  apt-get install -y wrk >/dev/null 2>&1 ||
  { apt-get update >/dev/null && apt-get install -y wrk >/dev/null; }
if ! python3 -c 'import matplotlib' 2>/dev/null; then
  log "installing matplotlib"
  python3 -m pip install --quiet matplotlib 2>/dev/null ||
    python3 -m pip install --quiet --user --break-system-packages matplotlib
fi
DOCKER="$(scripts/docker_setup.sh | tail -n1)"

work="$(mktemp -d)"
mkdir -p "$work/cells" "$work/bare" "$work/raw"
run_id="ferrocorn-capacity-$$"
name="$run_id"
bare_name="$run_id-bare"
volume="$run_id"
image=ferrocorn:capacity
sampler=
cleanup() {
  [ -z "$sampler" ] || kill "$sampler" 2>/dev/null || true
  "$DOCKER" unpause "$name" >/dev/null 2>&1 || true
  "$DOCKER" rm -f "$name" "$bare_name" >/dev/null 2>&1 || true
  "$DOCKER" volume rm "$volume" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
port="$(free_port)"
bare_port="$(free_port)"
base="http://127.0.0.1:$port"
bare_base="http://127.0.0.1:$bare_port"

# meta KEY VALUE, command_line KEY ARGV...: what the report says about the run (a command's words
# separated by the ASCII unit separator; the report quotes them for a shell).
meta() { printf '%s\t%s\n' "$1" "$2" >>"$work/meta.tsv"; }
command_line() {
  { printf '%s' "$1"; shift; printf '\x1f%s' "$@"; printf '\n'; } >>"$work/commands.tsv"
}

# --- The container -------------------------------------------------------------------------------
log "image $image from $bin"
install -D -m 0755 "$bin" target/docker/ferrocorn
"$DOCKER" build -q -f deploy/Dockerfile --target prebuilt -t "$image" . >/dev/null
command_line image install -D -m 0755 "$bin" target/docker/ferrocorn
command_line image "$DOCKER" build -q -f deploy/Dockerfile --target prebuilt -t "$image" .
"$DOCKER" volume create "$volume" >/dev/null
run=("$DOCKER" run -d --name "$name" --network host --cpus "$cpus" --memory "$memory" --read-only
  --tmpfs /tmp -v "$tpch:/data:ro" -v "$volume:/var/cache/ferrocorn"
  -e "FERROCORN_BIND=127.0.0.1:$port" "$image")
"${run[@]}" >/dev/null
command_line container "${run[@]}"
started_at="$(date +%s)"
log "container $name on $base: waiting for healthy"
until [ "$("$DOCKER" inspect -f '{{.State.Health.Status}}' "$name")" = healthy ]; do
  [ "$("$DOCKER" inspect -f '{{.State.Running}}' "$name")" = true ] ||
    { "$DOCKER" logs "$name" 2>&1 | tail -n 20 >&2; die "the container exited"; }
  [ $(($(date +%s) - started_at)) -lt 300 ] || die "not healthy after 300 s"
  sleep 1
done
meta healthy_after_s "$(($(date +%s) - started_at))"
log "healthy; waiting for every dataset to serve from its snapshot"
until curl -fsS "$base/v1/datasets" 2>/dev/null | python3 -c '
import json, sys
d = json.load(sys.stdin)["datasets"]
sys.exit(0 if d and all(x["storage"] == "snapshot" and x["pending_version"] is None for x in d) else 1)'; do
  [ $(($(date +%s) - started_at)) -lt 900 ] || die "snapshots not ready after 900 s"
  sleep 1
done
meta snapshots_after_s "$(($(date +%s) - started_at))"
log "every dataset on its snapshot after $(($(date +%s) - started_at)) s"
curl -fsS "$base/v1/datasets" >"$work/datasets.json"
"$DOCKER" exec "$name" ferrocorn --config /etc/ferrocorn/ferrocorn.toml --print-config >"$work/config.txt"
command_line config "$DOCKER" exec "$name" ferrocorn --config /etc/ferrocorn/ferrocorn.toml --print-config
"$DOCKER" exec "$name" ferrocorn --version >"$work/version.txt" 2>&1 || true

# The pool as the image sized it, for the ceilings: workers, DuckDB threads and memory each.
read -r workers threads_each memory_each orders < <(python3 - "$work/config.txt" "$work/datasets.json" "$cpus" <<'PY'
import json, re, sys
config = dict(re.findall(r'^(\w+) = (.*?)  #', open(sys.argv[1]).read(), re.M))
datasets = {d["name"]: d for d in json.load(open(sys.argv[2]))["datasets"]}
workers = int(config["workers"])
threads = int(config["duckdb_threads"]) or max(1, int(sys.argv[3]) // workers)
m = re.fullmatch(r'"(\d+)\s*(\w+)"', config["duckdb_memory_limit"])
unit = {"B": 1, "KB": 1000, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
each = int(m.group(1)) * unit[m.group(2).upper()] // workers // 2**20
print(workers, threads, f"{each}MiB", datasets["orders"]["row_estimate"])
PY
)
meta workers "$workers"
meta duckdb_threads_each "$threads_each"
meta duckdb_memory_each "$memory_each"

# The container's memory cgroup, v1 or v2, from its first process.
pid="$("$DOCKER" inspect -f '{{.State.Pid}}' "$name")"
id="$("$DOCKER" inspect -f '{{.Id}}' "$name")"
cgroup=
if line="$(grep -E '^[0-9]+:([^:]*,)?memory(,[^:]*)?:' "/proc/$pid/cgroup")"; then
  cgroup="/sys/fs/cgroup/memory${line##*:}"
  [ -f "$cgroup/memory.usage_in_bytes" ] || cgroup="/sys/fs/cgroup/memory/docker/$id"
  [ -f "$cgroup/memory.usage_in_bytes" ] || cgroup=
elif line="$(grep -E '^0::' "/proc/$pid/cgroup")"; then
  cgroup="/sys/fs/cgroup${line#0::}"
  [ -f "$cgroup/memory.current" ] || cgroup="/sys/fs/cgroup/system.slice/docker-$id.scope"
  [ -f "$cgroup/memory.current" ] || cgroup=
fi
[ -n "$cgroup" ] || log "warning: no memory cgroup found for the container: no memory figures"
meta cgroup "$cgroup"

# memory.py CGROUP OUT READY: reset the cgroup's peak (if the kernel lets us), sample its usage,
# its anonymous memory (RSS: what reclaim cannot free without swap) and its working set
# (usage less inactive files, docker stats' figure) every 200 ms until TERM, then write the
# peaks as JSON to OUT. READY appears once the peak is reset.
cat >"$work/memory.py" <<'PY'
import json, os, signal, sys, time
cgroup, out, ready = sys.argv[1:4]
stop = False
def on_term(*_):
    global stop
    stop = True
signal.signal(signal.SIGTERM, on_term)
v1 = os.path.exists(os.path.join(cgroup, "memory.usage_in_bytes"))
usage_file = os.path.join(cgroup, "memory.usage_in_bytes" if v1 else "memory.current")
peak_file = os.path.join(cgroup, "memory.max_usage_in_bytes" if v1 else "memory.peak")
stat_file = os.path.join(cgroup, "memory.stat")
anon_key, inactive_key = ("total_rss", "total_inactive_file") if v1 else ("anon", "inactive_file")
reset, peak_fd = False, None
try:
    if v1:
        with open(peak_file, "w") as f:
            f.write("0\n")
    else:
        # cgroup v2 (Linux 6.12+): a write resets the peak for reads through the same descriptor.
        peak_fd = os.open(peak_file, os.O_RDWR)
        os.write(peak_fd, b"reset\n")
    reset = True
except OSError:
    pass
def read(path):
    with open(path) as f:
        return int(f.read().split()[0])
def stat():
    with open(stat_file) as f:
        return {k: int(v) for k, v in (line.split() for line in f if len(line.split()) == 2)}
open(ready, "w").close()
usage_peak = anon_peak = working_peak = samples = 0
while True:
    try:
        usage = read(usage_file)
        s = stat()
        usage_peak = max(usage_peak, usage)
        anon_peak = max(anon_peak, s.get(anon_key, 0))
        working_peak = max(working_peak, usage - s.get(inactive_key, 0))
        samples += 1
    except (OSError, ValueError):
        pass
    if stop:
        break
    time.sleep(0.2)
try:
    if peak_fd is not None:
        os.lseek(peak_fd, 0, os.SEEK_SET)
        counter = int(os.read(peak_fd, 64).split()[0])
    else:
        counter = read(peak_file)
except (OSError, ValueError):
    counter = None
json.dump({"cgroup": "v1" if v1 else "v2", "peak_reset": reset, "counter_peak_bytes": counter,
           "sampled_peak_bytes": usage_peak, "sampled_anon_peak_bytes": anon_peak,
           "sampled_working_set_peak_bytes": working_peak, "samples": samples,
           "interval_s": 0.2}, open(out, "w"))
PY

memory_start() {
  sampler=
  [ -n "$cgroup" ] || return 0
  rm -f "$work/memory.ready"
  python3 "$work/memory.py" "$cgroup" "$1" "$work/memory.ready" &
  sampler=$!
  until [ -f "$work/memory.ready" ]; do
    kill -0 "$sampler" 2>/dev/null || { sampler=; return 0; }
    sleep 0.05
  done
}
memory_stop() {
  [ -n "$sampler" ] || return 0
  kill -TERM "$sampler" 2>/dev/null || true
  wait "$sampler" 2>/dev/null || true
  sampler=
}

# Until no request is in flight in the pool (the scrape itself aside): queued queries of the
# previous cell finished, so that each cell starts from an idle pool.
wait_idle() {
  local deadline=$((SECONDS + 120)) busy
  while [ "$SECONDS" -lt "$deadline" ]; do
    busy="$(curl -fsS "$base/metrics" 2>/dev/null |
      awk '/^ferrocorn_worker_in_flight_requests/ {n += $NF} END {print n - 1}')"
    [ "${busy:-1}" -le 0 ] && return 0
    sleep 0.5
  done
  log "warning: still $busy requests in flight after 120 s"
}

# --- Workloads -----------------------------------------------------------------------------------
lookup_sql='SELECT * FROM orders WHERE o_orderkey = $1'
lookup_gen="orderkey:$orders"
dashboard_sql='SELECT o_orderstatus, count(*) AS n, sum(o_totalprice) AS total FROM orders GROUP BY 1 ORDER BY 1'
q1_sql="$(grep -v '^--' scripts/tpch/q01.sql | tr -s ' \n' ' ' | sed 's/^ //; s/ $//')"
# A slice of 10,000 rows from a random order key on (lineitem is stored in order-key order, so
# DuckDB's zone maps skip to it: an export, not a scan); the largest key leaves room for them.
# shellcheck disable=SC2017  # floor(orders / 8) * 32: the key of the last order
max_key=$((orders / 8 * 32 + orders % 8))
export_sql='SELECT * FROM lineitem WHERE l_orderkey >= $1 LIMIT 10000'
export_gen="int:1:$((max_key - (max_key / 50 < 100000 ? max_key / 50 : 100000)))"

# workload NAME: sets title, ceiling (bare_hyper or raw_duckdb), raw_key and args (wrk's, after
# its common options).
workload() {
  local q=(-s scripts/wrk/query.lua "$base" --)
  case "$1" in
    health) title="GET /healthz"; ceiling=bare_hyper; raw_key=
      args=("$base/healthz") ;;
    lookup) title="point lookup, existing key"; ceiling=raw_duckdb; raw_key=lookup
      args=("${q[@]}" "$lookup_sql" "$lookup_gen") ;;
    dashboard_cached) title="dashboard aggregate, cached"; ceiling=raw_duckdb; raw_key=dashboard
      args=("${q[@]}" "$dashboard_sql") ;;
    dashboard_nocache) title="dashboard aggregate, no-cache"; ceiling=raw_duckdb; raw_key=dashboard
      args=("${q[@]}" "$dashboard_sql" - no-cache) ;;
    q1) title="TPC-H Q1, no-cache"; ceiling=raw_duckdb; raw_key=q1
      args=("${q[@]}" "$q1_sql" - no-cache) ;;
    export_json) title="10,000-row export, JSON"; ceiling=raw_duckdb; raw_key="export"
      args=("${q[@]}" "$export_sql" "$export_gen" format=json) ;;
    export_arrow) title="10,000-row export, Arrow"; ceiling=raw_duckdb; raw_key="export"
      args=("${q[@]}" "$export_sql" "$export_gen" format=arrow) ;;
    bimix) title="BI mix (bimix.lua)"; ceiling=raw_duckdb; raw_key=bimix
      args=(-s scripts/wrk/bimix.lua "$base") ;;
  esac
}

# raw_args KEY: sets args to the raw_queries options of a workload's queries.
raw_args() {
  case "$1" in
    lookup) args=(--query "$lookup_sql" --params "$lookup_gen") ;;
    dashboard) args=(--query "$dashboard_sql") ;;
    q1) args=(--query "$q1_sql") ;;
    export) args=(--query "$export_sql" --params "$export_gen") ;;
    bimix)
      # scripts/wrk/bimix.lua's statements, parameters and shares, as it draws them.
      args=(
        --query 'SELECT * FROM orders WHERE o_orderkey = $1' --params int:1:6000000 --weight 50
        --query 'SELECT l_linenumber, l_quantity, l_extendedprice, l_shipdate FROM lineitem WHERE l_orderkey = $1' --params int:1:6000000 --weight 15
        --query "SELECT o_orderstatus, count(*) AS n, sum(o_totalprice) AS total FROM orders WHERE o_orderdate >= DATE '1995-01-01' + \$1::INTEGER GROUP BY 1 ORDER BY 1" --params int:0:364 --weight 20
        --query "SELECT o_custkey, sum(o_totalprice) AS total FROM orders WHERE o_orderdate BETWEEN DATE '1993-01-01' + \$1::INTEGER AND DATE '1993-01-01' + \$1::INTEGER + 30 GROUP BY 1 ORDER BY total DESC LIMIT 10" --params int:0:1500 --weight 10
        --query "SELECT l_returnflag, l_linestatus, sum(l_quantity) AS sum_qty, sum(l_extendedprice * (1 - l_discount)) AS revenue, avg(l_discount) AS avg_disc, count(*) AS n FROM lineitem WHERE l_shipdate <= DATE '1998-12-01' - \$1::INTEGER GROUP BY 1, 2 ORDER BY 1, 2" --params int:60:120 --weight 5
      ) ;;
  esac
}

# wrk_run OUT USERS SECONDS ARGS...: one wrk run, its report in OUT.
wrk_run() {
  local file="$1" c="$2" s="$3"
  shift 3
  local t=$((c < 2 ? c : 2))
  wrk -t"$t" -c"$c" -d"${s}s" --latency --timeout 30s "$@" >"$file" 2>&1 || true
}

meta seconds "$seconds"
meta warmup "$warmup"
meta users "$users"
meta workloads "$workloads"
meta quick "${quick:-0}"
meta smoke "$([ "$seconds" -ge 10 ] && [ "$users" = "$all_users" ] && [ "$workloads" = "$all_workloads" ] && echo 0 || echo 1)"
meta invocation "$invocation"
meta tpch "$tpch"
meta cpus "$cpus"
meta memory "$memory"
meta image "$image"
meta orders "$orders"
meta started "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
meta load_before "$(cut -d' ' -f1-3 /proc/loadavg)"
meta git "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)')"
meta docker "$("$DOCKER" version -f '{{.Server.Version}}' 2>/dev/null || echo unknown)"
meta wrk "$(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2)"
meta ferrocorn "$(head -1 "$work/version.txt")"

for w in $workloads; do
  workload "$w"
  printf '%s\t%s\t%s\t%s\n' "$w" "$title" "$ceiling" "$raw_key" >>"$work/workloads.tsv"
  command_line "wrk:$w" wrk -t2 -c USERS -d"${seconds}s" --latency --timeout 30s "${args[@]}"
  log "$w: warm-up, ${warmup} s at -c10"
  wait_idle
  wrk_run "$work/cells/$w.warmup.wrk" 10 "$warmup" "${args[@]}"
  if grep -q 'Non-2xx' "$work/cells/$w.warmup.wrk"; then
    log "warning: $w answered non-2xx during its warm-up: $(grep Non-2xx "$work/cells/$w.warmup.wrk")"
  fi
  for c in $users; do
    wait_idle
    curl -fsS "$base/metrics" >"$work/cells/$w.$c.metrics.before" 2>/dev/null || true
    memory_start "$work/cells/$w.$c.memory.json"
    wrk_run "$work/cells/$w.$c.wrk" "$c" "$seconds" "${args[@]}"
    memory_stop
    curl -fsS "$base/metrics" >"$work/cells/$w.$c.metrics.after" 2>/dev/null || true
    log "$w -c$c: $(python3 scripts/capacity_report.py wrk "$work/cells/$w.$c.wrk" "$work/cells/$w.$c.memory.json")"
  done
done
wait_idle
meta finished_cells "$(date -u +%Y-%m-%dT%H:%M:%SZ)"

# --- Ceilings ------------------------------------------------------------------------------------
"$DOCKER" pause "$name" >/dev/null
if [[ " $workloads " == *" health "* ]] || [[ " $workloads " == *" dashboard_cached "* ]]; then
  bare_run=("$DOCKER" run -d --name "$bare_name" --network host --cpus "$cpus" --memory "$memory"
    --read-only --no-healthcheck -v "$bare:/usr/local/bin/bare_hyper:ro"
    --entrypoint /usr/local/bin/bare_hyper "$image" "$workers" "$bare_port")
  "${bare_run[@]}" >/dev/null
  command_line bare_hyper "${bare_run[@]}"
  command_line wrk:bare_hyper wrk -t2 -c USERS -d"${seconds}s" --latency --timeout 30s "$bare_base/healthz"
  for _ in $(seq 1 100); do curl -fsS -o /dev/null "$bare_base/healthz" 2>/dev/null && break; sleep 0.1; done
  for c in $users; do
    wrk_run "$work/bare/$c.wrk" "$c" "$seconds" "$bare_base/healthz"
    log "bare hyper -c$c: $(python3 scripts/capacity_report.py wrk "$work/bare/$c.wrk")"
  done
  "$DOCKER" rm -f "$bare_name" >/dev/null
fi

snapshots="$("$DOCKER" volume inspect -f '{{.Mountpoint}}' "$volume")/snapshots"
files=()
for dataset in $(python3 -c 'import json, sys; print(" ".join(d["name"] for d in json.load(open(sys.argv[1]))["datasets"]))' "$work/datasets.json"); do
  file="$(newest "$snapshots/$dataset".*.duckdb)"
  [ -n "$file" ] && files+=("$file")
done
for key in $(for w in $workloads; do workload "$w"; echo "$raw_key"; done | awk 'NF && !seen[$0]++'); do
  raw_args "$key"
  cmd=("$raw" --seconds "$seconds" --instances "$workers" --threads "$threads_each"
    --memory-limit "$memory_each" --json "${args[@]}" "${files[@]}")
  command_line "raw:$key" "${cmd[@]}"
  "${cmd[@]}" >"$work/raw/$key.json" 2>"$work/raw/$key.err" || { cat "$work/raw/$key.err" >&2; die "raw_queries failed for $key"; }
  log "raw DuckDB $key: $(cat "$work/raw/$key.json")"
done
"$DOCKER" unpause "$name" >/dev/null

# --- The report ----------------------------------------------------------------------------------
meta load_after "$(cut -d' ' -f1-3 /proc/loadavg)"
meta finished "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
meta elapsed_s "$SECONDS"
mkdir -p "$out"
python3 scripts/capacity_report.py collect "$work" "$out/capacity.json"
python3 scripts/capacity_report.py "$out/capacity.json"
log "done in $SECONDS s: $out/capacity.json, $out/capacity.md, $out/capacity.svg"
