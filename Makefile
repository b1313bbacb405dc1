# vhdsync build, tests and demo. `make demo` and `make test` are the two
# commands of the README's quick start; both install what they need.
SHELL := /bin/bash
GO ?= go
APT_PKGS := qemu-utils fuse3 fio e2fsprogs
# command -> package, for the "install where missing" check
APT_CMDS := qemu-img:qemu-utils fusermount3:fuse3 fio:fio e2fsck:e2fsprogs mkfs.ext4:e2fsprogs
AZURITE := tools/azurite/node_modules/.bin/azurite-blob
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)

# make install puts vhdsync in $(DESTDIR)$(PREFIX)/bin.
PREFIX ?= /usr/local

.PHONY: all deps build install test demo bench soak vet fmt clean install-service

all: build

## deps: Debian packages (where missing) and the pinned Azurite (npm ci)
deps: $(AZURITE)
	@missing=""; for p in $(APT_CMDS); do c=$${p%%:*}; pkg=$${p##*:}; \
	  command -v $$c >/dev/null 2>&1 || [ -x /usr/sbin/$$c ] || [ -x /sbin/$$c ] || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  if [ "$$(id -u)" != 0 ]; then echo "need root to apt-get install$$missing (run as root or install them)"; exit 1; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$(echo $$missing | tr ' ' '\n' | sort -u) >/dev/null; \
	fi

$(AZURITE): tools/azurite/package.json tools/azurite/package-lock.json
	@command -v npm >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then echo "installing: nodejs npm"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null; \
	  else echo "npm is missing: apt-get install nodejs npm (as root)"; exit 1; fi; }
	cd tools/azurite && npm ci --no-audit --no-fund --loglevel=error
	@touch $(AZURITE)

## build: bin/vhdsync, and bin/azurite-run (the emulator for the README's walk-through)
build:
	@mkdir -p bin
	$(GO) build -ldflags "-X main.version=$(VERSION)" -o bin/vhdsync ./cmd/vhdsync
	$(GO) build -o bin/azurite-run ./internal/azurite/cmd/azurite-run

## install: bin/vhdsync to $(DESTDIR)$(PREFIX)/bin (PREFIX=/usr/local by default)
install: build
	install -D -m 0755 bin/vhdsync $(DESTDIR)$(PREFIX)/bin/vhdsync

## install-service (root): the binary in $(PREFIX)/bin, the systemd unit
## vhdsync@.service in $(UNITDIR) (its paths set to $(PREFIX)), /etc/vhdsync
## for the instances' settings and secrets, and the mount(8) helpers
## /sbin/mount.fuse.vhdsync and /sbin/umount.fuse.vhdsync (symlinks to the
## binary) that /etc/fstab lines of type fuse.vhdsync need. DESTDIR stages it.
UNITDIR ?= /etc/systemd/system
install-service: build
	install -D -m 0755 bin/vhdsync $(DESTDIR)$(PREFIX)/bin/vhdsync
	install -d -m 0755 $(DESTDIR)$(UNITDIR) $(DESTDIR)/sbin
	sed 's#/usr/local/bin/vhdsync#$(PREFIX)/bin/vhdsync#g' dist/systemd/vhdsync@.service > $(DESTDIR)$(UNITDIR)/vhdsync@.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/vhdsync@.service
	ln -sfn $(PREFIX)/bin/vhdsync $(DESTDIR)/sbin/mount.fuse.vhdsync
	ln -sfn $(PREFIX)/bin/vhdsync $(DESTDIR)/sbin/umount.fuse.vhdsync
	install -d -m 0700 $(DESTDIR)/etc/vhdsync
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi

vet:
	$(GO) vet ./...
	@unformatted=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$unformatted" ]; then echo "not gofmt-ed: $$unformatted"; exit 1; fi

## test: everything CI checks
test: deps vet
	$(GO) test -race -count=1 -timeout 15m ./...

demo: deps build
	./scripts/demo.sh

## bench: the benchmarks of BENCHMARKS.md (root; fio and s3backer installed where
## missing); writes bench/results.json and bench/results.md. Knobs:
## BENCH_REPS, BENCH_RUNTIME, BENCH_SKIP, BENCH_RTT, BENCH_FLUSH_SIZE,
## BENCH_BURST_DRAIN_LIMIT and the rest in bench/run.sh's header.
bench: deps build
	@command -v s3backer >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" != 0 ]; then echo "need root to apt-get install s3backer"; exit 1; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq s3backer >/dev/null; }
	./bench/run.sh

