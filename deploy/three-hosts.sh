#!/usr/bin/env bash
# Brings up a three-host bus on one machine, in network namespaces joined by
# veth pairs (addresses from the documentation range 198.51.100.0/24), runs
# a call from host A to a service on host C across it, cuts the A-C link and
# calls again (over B), and tears everything down. Needs root and iproute2.
#
#   deploy/three-hosts.sh [path/to/junction]
set -euo pipefail
JUNCTION=$(realpath "${1:-target/release/junction}")
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d /tmp/junction-three-hosts.XXXXXX)
chmod 700 "$work"
tag=jx$$
pids=()

cleanup() {
  set +e
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null; done
  sleep 0.5
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null; done
  for h in a b c; do ip netns del "$tag-$h" 2>/dev/null; done
  rm -rf "$work"
}
trap cleanup EXIT

# Three hosts, and a link between each pair: A-B .1/.2, B-C .5/.6, C-A .9/.10.
for h in a b c; do
  ip netns add "$tag-$h"
  ip -n "$tag-$h" link set lo up
done
link() { # host1 addr1 host2 addr2
  local v1="v$tag$1$3" v2="v$tag$3$1"
  ip link add "$v1" netns "$tag-$1" type veth peer name "$v2" netns "$tag-$3"
  ip -n "$tag-$1" addr add "$2/30" dev "$v1"
  ip -n "$tag-$3" addr add "$4/30" dev "$v2"
  ip -n "$tag-$1" link set "$v1" up
  ip -n "$tag-$3" link set "$v2" up
}
link a 198.51.100.1 b 198.51.100.2
link b 198.51.100.5 c 198.51.100.6
link c 198.51.100.10 a 198.51.100.9

JUNCTION=$JUNCTION "$here/make-pki.sh" "$work/pki" >/dev/null 2>&1

start() { # host id peer
  local dir="$work/$1"
  mkdir -m 700 "$dir"
  ip netns exec "$tag-$1" "$JUNCTION" serve \
    --socket "$dir/junction.sock" --junction-id "$2" \
    --authority "$work/pki/authority.cert" \
    --junction-key "$work/pki/junction-$2.key" --junction-cert "$work/pki/junction-$2.cert" \
    --quic-listen 0.0.0.0:4433 --peer "$3" >"$dir/log" 2>&1 &
  pids+=($!)
}
start a 1 2@198.51.100.2:4433
start b 2 3@198.51.100.6:4433
start c 3 1@198.51.100.9:4433

sock() { echo "$work/$1/junction.sock"; }
for h in a b c; do
  for _ in $(seq 100); do [ -S "$(sock $h)" ] && break; sleep 0.1; done
done

# The service, on host C.
ip netns exec "$tag-c" env JUNCTION_SOCKET="$(sock c)" "$JUNCTION" echo \
  --name org.example.echo --key "$work/pki/echo.key" --cert "$work/pki/echo.cert" \
  >"$work/echo.log" 2>&1 &
pids+=($!)

call() {
  for _ in $(seq 100); do
    if out=$(ip netns exec "$tag-a" "$JUNCTION" call --socket "$(sock a)" \
      org.example.echo "$1" --timeout 2 2>&1); then
      echo "$out"
      return 0
    fi
    sleep 0.2
  done
  echo "the call never went through: $out" >&2
  for h in a b c; do echo "--- junction on host $h:" >&2; tail -20 "$work/$h/log" >&2; done
  return 1
}

echo "A calls the echo service on C:"
call "hello from A"
echo "the A-C link goes down; A calls again, through B:"
ip -n "$tag-a" link set "v${tag}ac" down
call "hello again, around the cut"
ip -n "$tag-a" link set "v${tag}ac" up
echo "three hosts, one bus: done"
