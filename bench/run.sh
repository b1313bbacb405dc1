#!/usr/bin/env bash
# make bench: the measurements of BENCHMARKS.md, each against baselines measured in
# the same run, in alternating repetitions; medians go to bench/results.json
# and bench/results.md (bench/report.py). Everything started here (Azurite,
# daemons, FUSE mounts, loop devices, ext4 mounts) is undone on exit.
#
# Knobs (environment): BENCH_REPS (3), BENCH_RUNTIME (seconds per fio run, 5),
# BENCH_SKIP (space-separated stages to skip: write fsync fsynclive flush wire
# staged lag backlog burst outage steady steadyhalf sync db thin; thin is
# bench/thin.sh, results in results-thin.md),
# BENCH_FLUSH_SIZE (1GiB), BENCH_FLUSH_REPS (BENCH_REPS), BENCH_RTT (0,20ms),
# BENCH_LAG_RATE (MiB/s; default half the server's measured ceiling for the lag
# workload's own pattern, random 64 KiB Put Pages), BENCH_SYNC
# (1: sync before every fio run), BENCH_OUT (directory of the results, bench),
# BENCH_BIN (the vhdsync binary to measure, bin/vhdsync), BENCH_RAW (a directory
# to keep a copy of the raw results in).
#
# Burst, outage and steady (drain after a write burst, after an outage of
# the server, and the replica's lag under a steady load at Azure's limits;
# each against a rawput baseline measured first on the same quiet emulator):
# BENCH_THROTTLE_RPS (500) and BENCH_THROTTLE_MIBPS (60): the per-blob limits
# azurite-throttle enforces where a stage runs through it (a standard page
# blob's targets);
# BENCH_BURST_PREFILL (1: the region is written once and drained before the
# burst, so the burst overwrites data as a database does; 0: a fresh region),
# BENCH_BURST_VARIANTS ("bare throttled ext4": 4 KiB random writes, iodepth
# 32, on the .img with the remote live, on bare Azurite, through
# azurite-throttle, and on a 1 GiB file of ext4 on a loop device over the
# .img, bare Azurite), BENCH_BURST_RUNTIME (10 s), BENCH_BURST_SIZE (MiB
# written over, 1024), BENCH_BURST_DRAIN_LIMIT (900 s: past it, unmount gives
# up and the burst is recorded "not drained" with what was sent so far);
# BENCH_OUTAGE_RUNTIME (60 s of 16 KiB random writes, iodepth 16),
# BENCH_OUTAGE_SIZE (MiB written over, 256), BENCH_OUTAGE_AT (15 s into the
# run Azurite is frozen, SIGSTOP) for BENCH_OUTAGE_FOR (30 s, then SIGCONT),
# BENCH_OUTAGE_DRAIN_LIMIT (BENCH_BURST_DRAIN_LIMIT);
# BENCH_STEADY_PREFILL (1: the hot region is written and drained first),
# BENCH_STEADY_RUNTIME (60 s of 8 KiB random writes through azurite-throttle),
# BENCH_STEADY_IOPS (1000), BENCH_STEADY_SIZE (MiB written over, 64),
# BENCH_STEADY_DRAIN_LIMIT (BENCH_BURST_DRAIN_LIMIT).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "make bench needs root (FUSE mounts, losetup, mount)"; exit 1; }
REPS=${BENCH_REPS:-3}
RT=${BENCH_RUNTIME:-5}
SKIP=" ${BENCH_SKIP:-} "
SIZE=64GiB
repo=$PWD
bin=${BENCH_BIN:-$repo/bin/vhdsync}
work=$(mktemp -d /var/tmp/vhdsync-bench.XXXXXX)
res=$work/res; mkdir -p "$res"
. bench/lib.sh
log() { printf '[%s] %s\n' "$(date -u +%T)" "$*" >&2; }
skip() { [[ "$SKIP" == *" $1 "* ]]; }

go build -o "$work/nullfuse" ./bench/cmd/nullfuse
go build -o "$work/flushbench" ./bench/cmd/flushbench
go build -o "$work/azurite-run" ./internal/azurite/cmd/azurite-run

