#!/usr/bin/env bash
# Makes Docker usable for the container tests on a fresh Debian bookworm machine (run as root,
# from .ci/run): Debian's docker.io, docker-compose (1.29) and debootstrap; a daemon; and the
# runtime stage's base image, debian:bookworm-slim, without any container registry.
#
# Idempotent: each step is skipped when its result is already there. Its last line on stdout is
# the docker client the tests must use (Debian's /usr/bin/docker, see below), e.g.
#   DOCKER=$(scripts/docker_setup.sh | tail -n1)
# Progress goes to stderr.
#
# The daemon runs with --bridge=none --iptables=false: no default bridge (docker0) and no
# iptables rules, so `docker run` tests use --network host and bind 127.0.0.1. User-defined
# bridge networks still work (Compose creates one per project); their published ports go
# through docker-proxy, so publish them on 127.0.0.1 only.
set -euo pipefail

log() { printf 'docker_setup: %s\n' "$*" >&2; }
# Seconds since $1 (an earlier $EPOCHREALTIME), to a tenth.
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (apt-get, dockerd, debootstrap)"

# Debian's client, not whatever comes first in PATH. /usr/local/bin/docker may be a newer
# client (Docker 28) that shadows it; against Debian's 20.10 daemon that one negotiates the API
# down to 1.41 and works for build/run/inspect, but it has no buildx plugin here, so its
# `docker build` is the legacy builder behind a deprecation notice, and its behaviour against a
# 5-years-older daemon is not something the tests should depend on. The 20.10 client matches the
# daemon and uses the classic builder by default (DOCKER_BUILDKIT unset).
DOCKER=/usr/bin/docker
DOCKERD=/usr/sbin/dockerd
DOCKERD_LOG="${DOCKERD_LOG:-/var/log/ferrocorn-dockerd.log}"
BASE_IMAGE=debian:bookworm-slim

# 1. Packages ---------------------------------------------------------------------------------
missing=()
for pkg in docker.io docker-compose debootstrap; do
  dpkg-query -W -f='${Status}\n' "$pkg" 2>/dev/null | grep -q '^install ok installed$' \
    || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Keep the packages' maintainer scripts from starting dockerd/containerd with their defaults
  # (a bridge and iptables rules); this script starts the daemon itself, below.
  created_policy=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 0755 /usr/sbin/policy-rc.d
    created_policy=1
  fi
  install_ok=1
  apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null \
    || { apt-get update >/dev/null \
         && apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null; } \
    || install_ok=
  [ -z "$created_policy" ] || rm -f /usr/sbin/policy-rc.d
  [ -n "$install_ok" ] || die "apt-get install ${missing[*]} failed"
fi
[ -x "$DOCKER" ] && [ -x "$DOCKERD" ] || die "$DOCKER or $DOCKERD missing after install"
export PATH="$PATH:/usr/sbin:/sbin"   # debootstrap, and dockerd's helpers

# 2. Daemon -----------------------------------------------------------------------------------
if ! "$DOCKER" info >/dev/null 2>&1; then
  log "starting dockerd (log: $DOCKERD_LOG)"
  # setsid + nohup: the daemon outlives this script and the CI step that ran it. dockerd starts
  # its own containerd when none is running.
  setsid nohup "$DOCKERD" --bridge=none --iptables=false --ip-masq=false \
    >>"$DOCKERD_LOG" 2>&1 </dev/null &
  dockerd_pid=$!
  t0=$EPOCHREALTIME
  deadline=$((SECONDS + 60))
  until "$DOCKER" info >/dev/null 2>&1; do
    if ! kill -0 "$dockerd_pid" 2>/dev/null; then
      tail -n 20 "$DOCKERD_LOG" >&2 || true
      die "dockerd exited during start-up (see $DOCKERD_LOG)"
    fi
    [ "$SECONDS" -lt "$deadline" ] || {
      tail -n 20 "$DOCKERD_LOG" >&2 || true
      die "dockerd did not answer within 60 s (see $DOCKERD_LOG)"
    }
    # Polling interval, not a wait for readiness: the loop ends as soon as `docker info` answers.
    sleep 0.2
  done
  log "dockerd ready after $(since "$t0") s"
fi

# 3. Base image -------------------------------------------------------------------------------
# TEST SCAFFOLD: no container registry is reachable from CI, so the runtime stage's base image,
# debian:bookworm-slim, is built here from Debian's packages (debootstrap minbase: the same
# essential + apt package set as Docker Hub's slim image, without its docs/locale trimming) and
# imported under that tag. Done only when the tag is absent, so a machine that can pull the real
# image (or already has it) keeps it.
debian_mirror() {
  # The mirror this machine's apt uses for bookworm main: deb822 .sources first, then one-line.
  local f uri
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    uri=$(awk '
      BEGIN { RS = ""; FS = "\n" }
      {
        uris = ""; suites = ""; types = ""
        for (i = 1; i <= NF; i++) {
          if ($i ~ /^URIs:/)   { uris = $i;   sub(/^URIs:[ \t]*/, "", uris) }
          if ($i ~ /^Suites:/) { suites = $i; sub(/^Suites:[ \t]*/, "", suites) }
          if ($i ~ /^Types:/)  { types = $i }
        }
        if (types ~ /(^|[ \t])deb([ \t]|$)/ && (" " suites " ") ~ / bookworm /) {
          split(uris, u, /[ \t]+/); print u[1]; exit
        }
      }' "$f")
    [ -z "$uri" ] || { echo "$uri"; return; }
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    uri=$(awk '$1 == "deb" {
        for (i = 2; i <= NF; i++) if ($i !~ /^\[/ && $i !~ /\]$/) break
        if ($(i + 1) == "bookworm") { print $i; exit }
      }' "$f")
    [ -z "$uri" ] || { echo "$uri"; return; }
  done
  echo http://deb.debian.org/debian
}

if ! "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  mirror=$(debian_mirror)
  rootfs=$(mktemp -d /var/tmp/ferrocorn-rootfs.XXXXXX)
  cleanup_rootfs() {
    # debootstrap mounts proc and sys in the target; a killed run can leave them mounted.
    awk -v r="$rootfs/" 'index($2, r) == 1 { print $2 }' /proc/mounts | sort -r \
      | while read -r m; do umount -l "$m" || true; done
    rm -rf --one-file-system "$rootfs"
  }
  trap cleanup_rootfs EXIT
  log "building $BASE_IMAGE with debootstrap from $mirror (test scaffold)"
  t0=$EPOCHREALTIME
  # Bounded: a stalled mirror fails the step instead of hanging CI.
  if ! timeout 900 debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >/dev/null; then
    tail -n 20 "$rootfs/debootstrap/debootstrap.log" >&2 || true
    die "debootstrap failed"
  fi
  t1=$EPOCHREALTIME
  # What Docker Hub's image leaves out as well: package caches and lists.
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/var/log/*.log "$rootfs"/debootstrap
  tar --numeric-owner -C "$rootfs" -c . \
    | "$DOCKER" import --change 'CMD ["bash"]' - "$BASE_IMAGE" >/dev/null
  log "debootstrap $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }') s," \
    "import $(since "$t1") s"
  cleanup_rootfs
  trap - EXIT
fi

# 4. Leftovers ----------------------------------------------------------------------------------
# Each test run tags its image anew around the binary it tests; the image it replaced is left
# dangling (about 100 MB). Dangling images are used by nothing: remove them.
"$DOCKER" image prune -f >/dev/null || true

echo "$DOCKER"
