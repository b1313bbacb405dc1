# bench/lib.sh: what bench/run.sh and bench/thin.sh share, sourced after they set work (their
# directory, removed on exit) and bin (the vhdsync binary). Everything started through these
# helpers is listed in the arrays below and undone by the EXIT trap: frozen Azurite process
# groups (resumed first, so that they can stop), ext4 mounts, loop devices, vhdsync daemons,
# other processes, FUSE mounts. The caller defines log.
pids=() loops=() fsmounts=() fusemounts=() vpids=() frozen=()
cleanup() {
  set +e
  for g in "${frozen[@]}"; do kill -CONT -- "-$g" 2>/dev/null; done
  for m in "${fsmounts[@]}"; do mountpoint -q "$m" && umount "$m"; done
  for l in "${loops[@]}"; do losetup -d "$l" 2>/dev/null; done
  for p in "${vpids[@]}"; do kill -9 "$p" 2>/dev/null; done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  sleep 0.5
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
  for m in "${fusemounts[@]}"; do grep -q " $m " /proc/mounts && umount -l "$m"; done
  rm -rf "$work"
}
trap cleanup EXIT

# unlist ARRAY VALUE: drop VALUE from the cleanup array ARRAY once it is
# undone here (a stopped process's pid can be reused)
unlist() {
  local -n arr=$1; local x=$2 keep=() e
  for e in "${arr[@]}"; do [ "$e" = "$x" ] || keep+=("$e"); done
  arr=("${keep[@]}")
}
# start_azurite DIR: the emulator ($work/azurite-run) on a free port, its data
# in DIR/az; sets AZPID and EP (its endpoint)
start_azurite() {
  local d=$1; mkdir -p "$d"
  "$work/azurite-run" --port 0 --location "$d/az" --endpoint-file "$d/ep" --log "$d/az.log" >/dev/null 2>&1 &
  AZPID=$!; pids+=("$AZPID")
  for _ in $(seq 1 600); do [ -s "$d/ep" ] && break; kill -0 "$AZPID" || { echo "azurite died"; exit 1; }; sleep 0.1; done
  EP=$(cat "$d/ep")
}
stop_azurite() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }
# start_throttle DIR TARGET [azurite-throttle flags]: the Azure-limits proxy
# ($work/azurite-throttle) in front of the Azurite at TARGET, logging every
# request to DIR/wire.jsonl and writing its counters to DIR/proxy-stats.json
# when stopped; sets TPID and TEP (its endpoint, which clients use instead of
# TARGET)
start_throttle() {
  local d=$1 target=$2; shift 2
  mkdir -p "$d"; rm -f "$d/proxy.out"; mkfifo "$d/proxy.out"
  "$work/azurite-throttle" --target "$target" --endpoint-file "$d/proxy.url" --wire-log "$d/wire.jsonl" \
    --stats-file "$d/proxy-stats.json" "$@" > "$d/proxy.out" 2> "$d/proxy.log" &
  TPID=$!; pids+=("$TPID")
  # its one line of output is the endpoint, printed once it listens
  TEP=
  read -r -t 60 TEP < "$d/proxy.out" || true
  rm -f "$d/proxy.out"
  [ -n "$TEP" ] || { log "azurite-throttle did not start"; cat "$d/proxy.log" >&2; exit 1; }
}
# stop_throttle PID: SIGTERM makes the proxy write its stats file (and
# stops any other process of pids cleanly)
stop_throttle() { kill -TERM "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; unlist pids "$1"; }
# vstatus STATE: the daemon's status as JSON. Exit 15 (not healthy: the flusher is retrying) is
# what the stages that detach the remote expect; it still prints the report.
# Any other failure shows status's own message.
vstatus() {
  local rc=0 err
  err=$(mktemp)
  "$bin" status --state "$1" --json 2>"$err" || rc=$?
  if [ "$rc" != 0 ] && [ "$rc" != 15 ]; then cat "$err" >&2; rm -f "$err"; return 1; fi
  rm -f "$err"
}
vpid() { vstatus "$1" | python3 -c 'import json,sys;print(json.load(sys.stdin)["pid"])'; }