# wait_drained STATE: until the mount's journal is empty (at most 10 minutes)
wait_drained() {
  python3 - "$1" "$bin" <<'PY' || true
import json,subprocess,sys,time
st,b=sys.argv[1],sys.argv[2]
t0=time.time()
while time.time()-t0<600:
    j=json.loads(subprocess.run([b,"status","--state",st,"--json"],capture_output=True,text=True).stdout)
    if j.get("journal_records",1)==0: break
    time.sleep(0.5)
PY
}
# start_nullfuse NAME [--backing FILE]: the null FUSE server (or, with
# --backing, the passthrough one) at $work/NAME, serving NAME.img
start_nullfuse() {
  local n=$1; shift
  mkdir -p "$work/$n"; "$work/nullfuse" --size 64GiB --name "$n" "$@" "$work/$n" > "$work/$n.log" 2>&1 &
  pids+=("$!"); fusemounts+=("$work/$n")
  for _ in $(seq 100); do [ -e "$work/$n/$n.img" ] && break; sleep 0.1; done
}
# stop_servers SIGNAL: every process in pids, then what is left mounted of
# fusemounts
stop_servers() {
  for p in "${pids[@]}"; do kill "-$1" "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  for m in "${fusemounts[@]}"; do if grep -q " $m " /proc/mounts; then umount -l "$m"; fi; done
  fusemounts=() pids=()
}
# mount_vhdsync NAME [mount flags]: a fresh Azurite and mount_on it; sets
# VAZ too
mount_vhdsync() {
  local name=$1; shift
  start_azurite "$work/$name"; VAZ=$AZPID
  mount_on "$EP" "$name" "$@"
}
# mount_on ENDPOINT NAME [mount flags]: create NAME's blob (VSIZE) at
# ENDPOINT (an Azurite, or a proxy in front of one) and mount it at
# $work/NAME/mnt; sets VST (state), VMNT, VPID
mount_on() {
  local ep=$1 name=$2; shift 2
  local d=$work/$name; mkdir -p "$d/mnt"
  "$bin" create --blob "$ep/bench/$name.vhd" --size "$VSIZE" --state "$d/st" --create-container >/dev/null
  # @EP@ in a flag stands for this endpoint (e.g. --staging @EP@/staging)
  "$bin" mount --state "$d/st" "${@//@EP@/$ep}" "$d/mnt" >/dev/null
  fusemounts+=("$d/mnt")
  VST=$d/st VMNT=$d/mnt VPID=$(vpid "$d/st"); vpids+=("$VPID")
}
# drain_mount PREFIX LIMIT T0: `vhdsync unmount` of the current mount (VST,
# VMNT, VPID) with LIMIT seconds to drain, timed from T0 (the workload's end,
# epoch seconds) into $res/PREFIX-drain.json; past LIMIT ("not drained") the
# daemon is killed and what is left mounted is detached lazily, as the
# cleanup trap does
drain_mount() {
  local prefix=$1 limit=$2 t0=$3
  if python3 bench/stages.py drain --bin "$bin" --state "$VST" --mnt "$VMNT" --limit "$limit" --t0 "$t0" \
       --out "$res/$prefix-drain.json"; then
    log "$prefix: drained in $(python3 -c "import json;print(json.load(open('$res/$prefix-drain.json'))['seconds'])") s"
  else
    log "$prefix: not drained within ${limit} s (see $res/$prefix-drain.json)"
  fi
  if kill -0 "$VPID" 2>/dev/null; then
    kill -9 "$VPID"
    python3 bench/stages.py waitpid --pid "$VPID" --timeout 60 || log "daemon $VPID still there"
  fi
  unlist vpids "$VPID"
  if grep -q " $VMNT " /proc/mounts; then umount -l "$VMNT"; fi
  unlist fusemounts "$VMNT"
}
# azurite_group AZPID: the process group of the Azurite (node) that
# azurite-run AZPID started in a group of its own
azurite_group() { pgrep -P "$1" | head -1; }
# wire_workload IMG DIR [scan]: the wire stage's workload on IMG: loop,
# mkfs.ext4 (discards the device), copy Go's src, sync, [scan the image for
# the ideal into wire-scan.json,] delete every other file, sync, fstrim,
# unmount, detach
wire_workload() {
  local img=$1 dir=$2
  LOOPDEV=$(losetup --find --show "$img"); loops+=("$LOOPDEV")
  mkfs.ext4 -q -F "$LOOPDEV"
  mkdir -p "$dir"; mount "$LOOPDEV" "$dir"; fsmounts+=("$dir")
  cp -r "$(go env GOROOT)/src" "$dir/src"
  sync
  if [ "${3:-}" = scan ]; then "$work/flushbench" --scan "$VST/disk.img" > "$res/wire-scan.json" || true; fi
  (cd "$dir/src" && find . -type f | awk 'NR%2==0' | xargs -d '\n' rm -f)
  sync
  fstrim -v "$dir" >&2 || true
  umount "$dir"; fsmounts=()
  losetup -d "$LOOPDEV"; loops=()
}
# attach FILE OFFSET SIZE MNT: loop (direct I/O) + ext4, sets LOOPDEV
attach_ext4() {
  local f=$1 off=$2 sz=$3 m=$4
  LOOPDEV=$(losetup --find --show --direct-io=on --offset "$off" --sizelimit "$sz" "$f"); loops+=("$LOOPDEV")
  mkfs.ext4 -q -F -E nodiscard "$LOOPDEV"
  mkdir -p "$m"; mount -o noinit_itable "$LOOPDEV" "$m"; fsmounts+=("$m")
}
fio_run() { # out file size extra...
  local out=$1 file=$2 size=$3; shift 3
  # BENCH_SYNC=1: write back every target's dirty pages before each run
  if [ -n "${BENCH_SYNC:-}" ]; then sync; fi
  fio --name=j --filename="$file" --size="$size" --ioengine=libaio --direct=1 --runtime="$RT" --time_based=1 \
      --group_reporting --output-format=json "$@" > "$out" 2>"$out.err" || { log "fio failed: $out"; cat "$out.err" >&2; }
}
machine() {
  python3 - "$@" <<PY
import json,subprocess,platform,os
def sh(c): return subprocess.run(c,shell=True,capture_output=True,text=True).stdout.strip()
print(json.dumps({"nproc":int(sh("nproc")),"mem":sh("free -g | sed -n 2p"),"kernel":platform.release(),
 "cpu":sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2").strip(),
 "disk":sh("df -h $work | tail -1")+" / "+sh("lsblk -dno NAME,SIZE,ROTA,MODEL \$(df --output=source $work | tail -1) 2>/dev/null"),
 "fio":sh("fio --version"),"s3backer":sh("s3backer --version 2>&1 | head -1"),"go":sh("go version"),
 "commit":sh("git describe --always --dirty"),"date":sh("date -u +%FT%TZ"),"reps":$REPS,"runtime_s":$RT}))
PY
}
machine > "$res/machine.json"
log "machine: $(cat "$res/machine.json")"

