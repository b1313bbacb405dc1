# bench/ab/lib.sh: sourced by the A/B scripts (rand4k.sh, db.sh, cost.sh), which start with ab_setup.
#
# ab_setup NAME OLD_BIN NEW_BIN: the work directory $work (/var/tmp/ab-NAME.*) with the Azurite
# launcher and nullfuse built into it; BIN (old and new: the two builds, as absolute paths), and the
# arrays and pids the functions below fill (VPID, FILE, AZ, PASSPID, NULLPID).
ab_setup() {
  work=$(mktemp -d /var/tmp/ab-$1.XXXXXX)
  go build -o $work/azurite-run ./internal/azurite/cmd/azurite-run
  go build -o $work/nullfuse ./bench/cmd/nullfuse
  local old new
  old=$(realpath "$2"); new=$(realpath "$3")
  declare -gA BIN=([old]=$old [new]=$new) VPID=() FILE=()
  AZ=() PASSPID= NULLPID=
}
#
# ab_mount V SIZE: a fresh Azurite for build V, a SIZE disk created on it and mounted at
# $work/V/mnt (journal cap 48 GiB, plus the mount flags in MOUNTARGS[V] if the script declares
# that array); sets VPID[V] and FILE[V] (the mount's .img). The Azurite is killed after the
# mount (the remote detached, as bench/run.sh stage 1) unless AB_LIVE=1.
declare -A MOUNTARGS  # a script may fill it (db.sh); empty keeps every mount's flags as they were
ab_mount() {
  local v=$1 size=$2 d=$work/$1 a
  mkdir -p $d/mnt
  $work/azurite-run --port 0 --location $d/az --endpoint-file $d/ep >/dev/null 2>&1 & a=$!; AZ+=($a)
  for _ in $(seq 600); do [ -s $d/ep ] && break; sleep 0.1; done
  ${BIN[$v]} create --blob "$(cat $d/ep)/bench/$v.vhd" --size $size --state $d/st --create-container >/dev/null 2>&1
  ${BIN[$v]} mount --state $d/st --journal-cap 48GiB ${MOUNTARGS[$v]:-} $d/mnt >/dev/null 2>&1
  VPID[$v]=$(${BIN[$v]} status --state $d/st --json | python3 -c 'import json,sys;print(json.load(sys.stdin)["pid"])')
  [ -n "${AB_LIVE:-}" ] || kill $a
  FILE[$v]=$d/mnt/$v.img
}

# ab_pass SIZE: the passthrough FUSE server (nullfuse --backing, plus PASSARGS) with a SIZE file
# at $work/pass/pass.img; sets PASSPID and FILE[pass].
ab_pass() {
  mkdir -p $work/pass
  $work/nullfuse --size $1 --name pass --backing $work/pass-backing.img ${PASSARGS:-} $work/pass >/dev/null 2>&1 & PASSPID=$!
  for _ in $(seq 100); do [ -e $work/pass/pass.img ] && break; sleep 0.1; done
  FILE[pass]=$work/pass/pass.img
}

# ab_cleanup: the EXIT trap of the A/B scripts: kills both builds' daemons, the null and
# passthrough servers (NULLPID, PASSPID, when set) and the Azurites, unmounts what they
# served, and removes $work. A script with more to undo (file systems, loop devices) does that
# first, then calls it.
ab_cleanup() { set +e
  for v in old new; do [ -n "${VPID[$v]:-}" ] && kill -9 ${VPID[$v]}; done; sleep 0.5
  for v in old new; do grep -q " $work/$v/mnt " /proc/mounts && umount -l $work/$v/mnt; done
  for p in ${NULLPID:-} ${PASSPID:-}; do kill $p; done; sleep 0.3
  for m in null pass; do grep -q " $work/$m " /proc/mounts && umount -l $work/$m; done
  for p in "${AZ[@]}"; do kill $p 2>/dev/null; done; wait 2>/dev/null; rm -rf $work; }
