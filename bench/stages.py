#!/usr/bin/env python3
"""Helpers of bench/run.sh's burst, outage and steady stages.

  stages.py sample --bin B --state DIR --out F [--interval 1] [--pid P]
      one JSON line of `vhdsync status --json` every interval (on a fixed
      grid, not drifting) until SIGTERM or until process P ends
  stages.py drain --bin B --state DIR --mnt M --limit S --t0 T --out F
      `vhdsync unmount --timeout S M`, the daemon's counters sampled every
      0.5 s while it waits; F gets the drain's seconds since T (the end of
      the workload, epoch seconds), whether it drained, and the last
      counters (on "not drained": the counters at the give-up). Exit 0
      drained, 3 not drained.
  stages.py waitpid --pid P [--timeout S]
      until process P is gone (pidfd, no polling)
  stages.py wire --log wire.jsonl --t0 T --out F
      azurite-throttle's wire log summed per blob, before and after T
"""
import argparse, json, os, select, signal, subprocess, sys, time
from datetime import datetime

# status fields kept in samples (the whole status is kept at the drain's end)
KEEP = ["lag_seconds", "journal_records", "journal_bytes", "journal_disk_bytes", "blocked_writers", "put_calls",
        "clear_calls", "sequence_calls", "bytes_sent", "bytes_cleared", "retries", "batches", "send_bytes_per_second",
        "fuse_writes", "fuse_bytes_written", "flusher_state", "last_error",
        # newer daemons: read when present
        "throttled", "requests_per_second", "mib_per_second", "catch_up_seconds"]


def status(b, st):
    try:
        p = subprocess.run([b, "status", "--state", st, "--json"], capture_output=True, text=True, timeout=20)
        if p.returncode != 0:
            return None
        j = json.loads(p.stdout)
        return j if j.get("mounted") else None
    except Exception:
        return None


def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def cmd_sample(a):
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    t0 = time.time()
    k = 0
    with open(a.out, "a") as f:
        while not stop and not (a.pid and not alive(a.pid)):
            s = status(a.bin, a.state)
            if s is not None:
                row = {"t": round(time.time(), 3), "rel": round(time.time() - t0, 3)}
                row.update({x: s[x] for x in KEEP if x in s})
                f.write(json.dumps(row) + "\n")
                f.flush()
            k += 1
            # fixed-interval sampling: the next tick of the grid
            d = t0 + k * a.interval - time.time()
            if d > 0 and not stop:
                time.sleep(d)


def cmd_drain(a):
    log = open(a.out + ".log", "w")
    start = status(a.bin, a.state)
    p = subprocess.Popen([a.bin, "unmount", "--timeout", f"{a.limit}s", a.mnt], stdout=log, stderr=subprocess.STDOUT)
    last, n = start, 0
    # a hard stop in case unmount itself hangs (it should give up at the limit)
    hard = time.time() + a.limit + 120
    while True:
        try:
            p.wait(timeout=a.interval)
            break
        except subprocess.TimeoutExpired:
            pass
        if time.time() > hard:
            p.kill()
            p.wait()
            break
        s = status(a.bin, a.state)
        if s is not None:
            last, n = s, n + 1
    t_end = time.time()
    drained = p.returncode == 0
    if not drained:
        # the daemon keeps draining after unmount gives up: its counters now
        s = status(a.bin, a.state)
        if s is not None:
            last = s
    try:
        last_stop = json.load(open(os.path.join(a.state, "last-stop.json")))
    except Exception:
        last_stop = None
    log.close()
    tail = open(a.out + ".log").read().strip().splitlines()[-3:]
    if last:
        last.pop("recovery_points", None)
    out = {"t0": a.t0, "t_unmount": round(t_end, 3), "seconds": round(t_end - a.t0, 2), "drained": drained,
           "rc": p.returncode, "limit_s": a.limit, "samples": n, "last": last, "last_stop": last_stop,
           "unmount_output": tail}
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    sys.exit(0 if drained else 3)


def cmd_waitpid(a):
    try:
        fd = os.pidfd_open(a.pid)
    except ProcessLookupError:
        return
    r, _, _ = select.select([fd], [], [], a.timeout)
    os.close(fd)
    sys.exit(0 if r else 1)


def ts(s):
    return datetime.fromisoformat(s).timestamp()


def cmd_wire(a):
    blobs = {}
    try:
        f = open(a.log)
    except FileNotFoundError:
        f = []
    for line in f:
        try:
            w = json.loads(line)
        except ValueError:
            continue
        b = blobs.setdefault(w["path"], {})
        phase = "after" if ts(w["time"]) >= a.t0 else "before"
        c = b.setdefault(phase, {"requests": 0, "ok": 0, "throttled": 0, "timed_out": 0, "other_errors": 0,
                                 "put_pages": 0, "clear_pages": 0, "bytes_put": 0})
        c["requests"] += 1
        st = w.get("status", 0)
        if st == 503:
            c["throttled"] += 1
        elif st == 500:
            c["timed_out"] += 1
        elif st >= 400 or st == 0:
            c["other_errors"] += 1
        else:
            c["ok"] += 1
            if w.get("method") == "PUT" and w.get("comp") == "page":
                if w.get("request_bytes", 0) > 0:
                    c["put_pages"] += 1
                    c["bytes_put"] += w["request_bytes"]
                else:
                    c["clear_pages"] += 1
    for b in blobs.values():
        tot = {}
        for ph in ("before", "after"):
            for k, v in b.get(ph, {}).items():
                tot[k] = tot.get(k, 0) + v
        b["total"] = tot
    with open(a.out, "w") as f:
        json.dump({"t0": a.t0, "blobs": blobs}, f, indent=1)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample")
    s.add_argument("--bin", required=True); s.add_argument("--state", required=True); s.add_argument("--out", required=True)
    s.add_argument("--interval", type=float, default=1.0); s.add_argument("--pid", type=int, default=0)
    d = sub.add_parser("drain")
    d.add_argument("--bin", required=True); d.add_argument("--state", required=True); d.add_argument("--mnt", required=True)
    d.add_argument("--limit", type=int, required=True); d.add_argument("--t0", type=float, required=True)
    d.add_argument("--out", required=True); d.add_argument("--interval", type=float, default=0.5)
    w = sub.add_parser("waitpid")
    w.add_argument("--pid", type=int, required=True); w.add_argument("--timeout", type=float, default=60)
    l = sub.add_parser("wire")
    l.add_argument("--log", required=True); l.add_argument("--t0", type=float, required=True); l.add_argument("--out", required=True)
    a = ap.parse_args()
    {"sample": cmd_sample, "drain": cmd_drain, "waitpid": cmd_waitpid, "wire": cmd_wire}[a.cmd](a)


if __name__ == "__main__":
    main()