## soak: the long reliability run of RELIABILITY.md, about DURATION in all (default 10m): half a
## kill -9 loop, half rounds of network faults and throttling storms each lasting FAULT_WINDOW
## (default 60s); then the crash-state checker for CRASH_DURATION (default
## 2m; e2fsck at every fsync; needs ~4 GiB of memory for 3 minutes); prints
## the RELIABILITY.md rows and keeps soak.log.
DURATION ?= 10m
FAULT_WINDOW ?= 60s
CRASH_DURATION ?= 2m
soak: deps build
	@set -o pipefail; VHDSYNC_SOAK_DURATION=$(DURATION) VHDSYNC_FAULT_WINDOW=$(FAULT_WINDOW) VHDSYNC_CRASH_DURATION=$(CRASH_DURATION) \
	  $(GO) test -count=1 -timeout 0 -v -run '^(TestE2EKill9Loop|TestE2ENetworkFaults|TestE2ECrashStates)$$' ./cmd/vhdsync/ > soak.log 2>&1; rc=$$?; \
	  echo "soak DURATION=$(DURATION) FAULT_WINDOW=$(FAULT_WINDOW) (log: soak.log)"; \
	  echo "| kill -9 loop | cycles | writes acknowledged | journal records replayed | in-flight writes landed | acknowledged writes lost | slots differing |"; \
	  grep -h 'RELIABILITY | kill' soak.log | sed 's/.*RELIABILITY //'; \
	  echo "| fault | lasted | writes+fsyncs during it | journal records at its end | throttled answers (503 / 500) | failed to the user | converged after its end | acknowledged bytes lost | bytes differing |"; \
	  grep -h 'RELIABILITY |' soak.log | grep -v 'kill -9' | grep -v 'crash states' | sed 's/.*RELIABILITY //'; \
	  grep -h 'RELIABILITY | crash states' soak.log | sed 's/.*RELIABILITY //'; \
	  grep -E '^(--- |ok|FAIL)' soak.log; exit $$rc

## powercut: the power-cut loop of RELIABILITY.md for DURATION (default 10m):
## the daemon's state directory on internal/powercut, ext4 on the disk,
## cuts at random and at chosen moments (MOMENT="<name>" makes every cut
## at that one); then the same loop on a thin-attached disk for THIN_DURATION
## (default 2m), then the journal's own power-cut cycles for JOURNAL_DURATION
## (default 2m). Prints the RELIABILITY.md rows and keeps powercut.log.
JOURNAL_DURATION ?= 2m
THIN_DURATION ?= 2m
MOMENT ?=
powercut: deps build
	@set -o pipefail; rc=0; VHDSYNC_POWERCUT_DURATION=$(DURATION) VHDSYNC_POWERCUT_MOMENT="$(MOMENT)" \
	  $(GO) test -count=1 -timeout 0 -v -run '^TestE2EPowerCut$$' ./cmd/vhdsync/ > powercut.log 2>&1 || rc=$$?; \
	  VHDSYNC_THIN_POWERCUT_DURATION=$(THIN_DURATION) VHDSYNC_POWERCUT_MOMENT="$(MOMENT)" \
	  $(GO) test -count=1 -timeout 0 -v -run '^TestE2EThinPowerCut$$' ./cmd/vhdsync/ >> powercut.log 2>&1 || rc=$$?; \
	  VHDSYNC_POWERCUT_DURATION=$(JOURNAL_DURATION) $(GO) test -count=1 -timeout 0 -v -run '^TestJournalPowerCut$$' ./journal/ >> powercut.log 2>&1 || rc=$$?; \
	  echo "powercut DURATION=$(DURATION) THIN_DURATION=$(THIN_DURATION) JOURNAL_DURATION=$(JOURNAL_DURATION) (log: powercut.log)"; \
	  grep -h 'RELIABILITY |' powercut.log | sed 's/.*RELIABILITY //'; \
	  grep -h 'power-cut loop memory' powercut.log | sed 's/.*powercut_test.go:[0-9]*: //'; \
	  grep -E '^(--- |ok|FAIL)' powercut.log; exit $$rc

clean:
	rm -rf bin
