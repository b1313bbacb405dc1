#!/usr/bin/env bash
# make bench, stage thin (issue #23): thin attach of an 8 GiB blob holding
# 1 GiB of random data, against the plain download. Called by bench/run.sh
# (unless BENCH_SKIP holds "thin"), or standalone, as root, after `make build`:
#
#   bench/thin.sh [WORKDIR]
#
# WORKDIR (default: a new /var/tmp/vhdsync-bench-thin.XXXXXX) is removed on
# exit, with everything started here (Azurite, the proxy, vhdsync daemons,
# FUSE mounts, loop devices). Results: $BENCH_OUT/results-thin.json and
# results-thin.md (BENCH_OUT: bench), raw files copied to $BENCH_RAW/thin if
# BENCH_RAW is set.
#
#  a. `create --from-blob URL --thin`, timed, through azurite-throttle
#     (--rps 0 --mibps 0: no limits), whose counters and wire log say what
#     it read from the blob;
#  b. first-read latency: mount --prefetch off, fio 4 KiB psync direct reads,
#     one in each 4 MiB chunk holding data (a fio iolog, shuffled), so each
#     is the first touch of a chunk not local; then the same job again, every
#     chunk local: the local baseline (clat p50/p99 of both);
#  c. prefetch rate: a fresh thin state directory mounted --prefetch on,
#     timed from the mount until vhdsync.json no longer says thin; against
#     `vhdsync download` of the same blob, alternating (BENCH_THIN_REPS, 4:
#     the machines this runs on are shared, and one slow repetition in two
#     would move the median).
#
# Knobs: BENCH_BIN (bin/vhdsync), BENCH_THIN_REPS (4), BENCH_THIN_DISK_GIB
# (8), BENCH_THIN_DATA_MIB (1024), BENCH_THIN_LIMIT (seconds a prefetch or a
# download may take, 900), BENCH_THIN_CMP (1: cmp the local image with the
# source after the cold reads and after the first prefetch).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "bench/thin.sh needs root (FUSE mounts)"; exit 1; }
repo=$PWD
bin=${BENCH_BIN:-$repo/bin/vhdsync}
REPS=${BENCH_THIN_REPS:-4}
DISK_GIB=${BENCH_THIN_DISK_GIB:-8}
DATA_MIB=${BENCH_THIN_DATA_MIB:-1024}
LIMIT=${BENCH_THIN_LIMIT:-900}
CMP=${BENCH_THIN_CMP:-1}
out=${BENCH_OUT:-bench}
if [ $# -ge 1 ]; then work=$1; mkdir -p "$work"; else work=$(mktemp -d /var/tmp/vhdsync-bench-thin.XXXXXX); fi
res=$work/res; mkdir -p "$res"
. bench/lib.sh
log() { printf '[%s] thin: %s\n' "$(date -u +%T)" "$*" >&2; }
now() { date +%s.%N; }

go build -o "$work/azurite-run" ./internal/azurite/cmd/azurite-run
go build -o "$work/azurite-throttle" ./internal/azurite/cmd/azurite-throttle

is_thin() { python3 -c 'import json,sys;sys.exit(0 if json.load(open(sys.argv[1])).get("thin") else 1)' "$1/vhdsync.json"; }
# vmount STATE MP [flags]: sets VPID
vmount() {
  local st=$1 mp=$2; shift 2
  mkdir -p "$mp"
  "$bin" mount --state "$st" "$@" "$mp" > "$st.mount.log" 2>&1 || { log "mount $st failed"; cat "$st.mount.log" >&2; exit 1; }
  fusemounts+=("$mp")
  VPID=$(vpid "$st"); vpids+=("$VPID")
}
# vunmount MP PID
vunmount() {
  local mp=$1 p=$2
  "$bin" unmount "$mp" >/dev/null 2>&1 || log "unmount $mp failed"
  for _ in $(seq 1 600); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$p" 2>/dev/null; then log "daemon $p still there after unmount: killed"; kill -9 "$p"; fi
  unlist vpids "$p"
  if grep -q " $mp " /proc/mounts; then umount -l "$mp"; fi
  unlist fusemounts "$mp"
}
# cmp_image STATE KEYFILE: {"equal": bool} into KEYFILE
cmp_image() {
  if cmp -s "$src" "$1/disk.img"; then echo '{"equal": true}' > "$2"; else echo '{"equal": false}' > "$2"; log "local image of $1 differs from the source"; fi
}

python3 - "$bin" "$res/machine.json" <<'PY'
import json,os,subprocess,sys,time
def sh(c):
    try: return subprocess.run(c,shell=True,capture_output=True,text=True).stdout.strip()
    except Exception: return ""
cpu=sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2").strip()
json.dump({"nproc":os.cpu_count(),"kernel":os.uname().release,"cpu":cpu,"fio":sh("fio --version"),
           "go":sh("go version"),"vhdsync":sh(sys.argv[1]+" --version"),
           "commit":sh("git rev-parse --short HEAD"),"loadavg":" ".join(open("/proc/loadavg").read().split()[:3]),"date":time.strftime("%Y-%m-%dT%H:%M:%SZ",time.gmtime())},
          open(sys.argv[2],"w"))
PY

NAME=thin8g
start_azurite "$work/az"; AZ=$AZPID
URL=$EP/bench/$NAME.vhd

# The source: a sparse raw disk with DATA_MIB of random data, imported.
src=$work/src.raw
log "source: ${DISK_GIB} GiB raw disk, ${DATA_MIB} MiB of random data in 4-64 MiB extents"
t=$(now)
python3 bench/thin.py source "$src" "$res/plan.json" --disk-gib "$DISK_GIB" --data-mib "$DATA_MIB"
t1=$(now)
"$bin" import --blob "$URL" --state "$work/imp" --create-container --format raw "$src" > "$res/import.log" 2>&1 \
  || { log "import failed"; cat "$res/import.log" >&2; exit 1; }
t2=$(now)
rm -rf "$work/imp"
python3 -c "import json,sys;p=json.load(open(sys.argv[1]));json.dump({'disk_bytes':p['disk_bytes'],'data_bytes':p['data_bytes'],'generate_s':$t1-$t,'import_s':$t2-$t1},open(sys.argv[2],'w'))" \
  "$res/plan.json" "$res/source.json"
log "source: generated in $(python3 -c "print(round($t1-$t,1))") s, imported in $(python3 -c "print(round($t2-$t1,1))") s"

############ a. create --thin through azurite-throttle (no limits)
S1=$work/s1
start_throttle "$work/proxy" "$EP" --rps 0 --mibps 0
t=$(now)
"$bin" create --from-blob "$TEP/bench/$NAME.vhd" --state "$S1" --thin > "$res/create.log" 2>&1 \
  || { log "create --thin failed"; cat "$res/create.log" >&2; exit 1; }
t1=$(now)
stop_throttle "$TPID"
cp "$work/proxy/proxy-stats.json" "$res/create-proxy-stats.json" || true
cp "$work/proxy/wire.jsonl" "$res/create-wire.jsonl" || true
echo "{\"seconds\": $(python3 -c "print($t1-$t)")}" > "$res/create.json"
log "a. create --thin in $(python3 -c "print(round($t1-$t,2))") s; read: $(python3 bench/thin.py wire "$res/create-wire.jsonl")"
# from here on the state directory reaches Azurite directly
"$bin" set-blob --state "$S1" --blob "$URL" > "$res/setblob.log" 2>&1 || { log "set-blob failed"; cat "$res/setblob.log" >&2; exit 1; }

############ b. first-read latency, then the local baseline
MP1=$work/mp1
vmount "$S1" "$MP1" --prefetch off
n=$(python3 bench/thin.py iolog "$res/plan.json" "$MP1/$NAME.img" "$work/reads.iolog")
log "b. $n first reads of 4 KiB (one per data chunk), --prefetch off"
fio --name=cold --read_iolog="$work/reads.iolog" --ioengine=psync --direct=1 --output-format=json \
  > "$res/read-cold.json" 2> "$res/read-cold.err" || { log "fio cold failed"; cat "$res/read-cold.err" >&2; }
vstatus "$S1" > "$res/read-status.json" || true
fio --name=local --read_iolog="$work/reads.iolog" --ioengine=psync --direct=1 --output-format=json \
  > "$res/read-warm.json" 2> "$res/read-warm.err" || { log "fio local failed"; cat "$res/read-warm.err" >&2; }
log "b. cold $(python3 bench/thin.py fio-lat "$res/read-cold.json")"
log "b. local $(python3 bench/thin.py fio-lat "$res/read-warm.json")"
# Every chunk holding data has been read: the disk should be complete; if
# not, the prefetch finishes it (the first state directory keeps the lease
# while thin, and the next ones need it).
if is_thin "$S1"; then
  log "b. still thin after the reads: $(vstatus "$S1" | python3 -c 'import json,sys;print(json.load(sys.stdin).get("thin"))'); prefetching the rest"
  vunmount "$MP1" "$VPID"
  vmount "$S1" "$MP1" --prefetch on
  python3 bench/thin.py wait-complete --bin "$bin" --state "$S1" --samples "$res/s1-finish.jsonl" --limit "$LIMIT" >/dev/null &
  wp=$!; pids+=("$wp")
  wait "$wp" || log "b. first state directory not complete within $LIMIT s"
  unlist pids "$wp"
fi
vunmount "$MP1" "$VPID"
[ "$CMP" = 1 ] && cmp_image "$S1" "$res/read-cmp.json"
rm -rf "$S1"

############ c. prefetch rate against the plain download, alternating
# thin_rep I ORDER: a fresh thin state directory, mount --prefetch on, timed
# until complete
thin_rep() {
  local i=$1 order=$2 st=$work/p$1 mp=$work/mpp$1 t0 t1 t2 t3 tc ok alloc wp
  t0=$(now)
  "$bin" create --from-blob "$URL" --state "$st" --thin > "$res/prefetch-$i-create.log" 2>&1 \
    || { log "c. create --thin failed"; cat "$res/prefetch-$i-create.log" >&2; return 1; }
  t1=$(now)
  alloc=$(vstatus "$st" | python3 -c 'import json,sys;print(json.load(sys.stdin)["thin"]["allocated_bytes"])')
  t2=$(now)
  vmount "$st" "$mp" --prefetch on
  t3=$(now)
  ok=true
  # in the background, so that the cleanup trap stops it too
  python3 bench/thin.py wait-complete --bin "$bin" --state "$st" --samples "$res/prefetch-$i-samples.jsonl" \
    --limit "$LIMIT" > "$work/complete.$i" &
  wp=$!; pids+=("$wp")
  if wait "$wp"; then tc=$(cat "$work/complete.$i"); else ok=false; tc=$(now); log "c. rep $i: prefetch not complete within $LIMIT s"; fi
  unlist pids "$wp"
  python3 - "$res/prefetch-$i-samples.jsonl" "$res/prefetch-$i.json" <<PY
import json,sys
last=None
try:
    for l in open(sys.argv[1]):
        j=json.loads(l)
        if j.get("thin"): last=j["thin"]
except OSError: pass
json.dump({"order":"$order","create_s":$t1-$t0,"allocated_bytes":$alloc,"mount_s":$t3-$t2,
           "complete_s":($tc-$t2) if "$ok"=="true" else None,"ok":"$ok"=="true","last_status":last,
           "loadavg":open("/proc/loadavg").read().split()[0]},open(sys.argv[2],"w"))
PY
  vunmount "$mp" "$VPID"
  if [ "$CMP" = 1 ] && [ "$i" = 1 ]; then
    cmp_image "$st" "$res/prefetch-1-cmp.json"
    python3 -c "import json,sys;a=json.load(open(sys.argv[1]));a['image_equals_source']=json.load(open(sys.argv[2]))['equal'];json.dump(a,open(sys.argv[1],'w'))" \
      "$res/prefetch-1.json" "$res/prefetch-1-cmp.json"
  fi
  rm -rf "$st"
  log "c. rep $i thin: $(python3 -c "import json;j=json.load(open('$res/prefetch-$i.json'));print('complete in %s s, %s bytes' % (j['complete_s'], j['allocated_bytes']))")"
}
# dl_rep I ORDER: vhdsync download of the blob, timed
dl_rep() {
  local i=$1 order=$2 f=$work/dl.vhd t0 t1 ok=true
  t0=$(now)
  timeout "$LIMIT" "$bin" download --blob "$URL" "$f" > "$res/download-$i.log" 2>&1 || { ok=false; log "c. download failed"; tail -5 "$res/download-$i.log" >&2; }
  t1=$(now)
  python3 -c "import json;json.dump({'order':'$order','seconds':$t1-$t0,'bytes':$DATA_MIB*1048576,'ok':'$ok'=='true','loadavg':open('/proc/loadavg').read().split()[0]},open('$res/download-$i.json','w'))"
  rm -f "$f" "$f.part"
  log "c. rep $i download: $(python3 -c "print(round($t1-$t0,1))") s"
}
for i in $(seq 1 "$REPS"); do
  if [ $((i % 2)) = 1 ]; then
    thin_rep "$i" "thin, then download" || true
    dl_rep "$i" "thin, then download"
  else
    dl_rep "$i" "download, then thin"
    thin_rep "$i" "download, then thin" || true
  fi
done

stop_throttle "$AZ"
mkdir -p "$out"
if [ -n "${BENCH_RAW:-}" ]; then mkdir -p "$BENCH_RAW/thin"; cp -r "$res/." "$BENCH_RAW/thin/"; fi
python3 bench/thin.py report "$res" "$out/results-thin.json" "$out/results-thin.md"
cat "$out/results-thin.md"