############ 1, 2, 5: write path, fsync, memory (64 GiB virtual size)
VSIZE=$SIZE
if ! skip write; then
  log "write path: setting up local file, null FUSE, vhdsync (remote detached), s3backer --test"
  # local file
  truncate -s 64G "$work/local.img"
  # null FUSE
  start_nullfuse null
  # passthrough FUSE: the same server writing each request once to a local
  # file (buffered, as vhdsync's image), fdatasync per flush: the ceiling of
  # any FUSE disk that keeps its data in a local file
  start_nullfuse pass --backing "$work/pass-backing.img"
  # vhdsync: the remote is taken away after the mount, so the flusher only
  # retries and the write path is measured alone (the journal keeps all).
  # The journal keeps every byte of this stage (about 40 GB at 1-1.5 GB/s
  # sequential); at its cap writers would wait for a flusher that cannot
  # send, so the cap takes what the disk has, less 12 GiB for the rest.
  free_gib=$(( $(df --output=avail -B1G "$work" | tail -1) - 12 ))
  cap_gib=$(( free_gib < 56 ? free_gib : 56 ))
  if [ "$cap_gib" -lt 8 ]; then log "only $((free_gib + 12)) GiB free under $work: stage 1 needs about 60; free space there, or skip it with BENCH_SKIP=\"write fsync\""; exit 1; fi
  if [ "$cap_gib" -lt 48 ]; then log "only $((free_gib + 12)) GiB free under $work: stage 1 needs about 60 (journal cap ${cap_gib} GiB); it may stall at the cap"; fi
  mount_vhdsync v --journal-cap "${cap_gib}GiB"
  stop_azurite "$VAZ"
  VPID_W=$VPID VST_W=$VST
  # s3backer, local-directory test mode, tuned (flags listed in the results):
  # 4 KiB blocks for 4 KiB writes and ext4 (a larger block makes every 4 KiB
  # write a read-modify-write: 10 IOPS at 64 KiB), 128 KiB blocks for 1 MiB
  # sequential writes (4 KiB blocks give ~26 MiB/s there); no MD5 cache (and
  # so no minimum write delay), a large write-back cache, direct I/O.
  S3COMMON="--test --size=64G --blockCacheSize=20000 --blockCacheThreads=8 --blockCacheWriteDelay=250 --md5CacheSize=0 --md5CacheTime=0 --minWriteDelay=0 --directIO"
  for v in s3backer:4K s3b128k:128K; do
    n=${v%%:*} bs=${v##*:}
    mkdir -p "$work/$n-dir" "$work/$n-mnt"
    s3backer -f $S3COMMON --blockSize=$bs "$work/$n-dir" "$work/$n-mnt" > "$work/$n.log" 2>&1 &
    pids+=("$!"); fusemounts+=("$work/$n-mnt")
    for _ in $(seq 100); do [ -e "$work/$n-mnt/file" ] && break; sleep 0.1; done
    [ -e "$work/$n-mnt/file" ] || { cat "$work/$n.log"; exit 1; }
    echo "$n: $S3COMMON --blockSize=$bs" >> "$res/s3backer_flags"
  done
  declare -A FILE=([local]=$work/local.img [null]=$work/null/null.img [pass]=$work/pass/pass.img [vhdsync]=$VMNT/v.img [s3backer]=$work/s3backer-mnt/file [s3b128k]=$work/s3b128k-mnt/file)
  # ext4 on loop on the second half of each file; raw fio uses the first 2 GiB
  declare -A FS
  for t in local null pass vhdsync s3backer; do
    attach_ext4 "${FILE[$t]}" $((32<<30)) $((32<<30)) "$work/fs-$t"; FS[$t]=$work/fs-$t
    losetup --list -O NAME,DIO "$LOOPDEV" | tail -1 >&2
  done
  targets=(local null pass vhdsync s3backer)
  for rep in $(seq 1 "$REPS"); do
    # rotate the order every repetition
    k=$(( (rep-1) % ${#targets[@]} ))
    order=("${targets[@]:$k}" "${targets[@]:0:$k}")
    for t in "${order[@]}"; do
      log "rep $rep: $t"
      fio_run "$res/w-$t-raw-seq-$rep.json" "${FILE[$t]}" 2G --rw=write --bs=1M --iodepth=8
      if [ "$t" = s3backer ]; then fio_run "$res/w-s3b128k-raw-seq-$rep.json" "${FILE[s3b128k]}" 2G --rw=write --bs=1M --iodepth=8; fi
      fio_run "$res/w-$t-raw-rand-$rep.json" "${FILE[$t]}" 2G --rw=randwrite --bs=4k --iodepth=32
      fio_run "$res/w-$t-ext4-seq-$rep.json" "${FS[$t]}/fio.dat" 1G --rw=write --bs=1M --iodepth=8
      fio_run "$res/w-$t-ext4-rand-$rep.json" "${FS[$t]}/fio.dat" 1G --rw=randwrite --bs=4k --iodepth=32
      if ! skip fsync; then
        fio_run "$res/f-$t-raw-fsync-$rep.json" "${FILE[$t]}" 2G --rw=randwrite --bs=4k --iodepth=1 --ioengine=psync --fsync=1
      fi
      if [ "$t" = vhdsync ]; then vstatus "$VST_W" > "$res/vstatus-write-$rep.json"; fi
    done
  done
  grep -E 'VmHWM|VmRSS' /proc/"$VPID_W"/status > "$res/mem-write.txt"
  vstatus "$VST_W" > "$res/vstatus-write.json"
  du -sb "$VST_W" > "$res/state-du-write.txt"
  # tear down now (the remote is gone: no drain)
  for m in "${fsmounts[@]}"; do umount "$m"; done; fsmounts=()
  for l in "${loops[@]}"; do losetup -d "$l"; done; loops=()
  kill -9 "$VPID_W"; sleep 0.5; umount -l "$VMNT"
  stop_servers 9
  rm -rf "$work/local.img" "$work/pass-backing.img" "$work"/s3b*-dir "$work/v" || true
fi

############ 1b: a database's writes on ext4: 8 jobs of random 8 KiB writes,
# each followed by fdatasync, on files in ext4 on a loop device; vhdsync
# (remote detached, as in stage 1) against the passthrough FUSE server, in
# alternating repetitions
if ! skip db; then
  log "db: 8 jobs of random 8 KiB writes + fdatasync on ext4"
  start_nullfuse dbpass --backing "$work/dbpass-backing.img"
  VSIZE=8GiB
  mount_vhdsync db
  stop_azurite "$VAZ"
  VPID_DB=$VPID
  declare -A DBFS=()
  for t in pass vhdsync; do
    f=$work/dbpass/dbpass.img; [ "$t" = vhdsync ] && f=$VMNT/db.img
    attach_ext4 "$f" 0 $((4 << 30)) "$work/dbfs-$t"; DBFS[$t]=$work/dbfs-$t
  done
  for rep in $(seq 1 "$REPS"); do
    order=(pass vhdsync); [ $((rep % 2)) = 0 ] && order=(vhdsync pass)
    for t in "${order[@]}"; do
      fio --name=db --directory="${DBFS[$t]}" --rw=randwrite --bs=8k --numjobs=8 --fdatasync=1 --size=64M \
          --ioengine=psync --runtime="$RT" --time_based=1 --group_reporting --output-format=json \
          > "$res/db-$t-$rep.json" 2>/dev/null || log "db: fio on $t failed"
    done
  done
  for t in pass vhdsync; do umount "${DBFS[$t]}"; unlist fsmounts "${DBFS[$t]}"; done
  for l in "${loops[@]}"; do losetup -d "$l"; done; loops=()
  kill -9 "$VPID_DB"; sleep 0.5; umount -l "$VMNT"
  stop_servers 9
  rm -f "$work/dbpass-backing.img"; rm -rf "$work/db"
fi

############ 2b: fsync on a fresh mount with a live remote (the state a
# replica is normally in: the flusher sends every epoch as it closes, on the
# same 2 CPUs), against the local file, null FUSE and passthrough FUSE. The
# fsync rows of stage 1 are taken on its mount, which by then carries tens
# of GB of journal with the remote detached.
if ! skip fsynclive; then
  log "fsync with a live remote"
  VSIZE=$SIZE
  truncate -s 64G "$work/local.img"
  start_nullfuse null
  start_nullfuse pass --backing "$work/pass-backing.img"
  mount_vhdsync live
  declare -A LFILE=([local]=$work/local.img [null]=$work/null/null.img [pass]=$work/pass/pass.img [vhdsync]=$VMNT/live.img)
  ltargets=(local null pass vhdsync)
  for rep in $(seq 1 "$REPS"); do
    k=$(( (rep-1) % ${#ltargets[@]} ))
    for t in "${ltargets[@]:$k}" "${ltargets[@]:0:$k}"; do
      log "rep $rep: $t"
      fio_run "$res/fl-$t-raw-fsync-$rep.json" "${LFILE[$t]}" 2G --rw=randwrite --bs=4k --iodepth=1 --ioengine=psync --fsync=1
      # the baselines run on a quiet machine: vhdsync's replication (the
      # flusher and Azurite busy) is vhdsync's cost alone
      if [ "$t" = vhdsync ]; then wait_drained "$VST"; fi
    done
  done
  vstatus "$VST" > "$res/vstatus-fsynclive.json"
  "$bin" unmount "$VMNT" >&2 || log "unmount failed"
  fusemounts=("$work/null" "$work/pass")
  stop_azurite "$VAZ"
  stop_servers TERM
  rm -rf "$work/local.img" "$work/pass-backing.img" "$work/live" || true
fi

############ 3: flush path (journal -> Azurite), workers 1..16, baselines
if ! skip flush; then
  log "flush path"
  "$work/flushbench" --dir "$work/flush" --size "${BENCH_FLUSH_SIZE:-1GiB}" --workers 1,2,4,8,16 --raw 8,16,32 --reps "${BENCH_FLUSH_REPS:-$REPS}" \
    --rtt "${BENCH_RTT:-0,20ms}" --out "$res/flush.json" >&2 &
  fbpid=$!; pids+=("$fbpid"); wait "$fbpid" || log "flushbench failed"
fi

############ 4: wire efficiency (mkfs, copy Go's src, delete half, fstrim)
if ! skip wire; then
  log "wire efficiency"
  VSIZE=4GiB
  mount_vhdsync wire
  # the ideal: every distinct non-zero sector the workload wrote (the disk
  # started empty; deleting and trimming only zeroes), scanned after the copy
  wire_workload "$VMNT/wire.img" "$work/wirefs" scan
  wait_drained "$VST" > "$res/wire-drain.txt"
  vstatus "$VST" > "$res/vstatus-wire.json"
  # the blob's final written ranges (ideal: distinct non-zero bytes)
  "$bin" unmount "$VMNT" >&2; fusemounts=()
  stop_azurite "$VAZ"
fi

############ 4b: staged transfer vs direct: the wire workload again
# through --transfer staged, and drain time through a shared-rate uplink
if ! skip staged; then
  log "staged transfer"
  go build -o "$work/stagedbench" ./bench/cmd/stagedbench
  "$work/stagedbench" --dir "$work/stagedbench-dir" --size-mib "${BENCH_STAGED_MIB:-128}" --rate "${BENCH_STAGED_RATE:-10}" \
    --out "$res/staged-drain.json" > "$res/staged-drain.md" || log "stagedbench failed"
  VSIZE=4GiB
  mount_vhdsync wirestaged --transfer staged --staging @EP@/staging
  wire_workload "$VMNT/wirestaged.img" "$work/wirefs2"
  wait_drained "$VST"
  vstatus "$VST" > "$res/vstatus-wirestaged-before.json"
  "$bin" unmount "$VMNT" >&2; fusemounts=()
  t0=$(date +%s.%N)
  "$bin" apply --once --staging "$EP/staging" --blob "$EP/bench/wirestaged.vhd" > "$res/staged-apply.txt"
  python3 -c "print(round($(date +%s.%N) - $t0, 1))" > "$res/staged-apply-seconds.txt"
  "$bin" verify --state "$VST" > "$res/staged-verify.txt" || log "staged verify failed"
  stop_azurite "$VAZ"
  python3 - "$res" > "$res/staged.md" <<'PY' || true
import json,os,sys
r=sys.argv[1]
def load(n):
    try: return json.load(open(os.path.join(r,n)))
    except Exception: return {}
d=load("vstatus-wire.json"); s=load("vstatus-wirestaged-before.json")
print("### Staged vs direct: wire bytes (mkfs.ext4 4 GiB, copy Go's src, delete half, fstrim)\n")
print("| transfer | bytes sent | Put Page / segments | bytes cleared | sent / direct |")
print("|---|---|---|---|---|")
db=d.get("bytes_sent",0)
print(f"| direct | {db:,} | {d.get('put_calls',0)} Put Page | {d.get('bytes_cleared',0):,} | 1.00 |")
sb=s.get("bytes_sent",0)
print(f"| staged (zstd segments) | {sb:,} | {s.get('segments',0)} segments | {s.get('bytes_cleared',0):,} | {sb/db if db else 0:.2f} |")
print()
print(open(os.path.join(r,"staged-apply.txt")).read().strip())
print()
print(open(os.path.join(r,"staged-drain.md")).read())
PY
fi

############ 6: replica lag under a steady, rate-limited write load
if ! skip lag; then
  log "replica lag"
  VSIZE=$SIZE
  mount_vhdsync lag
  # The ceiling of this workload's own pattern (random 64 KiB Put Pages,
  # the flusher's 8 requests in flight), measured now on the same Azurite:
  # a server takes small requests far slower than the 4 MiB ones of the
  # flush stage, so half of that ceiling would overload it.
  go build -o "$work/rawput" ./bench/cmd/rawput
  "$work/rawput" --endpoint "$EP" --bs 65536 --conc 8 --total-mib 256 > "$res/lag-ceiling.json" || log "rawput failed"
  rate=${BENCH_LAG_RATE:-$(python3 -c "import json;print(max(1,int(json.load(open('$res/lag-ceiling.json'))['mib_per_second']/2)))" 2>/dev/null || echo 8)}
  echo "$rate" > "$res/lag-rate.txt"
  fio --name=lag --filename="$VMNT/lag.img" --size=4G --rw=randwrite --bs=64k --iodepth=4 --ioengine=libaio --direct=1 \
      --rate="${rate}m" --runtime=$((RT*6)) --time_based=1 --output-format=json > "$res/lag-fio.json" 2>/dev/null &
  fp=$!; pids+=("$fp")
  : > "$res/lag.txt"
  while kill -0 "$fp" 2>/dev/null; do
    vstatus "$VST" | python3 -c 'import json,sys;j=json.load(sys.stdin);print(j.get("lag_seconds",0), j.get("journal_disk_bytes",0))' >> "$res/lag.txt" || true
    sleep 1
  done
  grep VmHWM /proc/"$VPID"/status > "$res/mem-lag.txt"
  kill -9 "$VPID"; sleep 0.5; umount -l "$VMNT"; fusemounts=()
  stop_azurite "$VAZ"
fi

############ 5b: memory while a live remote drains a backlog: sequential
# writes far faster than the server, then the drain (stage 1 has the remote
# detached, where the flusher holds at most one batch)
if ! skip backlog; then
  log "backlog memory"
  VSIZE=8GiB
  mount_vhdsync backlog
  fio --name=bl --filename="$VMNT/backlog.img" --size=3G --rw=write --bs=1M --iodepth=8 --ioengine=libaio --direct=1 \
      --output-format=json > "$res/backlog-fio.json" 2>/dev/null || log "fio failed"
  vstatus "$VST" > "$res/vstatus-backlog.json"
  # VmHWM is a high-water mark: read it once the journal is empty (or
  # after 120 s of draining)
  for _ in $(seq 120); do
    n=$(vstatus "$VST" | python3 -c 'import json,sys;print(json.load(sys.stdin).get("journal_records",1))' 2>/dev/null || echo 1)
    [ "$n" = 0 ] && break
    sleep 1
  done
  grep VmHWM /proc/"$VPID"/status > "$res/mem-backlog.txt"
  kill -9 "$VPID"; sleep 0.5; umount -l "$VMNT"; fusemounts=()
  stop_azurite "$VAZ"
fi

############ 7: drain after a write burst, after an outage, and lag at Azure's
# limits. Each workload runs on a fresh 4 GiB disk with the remote live (the
# flusher drains as the writes come); each baseline is rawput (the same
# amount as 4 MiB Put Pages, 8 in flight) on the same Azurite, through the
# same proxy where there is one, measured first, while nothing else runs.
THR_RPS=${BENCH_THROTTLE_RPS:-500} THR_MIBPS=${BENCH_THROTTLE_MIBPS:-60}
BURST_RT=${BENCH_BURST_RUNTIME:-10} BURST_MIB=${BENCH_BURST_SIZE:-1024}
BURST_LIMIT=${BENCH_BURST_DRAIN_LIMIT:-900} BURST_PREFILL=${BENCH_BURST_PREFILL:-1}
OUT_RT=${BENCH_OUTAGE_RUNTIME:-60} OUT_MIB=${BENCH_OUTAGE_SIZE:-256}
OUT_AT=${BENCH_OUTAGE_AT:-15} OUT_FOR=${BENCH_OUTAGE_FOR:-30} OUT_LIMIT=${BENCH_OUTAGE_DRAIN_LIMIT:-$BURST_LIMIT}
ST_RT=${BENCH_STEADY_RUNTIME:-60} ST_IOPS=${BENCH_STEADY_IOPS:-1000} ST_MIB=${BENCH_STEADY_SIZE:-64}
ST_LIMIT=${BENCH_STEADY_DRAIN_LIMIT:-$BURST_LIMIT}
if ! skip burst || ! skip outage || ! skip steady; then
  go build -o "$work/rawput" ./bench/cmd/rawput
  go build -o "$work/azurite-throttle" ./internal/azurite/cmd/azurite-throttle
  echo "{\"rps\": $THR_RPS, \"mibps\": $THR_MIBPS}" > "$res/throttle.json"
fi
# rawput_base ENDPOINT MIB OUT: the baseline, MIB MiB as 4 MiB Put Pages at
# random offsets in the first GiB of a fresh blob, 8 in flight
rawput_base() {
  "$work/rawput" --endpoint "$1" --bs 4194304 --conc 8 --total-mib "$2" --span-gib 1 > "$3" || { log "rawput failed"; rm -f "$3"; }
}
# proxy_done DIR PREFIX T0: stop the current proxy (TPID) and keep its
# counters and its wire log summed per blob, before and after T0
proxy_done() {
  stop_throttle "$TPID"
  cp "$1/proxy-stats.json" "$res/$2-proxy.json" 2>/dev/null || log "$2: no proxy stats"
  python3 bench/stages.py wire --log "$1/wire.jsonl" --t0 "$3" --out "$res/$2-wire.json" || log "$2: wire log summary failed"
  rm -f "$1/wire.jsonl"
}

# burst_run VARIANT: bare | throttled | ext4
burst_run() {
  local v=$1 name=burst$1 d=$work/burst$1 ep file t0 fs=""
  log "burst ($v)"
  VSIZE=4GiB
  start_azurite "$d"; VAZ=$AZPID; ep=$EP; TPID=
  if [ "$v" = throttled ]; then start_throttle "$d" "$EP" --rps "$THR_RPS" --mibps "$THR_MIBPS"; ep=$TEP; fi
  rawput_base "$ep" "$BURST_MIB" "$res/burst-$v-raw.json"
  mount_on "$ep" "$name"
  file=$VMNT/$name.img
  if [ "$v" = ext4 ]; then
    fs=$d/fs
    attach_ext4 "$VMNT/$name.img" 0 $((4 << 30)) "$fs"
    file=$fs/burst.dat
    # the file is laid out (fallocated) before the burst, and mkfs's and the
    # layout's writes are on the blob before it starts
    fio --name=layout --filename="$file" --size="${BURST_MIB}M" --rw=randwrite --create_only=1 >/dev/null
    sync; wait_drained "$VST"
  fi
  if [ "$BURST_PREFILL" = 1 ]; then
    # The region holds data first, as a database's data file does, and the
    # blob has it: the burst overwrites data. On a never-written region the
    # gaps between the burst's pages are holes, which are never sent as
    # data (written pages are billed), so its drain is one request per run
    # of written pages however the flusher batches.
    fio --name=prefill --filename="$file" --size="${BURST_MIB}M" --offset=0 --rw=write --bs=1M --iodepth=8 \
        --ioengine=libaio --direct=1 >/dev/null 2>&1 || log "burst ($v): prefill failed"
    sync; wait_drained "$VST"
  fi
  vstatus "$VST" > "$res/burst-$v-start.json"
  fio --name=burst --filename="$file" --rw=randwrite --bs=4k --iodepth=32 --ioengine=libaio --direct=1 \
      --size="${BURST_MIB}M" --offset=0 --time_based=1 --runtime="$BURST_RT" --group_reporting --output-format=json \
      > "$res/burst-$v-fio.json" 2> "$res/burst-$v-fio.err" || log "burst ($v): fio failed"
  t0=$(date +%s.%N)
  vstatus "$VST" > "$res/burst-$v-fioend.json" || true
  if [ -n "$fs" ]; then
    umount "$fs"; unlist fsmounts "$fs"
    losetup -d "$LOOPDEV"; unlist loops "$LOOPDEV"
  fi
  drain_mount "burst-$v" "$BURST_LIMIT" "$t0"
  if [ -n "$TPID" ]; then proxy_done "$d" "burst-$v" "$t0"; fi
  stop_azurite "$VAZ"; unlist pids "$VAZ"
  rm -rf "$d"
}
if ! skip burst; then
  for v in ${BENCH_BURST_VARIANTS:-bare throttled ext4}; do burst_run "$v"; done
fi

if ! skip outage; then
  log "outage: ${OUT_RT} s of 16 KiB random writes, Azurite frozen from ${OUT_AT} s for ${OUT_FOR} s"
  VSIZE=4GiB
  d=$work/outage
  start_azurite "$d"; VAZ=$AZPID
  rawput_base "$EP" "$OUT_MIB" "$res/outage-raw.json"
  mount_on "$EP" outage
  vstatus "$VST" > "$res/outage-start.json"
  fio --name=outage --filename="$VMNT/outage.img" --rw=randwrite --bs=16k --iodepth=16 --ioengine=libaio --direct=1 \
      --size="${OUT_MIB}M" --time_based=1 --runtime="$OUT_RT" --group_reporting --output-format=json \
      > "$res/outage-fio.json" 2> "$res/outage-fio.err" &
  fp=$!; pids+=("$fp"); tf=$(date +%s.%N)
  python3 bench/stages.py sample --bin "$bin" --state "$VST" --out "$res/outage-samples.jsonl" &
  sp=$!; pids+=("$sp")
  sleep "$OUT_AT"
  g=$(azurite_group "$VAZ")
  kill -STOP -- "-$g"; frozen+=("$g"); ts=$(date +%s.%N)
  sleep "$OUT_FOR"
  kill -CONT -- "-$g"; unlist frozen "$g"; tc=$(date +%s.%N)
  echo "{\"fio_start\": $tf, \"stop\": $ts, \"cont\": $tc}" > "$res/outage-window.json"
  wait "$fp" || log "outage: fio failed"
  unlist pids "$fp"
  t0=$(date +%s.%N)
  vstatus "$VST" > "$res/outage-fioend.json" || true
  kill "$sp"; wait "$sp" || true; unlist pids "$sp"
  drain_mount outage "$OUT_LIMIT" "$t0"
  stop_azurite "$VAZ"; unlist pids "$VAZ"
  rm -rf "$d"
fi

# steady_run NAME RPS MIBPS IOPS MIB: 8 KiB random writes at IOPS over a
# hot region of MIB through azurite-throttle at RPS requests/s and MIBPS
# MiB/s per blob
steady_run() {
  local name=$1 rps=$2 mibps=$3 iops=$4 mib=$5 d=$work/$1 t0
  log "$name: ${iops} x 8 KiB random writes/s over ${mib} MiB through azurite-throttle (${rps} req/s, ${mibps} MiB/s)"
  echo "{\"rps\": $rps, \"mibps\": $mibps, \"iops\": $iops, \"region_mib\": $mib}" > "$res/$name-limits.json"
  VSIZE=4GiB
  start_azurite "$d"; VAZ=$AZPID
  start_throttle "$d" "$EP" --rps "$rps" --mibps "$mibps"
  # The mount is told the limits the proxy enforces (--blob-limits), as an
  # operator would give a premium blob's.
  mount_on "$TEP" "$name" --blob-limits "$rps,$mibps"
  if [ "${BENCH_STEADY_PREFILL:-1}" = 1 ]; then
    # The hot region is a database's working set: data that exists, on
    # the blob, before the load starts (see BENCH_BURST_PREFILL).
    fio --name=prefill --filename="$VMNT/$name.img" --size="${mib}M" --offset=0 --rw=write --bs=1M --iodepth=8 \
        --ioengine=libaio --direct=1 >/dev/null 2>&1 || log "$name: prefill failed"
    wait_drained "$VST"
  fi
  vstatus "$VST" > "$res/$name-start.json"
  fio --name="$name" --filename="$VMNT/$name.img" --rw=randwrite --bs=8k --iodepth=8 --ioengine=libaio --direct=1 \
      --rate_iops="$iops" --size="${mib}M" --time_based=1 --runtime="$ST_RT" --group_reporting --output-format=json \
      > "$res/$name-fio.json" 2> "$res/$name-fio.err" &
  fp=$!; pids+=("$fp")
  python3 bench/stages.py sample --bin "$bin" --state "$VST" --out "$res/$name-samples.jsonl" &
  sp=$!; pids+=("$sp")
  wait "$fp" || log "$name: fio failed"
  unlist pids "$fp"
  t0=$(date +%s.%N)
  vstatus "$VST" > "$res/$name-fioend.json" || true
  kill "$sp"; wait "$sp" || true; unlist pids "$sp"
  drain_mount "$name" "$ST_LIMIT" "$t0"
  proxy_done "$d" "$name" "$t0"
  stop_azurite "$VAZ"; unlist pids "$VAZ"
  rm -rf "$d"
}

if ! skip steady; then
  # At a standard page blob's targets, as the workload is specified; then
  # the same workload at half scale (half the limits, the IOPS and the
  # region: the same writes per MiB per second, the same request cost,
  # so the same batches and send times), for emulators that cannot reach
  # 60 MiB/s themselves.
  skip steadyfull || steady_run steady "$THR_RPS" "$THR_MIBPS" "$ST_IOPS" "$ST_MIB"
  if ! skip steadyhalf; then
    steady_run steadyhalf $((THR_RPS / 2)) $((THR_MIBPS / 2)) $((ST_IOPS / 2)) $((ST_MIB / 2))
  fi
fi

############ 8: synchronous replication (mount --sync): fsync latency and
# write+fsync pairs per second against write-back mode and against one Put
# Page's round trip, at 0 and 20 ms added round trip (azurite-throttle
# --delay, no limits)
SYNC_RT=${BENCH_SYNC_RUNTIME:-10}
if ! skip sync; then
  go build -o "$work/rawput" ./bench/cmd/rawput
  go build -o "$work/azurite-throttle" ./internal/azurite/cmd/azurite-throttle
  for rtt in ${BENCH_SYNC_RTTS:-0 20}; do
    d=$work/sync$rtt
    log "sync: ${rtt} ms added round trip"
    start_azurite "$d"; VAZ=$AZPID
    start_throttle "$d" "$EP" --rps 0 --mibps 0 --delay "${rtt}ms"
    # the baseline: one 4 KiB Put Page at a time, its round trip
    "$work/rawput" --endpoint "$TEP" --bs 4096 --conc 1 --total-mib 2 --span-gib 1 > "$res/sync-$rtt-putpage.json" || log "sync: rawput failed"
    for mode in writeback sync; do
      flags=(); [ "$mode" = sync ] && flags=(--sync)
      VSIZE=1GiB
      mount_on "$TEP" "s$rtt$mode" "${flags[@]}"
      for jobs in 1 16; do
        fio --name=pairs --filename="$VMNT/s$rtt$mode.img" --rw=randwrite --bs=4k --direct=1 --ioengine=psync --fsync=1 \
            --numjobs="$jobs" --size=256M --runtime="$SYNC_RT" --time_based=1 --group_reporting --output-format=json \
            > "$res/sync-$rtt-$mode-$jobs.json" 2>/dev/null || log "sync: fio $mode $jobs failed"
      done
      # The same writers on ext4 on a loop device over the disk, each on
      # its own file: ext4's journal commits many fsyncs with one flush.
      fs=$d/fs$mode
      attach_ext4 "$VMNT/s$rtt$mode.img" 0 $((1 << 30)) "$fs"
      for jobs in 1 16; do
        fio --name=pairs --directory="$fs" --rw=randwrite --bs=4k --ioengine=psync --fsync=1 \
            --numjobs="$jobs" --size=16M --runtime="$SYNC_RT" --time_based=1 --group_reporting --output-format=json \
            > "$res/sync-$rtt-$mode-ext4-$jobs.json" 2>/dev/null || log "sync: fio ext4 $mode $jobs failed"
      done
      umount "$fs"; unlist fsmounts "$fs"
      losetup -d "$LOOPDEV"; unlist loops "$LOOPDEV"
      drain_mount "sync-$rtt-$mode" "$BURST_LIMIT" "$(date +%s.%N)"
    done
    stop_throttle "$TPID"
    stop_azurite "$VAZ"; unlist pids "$VAZ"
    rm -rf "$d"
  done
fi

############ 9: thin attach (issue #23): bench/thin.sh, with its own Azurite,
# cleanup and results (results-thin.json, results-thin.md)
if ! skip thin; then
  BENCH_BIN="$bin" bench/thin.sh "$work/thin" || log "thin: failed"
fi

out=${BENCH_OUT:-bench}; mkdir -p "$out"
if [ -n "${BENCH_RAW:-}" ]; then mkdir -p "$BENCH_RAW"; cp -r "$res/." "$BENCH_RAW/"; fi
python3 bench/report.py "$res" "$out/results.json" "$out/results.md"
cat "$out/results.md"
if [ -s "$res/staged.md" ]; then cp "$res/staged.md" "$out/results-staged.md"; cat "$out/results-staged.md"; fi
