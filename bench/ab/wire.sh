#!/bin/bash
# bench/ab/wire.sh BIN OUTDIR [keep]: bench/run.sh stage 4 (4 GiB disk, mkfs.ext4, copy Go's src,
# delete every other file, fstrim, drain) with the vhdsync binary BIN; prints one JSON line of
# counters (also in OUTDIR). keep=1: Azurite is killed right after the mount, so the journal keeps
# every record; the state dir is left for TestWireSim (VHDSYNC_WIRESIM_JOURNAL=<state>/journal). Root.
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=$(realpath "$1") out=$2 keep=${3:-}
mkdir -p "$out"
work=$(mktemp -d /var/tmp/ab-wire.XXXXXX)
go build -o $work/azurite-run ./internal/azurite/cmd/azurite-run
go build -o $work/flushbench ./bench/cmd/flushbench
AZPID= LOOPDEV= VMNT=$work/mnt
cleanup() { set +e; mountpoint -q $work/fs && umount $work/fs; [ -n "$LOOPDEV" ] && losetup -d $LOOPDEV 2>/dev/null;
  if grep -q " $VMNT " /proc/mounts; then "$bin" unmount "$VMNT" >/dev/null 2>&1 || { [ -n "${VPID:-}" ] && kill -9 $VPID; sleep 0.5; umount -l $VMNT; }; fi
  [ -n "$AZPID" ] && kill $AZPID 2>/dev/null; wait 2>/dev/null; [ -z "$keep" ] && rm -rf $work; }
trap cleanup EXIT
$work/azurite-run --port 0 --location $work/az --endpoint-file $work/ep --log $work/az.log >/dev/null 2>&1 &
AZPID=$!
for _ in $(seq 600); do [ -s $work/ep ] && break; sleep 0.1; done
EP=$(cat $work/ep)
mkdir -p $VMNT
"$bin" create --blob "$EP/bench/wire.vhd" --size 4GiB --state $work/st --create-container >/dev/null
"$bin" mount --state $work/st $VMNT >/dev/null
VPID=$("$bin" status --state $work/st --json | python3 -c 'import json,sys;print(json.load(sys.stdin)["pid"])')
if [ -n "$keep" ]; then kill $AZPID; wait $AZPID 2>/dev/null || true; AZPID=; fi
LOOPDEV=$(losetup --find --show $VMNT/wire.img)
mkfs.ext4 -q -F $LOOPDEV
mkdir -p $work/fs; mount $LOOPDEV $work/fs
cp -r "$(go env GOROOT)/src" $work/fs/src
sync
$work/flushbench --scan $work/st/disk.img > $out/wire-scan.json
(cd $work/fs/src && find . -type f | awk 'NR%2==0' | xargs -d '\n' rm -f)
sync
fstrim $work/fs || true
umount $work/fs; losetup -d $LOOPDEV; LOOPDEV=
if [ -n "$keep" ]; then
  "$bin" status --state $work/st --json > $out/vstatus-wire.json
  kill -9 $VPID; sleep 0.5; umount -l $VMNT
  echo "journal kept in $work/st"; exit 0
fi
for _ in $(seq 1200); do
  n=$("$bin" status --state $work/st --json | python3 -c 'import json,sys;print(json.load(sys.stdin).get("journal_records",1))')
  [ "$n" = 0 ] && break; sleep 0.5
done
"$bin" status --state $work/st --json > $out/vstatus-wire.json
"$bin" unmount $VMNT >/dev/null
python3 - $out <<'PY'
import json,sys,os
o=sys.argv[1]; w=json.load(open(o+"/vstatus-wire.json")); s=json.load(open(o+"/wire-scan.json"))
keys=["fuse_writes","fuse_bytes_written","fuse_discards","put_calls","clear_calls","bytes_sent","bytes_cleared"]
r={k:w.get(k) for k in keys}; r.update(s)
r["sent_ratio"]=r["bytes_sent"]/r["nonzero_bytes"]
r["calls"]=r["put_calls"]+r["clear_calls"]
r["azure_s"]=max(r["bytes_sent"]/(60<<20), r["calls"]/500)
print(json.dumps(r)); open(o+"/wire.json","w").write(json.dumps(r))
PY
