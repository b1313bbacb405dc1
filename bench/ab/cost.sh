#!/bin/bash
# bench/ab/cost.sh OLD_BIN NEW_BIN [ROUNDS] [GIB]: what a sequential write costs each of two vhdsync
# binaries, mounted side by side (remote detached): fio writes GIB GiB of 1 MiB blocks (iodepth 8,
# direct) on each .img three times over the same range, pass 1 on never-written space and passes 2
# and 3 over the pass before it, still pending; each round takes its own range. Per pass it prints
# "round pass target MiB/s local_write_bytes_per_byte cpu_seconds_per_GiB": the bytes the daemon
# had written to the state directory's file system (/proc/PID/io write_bytes: journal and image)
# for each byte fio wrote, and the daemon's CPU time. Unlike a throughput, the two cost figures do
# not depend on what else the machine is doing. The passthrough FUSE server (nullfuse --backing)
# runs the same passes for the MiB/s column. Root.
set -euo pipefail
cd "$(dirname "$0")/../.."
R=${3:-3} G=${4:-2}
. bench/ab/lib.sh
ab_setup cost "$1" "$2"
trap ab_cleanup EXIT
for v in old new; do ab_mount $v 64GiB; done
ab_pass 64GiB
VPID[pass]=$PASSPID
# counters PID: write_bytes and CPU seconds (utime+stime) of the process
counters() {
  local wb cpu
  wb=$(awk '/^write_bytes/ {print $2}' /proc/$1/io)
  cpu=$(awk -v hz=$(getconf CLK_TCK) '{printf "%.3f", ($14+$15)/hz}' /proc/$1/stat)
  echo "$wb $cpu"
}
t=(old new pass)
for r in $(seq 1 $R); do
  o=$(( (r-1) % ${#t[@]} )); order=("${t[@]:$o}" "${t[@]:0:$o}")
  for p in 1 2 3; do
    for v in "${order[@]}"; do
      read -r wb0 cpu0 < <(counters ${VPID[$v]})
      mibs=$(fio --name=c --filename="${FILE[$v]}" --offset=$(( (r-1) * G ))G --size=${G}G --direct=1 \
        --rw=write --bs=1M --iodepth=8 --ioengine=libaio --output-format=json 2>/dev/null |
        python3 -c 'import json,sys; print(int(json.load(sys.stdin)["jobs"][0]["write"]["bw"]/1024))')
      read -r wb1 cpu1 < <(counters ${VPID[$v]})
      python3 -c "import sys; g=$G; print($r, $p, '$v', $mibs, '%.2f' % (($wb1-$wb0)/(g*2**30)), '%.2f' % (($cpu1-$cpu0)/g))"
    done
  done
done
