#!/bin/bash
# bench/ab/mixed.sh BIN...: for each vhdsync binary in turn, a fresh 64 GiB disk mounted with the
# remote detached (Azurite killed after the mount, as bench/run.sh stage 1), then one fio job file
# on its .img: sequential 1 MiB QD8, random 4 KiB QD32, 4 KiB write+fsync, sequential, random
# again, 5 s each, all on the same 2 GiB, so each phase meets what the earlier ones left pending.
# Prints "BIN seq1=.. rand1=.. fsync1=.. seq2=.. rand2=.." (IOPS). A wrapper script that adds
# mount flags (e.g. --no-fills) can stand for a binary. AB_REMOTE=live keeps Azurite running, so
# the flusher drains while fio writes. Root.
set -euo pipefail
cd "$(dirname "$0")/../.."
work=$(mktemp -d /var/tmp/ab-mixed.XXXXXX)
go build -o "$work/azurite-run" ./internal/azurite/cmd/azurite-run
cat > "$work/job.fio" <<'FIO'
[global]
filename=${F}
size=2G
direct=1
runtime=5
time_based=1
ioengine=libaio
[seq1]
rw=write
bs=1M
iodepth=8
[rand1]
stonewall
rw=randwrite
bs=4k
iodepth=32
[fsync1]
stonewall
rw=randwrite
bs=4k
ioengine=psync
fsync=1
[seq2]
stonewall
rw=write
bs=1M
iodepth=8
[rand2]
stonewall
rw=randwrite
bs=4k
iodepth=32
FIO
pids=()
cleanup() { set +e
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null; done; sleep 0.5
  for m in "$work"/*/mnt; do grep -q " $m " /proc/mounts && umount -l "$m"; done
  rm -rf "$work"; }
trap cleanup EXIT
i=0
for b in "$@"; do
  i=$((i+1)); d=$work/$i; mkdir -p "$d/mnt"
  "$work/azurite-run" --port 0 --location "$d/az" --endpoint-file "$d/ep" >/dev/null 2>&1 & a=$!; pids+=("$a")
  for _ in $(seq 600); do [ -s "$d/ep" ] && break; sleep 0.1; done
  "$b" create --blob "$(cat "$d/ep")/bench/v$i.vhd" --size 64GiB --state "$d/st" --create-container >/dev/null
  "$b" mount --state "$d/st" --journal-cap 48GiB "$d/mnt" >/dev/null
  pid=$("$b" status --state "$d/st" --json | python3 -c 'import json,sys;print(json.load(sys.stdin)["pid"])'); pids+=("$pid")
  if [ "${AB_REMOTE:-}" != live ]; then kill "$a"; wait "$a" 2>/dev/null || true; fi
  F=$d/mnt/v$i.img fio "$work/job.fio" --output-format=json 2>/dev/null | python3 -c '
import json,sys; j=json.load(sys.stdin)
print(sys.argv[1], " ".join("%s=%d" % (x["jobname"], x["write"]["iops"]) for x in j["jobs"]))' "$b"
  kill -9 "$pid"; sleep 0.5; umount -l "$d/mnt"; rm -rf "$d"
done
