#!/usr/bin/env bash
# The main job on the embedded default: a local Azurite started here, a 1 GiB
# VHD created on it, inspected, downloaded by an independent client and
# judged by qemu-img. Everything it starts is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d /tmp/vhdsync-demo.XXXXXX)
pid=
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

go build -o "$work/azurite-run" ./internal/azurite/cmd/azurite-run
"$work/azurite-run" --location "$work/azurite" --endpoint-file "$work/endpoint" --log "$work/azurite.log" >/dev/null &
pid=$!
for _ in $(seq 1 600); do [ -s "$work/endpoint" ] && break; kill -0 "$pid" || exit 1; sleep 0.1; done
ep=$(cat "$work/endpoint")
blob="$ep/demo/demo.vhd"
echo "== Azurite answers at $ep"

set -x
bin/vhdsync create --blob "$blob" --size 1GiB --state "$work/state" --create-container
bin/vhdsync inspect "$blob"
ls -ls "$work/state"
bin/vhdsync create --blob "$blob" --size 1GiB --state "$work/state2" || echo "(refused as expected, exit $?)"
{ set +x; } 2>/dev/null

echo "== downloading the blob with the Azure SDK (a client independent of vhdsync) and judging it with qemu-img"
go run ./internal/azurite/cmd/azurite-get "$blob" "$work/demo.vhd"
qemu-img info -f vpc "$work/demo.vhd"
truncate -s 1G "$work/zero.raw"
qemu-img compare -f vpc -F raw "$work/demo.vhd" "$work/zero.raw"
echo "== demo complete"
