#!/bin/bash
# bench/ab/rand4k.sh OLD_BIN NEW_BIN [ROUNDS] [RUNTIME]: two vhdsync binaries mounted side by side
# (remote detached, as bench/run.sh stage 1: Azurite killed after the mount) plus the null FUSE
# server, the passthrough server (nullfuse --backing) and a local file (the disk's ceiling; laid out before the first round); fio random 4 KiB writes, iodepth 32, direct, on each .img (first 2 GiB of 64 GiB), the
# order rotated every round. Prints "round target IOPS p99_us p50/p90/p99.9_us=... [fsync_p50/p99_us]"
# lines, then each daemon's peak resident memory (VmHWM). Root.
set -euo pipefail
cd "$(dirname "$0")/../.."
R=${3:-6} RT=${4:-5}
# AB_FIO replaces the workload, e.g. AB_FIO="--rw=randwrite --bs=4k --ioengine=psync --fsync=1"
# (fsync latency) or AB_FIO="--rw=write --bs=1M --iodepth=8 --ioengine=libaio" (sequential).
# AB_LIVE=1 leaves the remotes attached. AB_FRESH=16G gives each round its own 16 GiB of never
# written space (round r at (r-1)*16 GiB; at most 4 rounds), so that no write lands on data still
# pending from an earlier round: e.g. a file system filled for the first time.
FIOARGS=${AB_FIO:---rw=randwrite --bs=4k --iodepth=32 --ioengine=libaio}
. bench/ab/lib.sh
ab_setup rand4k "$1" "$2"
trap ab_cleanup EXIT
# AB_LIVE=1 keeps each mount's Azurite running (the flusher drains as it goes)
for v in old new; do ab_mount $v 64GiB; done
mkdir -p $work/null; $work/nullfuse --size 64GiB --name null $work/null >/dev/null 2>&1 & NULLPID=$!
for _ in $(seq 100); do [ -e $work/null/null.img ] && break; sleep 0.1; done
FILE[null]=$work/null/null.img
ab_pass 64GiB
FILE[local]=$work/local.img
fio --name=layout --filename="${FILE[local]}" --size=2G --rw=write --bs=1M --direct=1 >/dev/null 2>&1
t=(${AB_TARGETS:-old new null pass local})  # AB_TARGETS="old new pass" runs only those
for r in $(seq 1 $R); do
  o=$(( (r-1) % ${#t[@]} )); order=("${t[@]:$o}" "${t[@]:0:$o}")
  for v in "${order[@]}"; do
    span="--size=2G"
    if [ -n "${AB_FRESH:-}" ]; then span="--offset=$(( (r-1) * ${AB_FRESH%G} ))G --size=$AB_FRESH"; fi
    iops=$(fio --name=j --filename="${FILE[$v]}" $span --direct=1 --runtime=$RT --time_based=1 \
      $FIOARGS --group_reporting --output-format=json 2>/dev/null | python3 -c 'import json,sys
j=json.load(sys.stdin)["jobs"][0]; w=j["write"]; s=j.get("sync",{}).get("lat_ns",{}).get("percentile",{})
p=w["clat_ns"]["percentile"]
print(int(w["iops"]), int(p["99.000000"]/1000), "p50/p90/p99.9_us=%d/%d/%d" % (p["50.000000"]/1000, p["90.000000"]/1000, p["99.900000"]/1000), "fsync_p50/p99/p99.9_us=%d/%d/%d" % (s["50.000000"]/1000, s["99.000000"]/1000, s["99.900000"]/1000) if s else "")')
    echo "$r $v $iops"
  done
done
# the daemons' peak resident memory over all rounds
for v in old new; do echo "VmHWM $v $(awk '/VmHWM/ {print $2, $3}' /proc/${VPID[$v]}/status)"; done
