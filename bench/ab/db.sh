#!/bin/bash
# bench/ab/db.sh OLD_BIN NEW_BIN [ROUNDS] [RUNTIME]: the database job of bench/run.sh stage 1b (8 jobs of
# random 8 KiB writes, each followed by fdatasync, on ext4 on a loop device) on two vhdsync binaries
# mounted side by side (remote detached) and on the passthrough FUSE server (nullfuse --backing), the
# order rotated every round. Prints "round target writes/s fdatasync_p99_us write_p99_us p50_us(fdatasync/write)=..."
# lines, each with the daemon's own answer times for that run ("daemon mean_us write/fsync=..."; from
# vhdsync's fuse_duration_seconds histogram), and at the end the passthrough's over all rounds (nullfuse
# --latency): they tell the daemon's share of a transaction from the kernel's. AB_STATS=1 adds,
# per run, the server's CPU time per database write ("cpu_us/write", utime+stime from /proc) and
# the bytes the state directory's device took per database write ("dev_KiB/write", from
# /proc/diskstats, with a sync before and after the run so that each run is charged its own
# writeback, the page cache's deferred writes included). Root.
set -euo pipefail
cd "$(dirname "$0")/../.."
R=${3:-3} RT=${4:-10}
. bench/ab/lib.sh
ab_setup db "$1" "$2"
declare -A FS PORT LOOP
LOOPS=()
cleanup() { set +e
  for m in "${FS[@]}"; do grep -q " $m " /proc/mounts && umount $m; done
  for l in "${LOOPS[@]}"; do losetup -d $l; done
  ab_cleanup; }
trap cleanup EXIT
for v in old new; do
  PORT[$v]=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  MOUNTARGS[$v]="--metrics 127.0.0.1:${PORT[$v]}"
  ab_mount $v 8GiB
done
PASSARGS="--latency $work/pass-latency.txt"
ab_pass 8GiB
# served: the write and fsync answer counts and seconds in a vhdsync daemon's metrics.
served() { curl -s http://127.0.0.1:${PORT[$1]}/metrics | awk '/^vhdsync_fuse_duration_seconds_(sum|count)\{op="(write|fsync)"\}/ {print $2}' | tr '\n' ' '; }
# sectors: sectors written so far on the device holding $work; ticks PID: its CPU time in clock ticks
sectors() { awk -v d="$dev" '$3 == d {print $10}' /proc/diskstats; }
ticks() { awk '{print $14 + $15}' /proc/$1/stat; }
if [ -n "${AB_STATS:-}" ]; then
  dev=$(basename "$(findmnt -no SOURCE --target "$work" || true)")
  if [ -z "$dev" ] || [ -z "$(sectors)" ]; then
    echo "AB_STATS: $work is on '$dev', which /proc/diskstats does not list: run without AB_STATS, or with /var/tmp on a block device" >&2; exit 1
  fi
fi
t=(old new pass)
for v in "${t[@]}"; do
  l=$(losetup -f --show "${FILE[$v]}"); LOOPS+=($l); LOOP[$v]=$l
  mkfs.ext4 -q -F $l; mkdir -p $work/fs-$v; mount $l $work/fs-$v; FS[$v]=$work/fs-$v
done
for r in $(seq 1 $R); do
  o=$(( (r-1) % ${#t[@]} )); order=("${t[@]:$o}" "${t[@]:0:$o}")
  for v in "${order[@]}"; do
    [ $v = pass ] || before=$(served $v)
    pid=${VPID[$v]:-}; [ $v = pass ] && pid=$PASSPID
    if [ -n "${AB_STATS:-}" ]; then sync; s0=$(sectors); c0=$(ticks $pid); fi
    fio --name=db --directory="${FS[$v]}" --rw=randwrite --bs=8k --numjobs=8 --fdatasync=1 --size=64M \
      --ioengine=psync --runtime=$RT --time_based=1 --group_reporting --output-format=json 2>/dev/null > $work/fio.json
    if [ -n "${AB_STATS:-}" ]; then c1=$(ticks $pid); sync; s1=$(sectors); fi
    out=$(python3 -c 'import json,sys
j=json.load(open(sys.argv[1]))["jobs"][0]; w=j["write"]; s=j["sync"]["lat_ns"]["percentile"]
c=w["clat_ns"]["percentile"]
line = "%d %d %d p50_us(fdatasync/write)=%d/%d" % (w["iops"], s["99.000000"]/1000, c["99.000000"]/1000, s["50.000000"]/1000, c["50.000000"]/1000)
if len(sys.argv) > 2:
    n, hz = w["total_ios"], int(sys.argv[6])
    cpu = (int(sys.argv[3]) - int(sys.argv[2])) / hz * 1e6 / n
    dev = (int(sys.argv[5]) - int(sys.argv[4])) * 512 / 1024 / n
    line += " cpu_us/write=%d dev_KiB/write=%.1f" % (cpu, dev)
print(line)' $work/fio.json ${AB_STATS:+$c0 $c1 $s0 $s1 $(getconf CLK_TCK)})
    if [ $v != pass ]; then
      out="$out $(python3 -c 'import sys
a, b = [list(map(float, x.split())) for x in sys.argv[1:3]]
d = [q - p for p, q in zip(a, b)]  # fsync sum, fsync count, write sum, write count (sorted by op)
m = lambda s, c: int(s / c * 1e6) if c else 0
print("daemon mean_us write/fsync=%d/%d" % (m(d[2], d[3]), m(d[0], d[1])))' "$before" "$(served $v)")"
    fi
    echo "$r $v $out"
  done
done
# the passthrough's answer times over all rounds (op count mean_us p50_us p99_us), written as it
# exits: its file system and loop device go first
umount ${FS[pass]} && unset 'FS[pass]'
losetup -d ${LOOP[pass]} && LOOPS=(${LOOPS[@]/${LOOP[pass]}})
kill $PASSPID; wait $PASSPID 2>/dev/null; PASSPID=
sed 's/^/pass daemon /' $work/pass-latency.txt
