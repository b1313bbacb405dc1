# bench/ab/lib.sh: sourced by the A/B scripts (rand4k.sh, db.sh) after they set work, BIN (an
# associative array of binaries) and the arrays AZ, VPID and FILE.
#
# ab_mount V SIZE: a fresh Azurite for build V, a SIZE disk created on it and mounted at
# $work/V/mnt (journal cap 48 GiB); sets VPID[V] and FILE[V] (the mount's .img). The Azurite is
# killed after the mount (the remote detached, as bench/run.sh stage 1) unless AB_LIVE=1.
ab_mount() {
  local v=$1 size=$2 d=$work/$1 a
  mkdir -p $d/mnt
  $work/azurite-run --port 0 --location $d/az --endpoint-file $d/ep >/dev/null 2>&1 & a=$!; AZ+=($a)
  for _ in $(seq 600); do [ -s $d/ep ] && break; sleep 0.1; done
  ${BIN[$v]} create --blob "$(cat $d/ep)/bench/$v.vhd" --size $size --state $d/st --create-container >/dev/null 2>&1
  ${BIN[$v]} mount --state $d/st --journal-cap 48GiB $d/mnt >/dev/null 2>&1
  VPID[$v]=$(${BIN[$v]} status --state $d/st --json | python3 -c 'import json,sys;print(json.load(sys.stdin)["pid"])')
  [ -n "${AB_LIVE:-}" ] || kill $a
  FILE[$v]=$d/mnt/$v.img
}
