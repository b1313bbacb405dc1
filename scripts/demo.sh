#!/usr/bin/env bash
# The main job on the embedded default: a local Azurite started here, a
# 1 GiB VHD created on it and mounted, its .img attached with losetup, ext4
# made and filled with a tree of files, everything unmounted (the journal
# drains), verified, and the blob downloaded and judged by qemu-img and
# e2fsck. Everything it starts or attaches is undone on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "make demo needs root (FUSE mount, losetup, mount)"; exit 1; }
work=$(mktemp -d /tmp/vhdsync-demo.XXXXXX)
bin=$PWD/bin/vhdsync
azpid= loop= bloop=
cleanup() {
  set +e
  mountpoint -q "$work/fs" && umount "$work/fs"
  mountpoint -q "$work/check" && umount "$work/check"
  [ -n "$loop" ] && losetup -d "$loop" 2>/dev/null
  [ -n "$bloop" ] && losetup -d "$bloop" 2>/dev/null
  if grep -q " $work/mnt " /proc/mounts; then "$bin" unmount "$work/mnt" >/dev/null 2>&1 || umount -l "$work/mnt"; fi
  [ -n "$azpid" ] && kill "$azpid" 2>/dev/null && wait "$azpid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
step() { printf '\n== %s\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

go build -o "$work/azurite-run" ./internal/azurite/cmd/azurite-run
go build -o "$work/azurite-get" ./internal/azurite/cmd/azurite-get
"$work/azurite-run" --port 0 --location "$work/azurite" --endpoint-file "$work/endpoint" --log "$work/azurite.log" >/dev/null &
azpid=$!
for _ in $(seq 1 600); do [ -s "$work/endpoint" ] && break; kill -0 "$azpid" || exit 1; sleep 0.1; done
ep=$(cat "$work/endpoint")
blob="$ep/demo/demo.vhd"
mkdir -p "$work/mnt" "$work/fs" "$work/check"
step "Azurite (the emulator) answers at $ep"

step "create a 1 GiB disk: page blob + state directory"
run "$bin" create --blob "$blob" --size 1GiB --state "$work/state" --create-container

step "mount it: two views of one disk"
run "$bin" mount --state "$work/state" "$work/mnt"
run ls -l "$work/mnt"

step "attach the raw view with losetup, make ext4, copy a tree of files"
loop=$(losetup --find --show "$work/mnt/demo.img"); echo "$loop"
run mkfs.ext4 -q -L demo "$loop"
run mount "$loop" "$work/fs"
src=$(go env GOROOT)/src/net
cp -r "$src" "$work/fs/net"
(cd "$work/fs" && find net -type f -print0 | sort -z | xargs -0 sha256sum) > "$work/hashes"
echo "copied $(wc -l < "$work/hashes") files ($(du -sh "$work/fs/net" | cut -f1)) from $src"
sync
run "$bin" status --state "$work/state"

step "unmount everything; vhdsync unmount drains the journal to the blob"
run umount "$work/fs"
run losetup -d "$loop"; loop=
run "$bin" unmount "$work/mnt"

step "verify: local image vs blob"
run "$bin" verify --state "$work/state"

step "download the blob with the Azure SDK (independent of vhdsync) and judge it"
run "$work/azurite-get" "$blob" "$work/blob.vhd"
run qemu-img info -f vpc "$work/blob.vhd"
run "$bin" inspect "$work/blob.vhd" | tail -1
bloop=$(losetup --find --show --read-only --sizelimit $((1<<30)) "$work/blob.vhd")
run e2fsck -fn "$bloop"
run mount -o ro,noload "$bloop" "$work/check"
(cd "$work/check" && sha256sum --quiet -c "$work/hashes") && echo "all $(wc -l < "$work/hashes") file hashes match in the blob's filesystem"
umount "$work/check"; losetup -d "$bloop"; bloop=

step "summary"
echo "blob $blob: valid fixed VHD of 1 GiB, ext4 clean, $(wc -l < "$work/hashes") files identical, local image == blob"
