#!/usr/bin/env python3
"""bench/report.py RESDIR results.json results.md: medians of the runs made
by bench/run.sh, every figure also as a ratio to its same-run baselines."""
import glob, json, os, re, statistics, sys

res, out_json, out_md = sys.argv[1:4]
med = lambda v: statistics.median(v) if v else None
def load(p):
    try:
        with open(p) as f: return json.load(f)
    except Exception: return None
def r(x, d=2):
    return None if x is None else round(x, d)
def ratio(a, b):
    return None if not a or not b else a / b

R = {"machine": load(os.path.join(res, "machine.json"))}
md = []

# 1. write path -------------------------------------------------------------
runs = {}
for p in glob.glob(os.path.join(res, "w-*.json")):
    m = re.match(r"w-(\w+)-(raw|ext4)-(seq|rand)-(\d+)\.json", os.path.basename(p))
    j = load(p)
    if not m or not j: continue
    w = j["jobs"][0]["write"]; pc = w["clat_ns"].get("percentile", {})
    runs.setdefault(m.group(1, 2, 3), []).append(
        (w["bw"] / 1024, w["iops"], pc.get("50.000000", 0) / 1e3, pc.get("99.000000", 0) / 1e3))
write = {}
for (t, mode, wl), v in runs.items():
    write.setdefault(f"{mode}-{wl}", {})[t] = {
        "n": len(v), "mibs": med([x[0] for x in v]), "iops": med([x[1] for x in v]),
        "p50_us": med([x[2] for x in v]), "p99_us": med([x[3] for x in v]),
        "mibs_runs": [round(x[0], 1) for x in v]}
if write:
    R["write"] = write
    if os.path.exists(os.path.join(res, "s3backer_flags")):
        R["s3backer_flags"] = open(os.path.join(res, "s3backer_flags")).read().strip()
    md += ["## 1. Write path (fio, direct I/O; medians of alternating repetitions)", "",
           "| workload | target | MiB/s | IOPS | p50 µs | p99 µs | ÷ local | ÷ null-FUSE | ÷ passthrough | ÷ s3backer |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in ["raw-seq", "raw-rand", "ext4-seq", "ext4-rand"]:
        d = write.get(row, {})
        key = "mibs" if row.endswith("seq") else "iops"
        s3 = max([d[k][key] for k in ["s3backer", "s3b128k"] if k in d] or [0])
        for t in ["vhdsync", "local", "null", "pass", "s3backer", "s3b128k"]:
            if t not in d: continue
            x = d[t]
            rats = [ratio(x[key], d.get(b, {}).get(key)) for b in ["local", "null", "pass"]] + [ratio(x[key], s3)]
            x["ratios"] = dict(zip(["local", "null", "pass", "s3backer"], [r(q, 3) for q in rats]))
            md.append(f"| {row} | {t} | {x['mibs']:.0f} | {x['iops']:.0f} | {x['p50_us']:.0f} | {x['p99_us']:.0f} | "
                      + " | ".join("-" if q is None else f"{q:.2f}" for q in rats) + " |")
    md += ["", "raw = the file itself (first 2 GiB); ext4 = ext4 on a loop device (direct I/O) on the second half of the same file. "
           "seq = 1 MiB writes, iodepth 8 (ratio of MiB/s); rand = 4 KiB random writes, iodepth 32 (ratio of IOPS). "
           "pass = the null-FUSE server passing each request through to a local file (one buffered pwrite per write, fdatasync per flush): "
           "the ceiling of any FUSE disk that keeps its data in a local file. "
           "s3backer (4 KiB blocks) and s3b128k (128 KiB blocks, sequential only); ÷ s3backer is against the better of the two. Flags: "
           + "; ".join(f"`{l}`" for l in R.get("s3backer_flags", "").splitlines()), ""]

# 2. fsync --------------------------------------------------------------------
for prefix, key, title in [("f", "fsync", "## 2. fsync after a 4 KiB write (psync, direct, fsync=1), on stage 1's mounts (vhdsync: remote detached, tens of GB journaled)"),
                           ("fl", "fsync_live", "## 2b. fsync after a 4 KiB write, fresh mounts, vhdsync with a live remote (Azurite on the same CPUs)")]:
    fs = {}
    for p in glob.glob(os.path.join(res, prefix + "-*.json")):
        m = re.match(prefix + r"-(\w+)-raw-fsync-(\d+)\.json", os.path.basename(p)); j = load(p)
        if not m or not j: continue
        jj = j["jobs"][0]; pc = jj["sync"]["lat_ns"].get("percentile", {})
        fs.setdefault(m.group(1), []).append((pc.get("50.000000", 0) / 1e3, pc.get("99.000000", 0) / 1e3, jj["write"]["iops"]))
    if not fs: continue
    R[key] = {t: {"p50_us": med([x[0] for x in v]), "p99_us": med([x[1] for x in v]), "write_fsync_per_s": med([x[2] for x in v]),
                  "p99_us_runs": [round(x[1]) for x in v]} for t, v in fs.items()}
    loc = R[key].get("local", {})
    md += [title, "",
           "| target | fsync p50 µs | fsync p99 µs | p99 ÷ local | write+fsync /s | p99 of each run |", "|---|---:|---:|---:|---:|---|"]
    for t in ["vhdsync", "local", "null", "pass", "s3backer"]:
        if t in R[key]:
            x = R[key][t]; q = ratio(x["p99_us"], loc.get("p99_us"))
            md.append(f"| {t} | {x['p50_us']:.0f} | {x['p99_us']:.0f} | {'-' if q is None else f'{q:.2f}'} | {x['write_fsync_per_s']:.0f} | {', '.join(map(str, x['p99_us_runs']))} |")
    md.append("")

# 5. memory ---------------------------------------------------------------------
mem = {}
for name in ["write", "lag", "backlog"]:
    p = os.path.join(res, f"mem-{name}.txt")
    if os.path.exists(p):
        for line in open(p):
            k, v = line.split(":"); mem[f"{name}_{k.strip()}_MiB"] = int(v.split()[0]) / 1024
vs = load(os.path.join(res, "vstatus-write.json"))
if vs: mem["write_journal_disk_bytes_end"] = vs.get("journal_disk_bytes")
lagpeak = 0
if os.path.exists(os.path.join(res, "lag.txt")):
    lagv = []
    for line in open(os.path.join(res, "lag.txt")):
        a = line.split()
        if len(a) == 2: lagv.append(float(a[0])); lagpeak = max(lagpeak, int(a[1]))
    if lagv:
        lagv.sort(); q = lambda f: lagv[min(len(lagv) - 1, int(f * len(lagv)))]
        R["lag"] = {"samples": len(lagv), "p50_s": q(0.5), "p99_s": q(0.99), "max_s": lagv[-1],
                    "rate_mibs": float(open(os.path.join(res, "lag-rate.txt")).read())}
        ceil = load(os.path.join(res, "lag-ceiling.json"))
        if ceil:
            R["lag"]["ceiling_random64k_mibs"] = ceil.get("mib_per_second")
        mem["lag_journal_disk_bytes_peak"] = lagpeak
vb = load(os.path.join(res, "vstatus-backlog.json"))
if vb: mem["backlog_journal_disk_bytes_after_fio"] = vb.get("journal_disk_bytes")
if mem:
    R["memory"] = mem

# 3. flush --------------------------------------------------------------------
fl = load(os.path.join(res, "flush.json"))
if fl:
    R["flush"] = fl
    by = {}
    for x in fl["results"]: by.setdefault(x["rtt"], {})[x["config"]] = x["median_mibs"]
    md += [f"## 3. Flush path: draining {fl['size_bytes'] >> 20} MiB of random data from the journal to Azurite", "",
           "| RTT | config | MiB/s | ÷ single-threaded 4 MiB loop | ÷ server ceiling (best raw) |", "|---|---|---:|---:|---:|"]
    ceil = {}
    for rtt, d in by.items():
        ceil[rtt] = max([v for k, v in d.items() if k.startswith("raw-")] or [0])
        for k, v in d.items():
            a, b = ratio(v, d.get("single-4MiB")), ratio(v, ceil[rtt])
            md.append(f"| {rtt} | {k} | {v:.0f} | {a:.2f} | {b:.2f} |")
    R["flush_ceiling_mibs"] = ceil
    md.append("")
    # for the lag stage: a list of ceilings, no-latency first
    fl["ceiling_mibs"] = [ceil.get("0", 0)]
    with open(os.path.join(res, "flush.json"), "w") as f: json.dump(fl, f)

# 4. wire -----------------------------------------------------------------------
ws = load(os.path.join(res, "vstatus-wire.json")); sc = load(os.path.join(res, "wire-scan.json"))
if ws:
    w = {k: ws.get(k) for k in ["fuse_writes", "fuse_bytes_written", "fuse_discards", "fuse_fsyncs", "put_calls", "clear_calls",
                                 "sequence_calls", "bytes_sent", "bytes_cleared"]}
    if sc: w.update(sc)
    R["wire"] = w
    md += ["## 4. Wire efficiency: mkfs.ext4 (4 GiB), copy Go's src, delete half, fstrim, unmount", "",
           "| what | vhdsync | one Put Page per FUSE write | ideal |", "|---|---:|---:|---:|",
           f"| bytes sent in Put Page | {w['bytes_sent']} | {w['fuse_bytes_written']} | {w.get('nonzero_bytes','-')} |",
           f"| Put Page calls | {w['put_calls']} | {w['fuse_writes']} | {w.get('ideal_put_calls','-')} |",
           f"| bytes cleared / Clear calls | {w['bytes_cleared']} / {w['clear_calls']} | (discards: {w['fuse_discards']}) | |",
           f"| sent ÷ ideal | {ratio(w['bytes_sent'], w.get('nonzero_bytes')) or 0:.3f} | {ratio(w['fuse_bytes_written'], w.get('nonzero_bytes')) or 0:.3f} | 1 |",
           f"| calls ÷ ideal | {ratio(w['put_calls'], w.get('ideal_put_calls')) or 0:.3f} | {ratio(w['fuse_writes'], w.get('ideal_put_calls')) or 0:.3f} | 1 |", ""]

if mem or "lag" in R:
    md += ["## 5/6. Memory, journal, replica lag (64 GiB virtual size)", "", "| figure | value |", "|---|---:|"]
    for k, v in mem.items():
        md.append(f"| {k} | {v:.0f} |" if isinstance(v, (int, float)) else f"| {k} | {v} |")
    for k, v in R.get("lag", {}).items():
        md.append(f"| lag {k} | {v} |")
    md.append("")

# 7. burst, outage, steady ---------------------------------------------------------
def fio_write(p):
    """fio's write figures and the region it wrote over (size option)."""
    j = load(p)
    try:
        jj = j["jobs"][0]; w = jj["write"]
    except Exception:
        return None
    size = str(jj.get("job options", {}).get("size") or (j.get("global options") or {}).get("size") or "0")
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    m = re.match(r"(\d+)([kmgt])?", size.lower())
    region = int(m.group(1)) * mult.get(m.group(2) or "", 1) if m else 0
    return {"io_bytes": w.get("io_bytes", 0), "mibs": w.get("bw", 0) / 1024, "iops": w.get("iops", 0),
            "runtime_s": w.get("runtime", 0) / 1000, "region_bytes": region,
            # fio's random map writes each block of the region once per pass
            "distinct_bytes": min(w.get("io_bytes", 0), region) if region else w.get("io_bytes", 0)}
def delta(a, b, k):
    """counter k from status a to status b (None where either lacks it)."""
    if not a or not b or k not in a or k not in b: return None
    return b[k] - a[k]
def load_lines(p):
    out = []
    try:
        for line in open(p):
            try: out.append(json.loads(line))
            except ValueError: pass
    except OSError: pass
    return out
def quant(v, f):
    v = sorted(v); return v[min(len(v) - 1, int(f * len(v)))] if v else None
def blob_of(j, name):
    """a proxy stats / wire summary entry for the blob bench/NAME.vhd"""
    for k, v in ((j or {}).get("blobs") or {}).items():
        if k.endswith(f"/bench/{name}.vhd"): return v
    return None
def drained_figures(prefix, distinct):
    """the drain of stage PREFIX: counters from its start, at the workload's
    end and at the drain's end (or give-up), and the ratios to distinct bytes."""
    st, fe, dr = (load(os.path.join(res, f"{prefix}-{x}.json")) for x in ("start", "fioend", "drain"))
    if not (st or fe or dr): return None
    dr = dr or {}
    last = dr.get("last") or {}
    # drained: None when the drain was not recorded
    d = {"drained": bool(dr.get("drained")) if "drained" in dr else None, "drain_limit_s": dr.get("limit_s")}
    d["drain_seconds"] = dr.get("seconds") if d["drained"] else None
    d["gave_up_after_s"] = None if d["drained"] else dr.get("seconds")
    d["pending_bytes_at_fio_end"] = (fe or {}).get("journal_bytes")
    d["pending_records_at_fio_end"] = (fe or {}).get("journal_records")
    d["pending_bytes_left"] = None if d["drained"] else last.get("journal_bytes")
    for k in ("bytes_sent", "put_calls", "clear_calls", "sequence_calls", "retries", "throttled"):
        d[k] = delta(st, last, k)
        d[k + "_in_drain"] = delta(fe, last, k)
    reqs = None if d["put_calls"] is None else d["put_calls"] + (d["clear_calls"] or 0)
    d["requests"] = reqs
    d["requests_in_drain"] = None if d["put_calls_in_drain"] is None else d["put_calls_in_drain"] + (d["clear_calls_in_drain"] or 0)
    sent = d["bytes_sent"]
    d["requests_per_gib_sent"] = r(ratio(reqs, sent and sent / (1 << 30)), 1)
    sd = d["bytes_sent_in_drain"]
    d["requests_per_gib_sent_in_drain"] = r(ratio(d["requests_in_drain"], sd and sd / (1 << 30)), 1)
    d["sent_over_distinct"] = r(ratio(sent, distinct), 3)
    for k in ("requests_per_second", "mib_per_second", "catch_up_seconds"):
        if k in (fe or {}): d[k + "_at_fio_end"] = fe[k]
    return d
def add_wire(d, prefix, name):
    w = blob_of(load(os.path.join(res, f"{prefix}-wire.json")), name)
    if w:
        t, a = w.get("total", {}), w.get("after", {})
        d["wire"] = {"requests": t.get("requests"), "throttled": t.get("throttled"), "timed_out": t.get("timed_out"),
                     "put_pages": t.get("put_pages"), "clear_pages": t.get("clear_pages"), "bytes_put": t.get("bytes_put"),
                     "requests_in_drain": a.get("requests"), "throttled_in_drain": a.get("throttled")}
    p = blob_of(load(os.path.join(res, f"{prefix}-proxy.json")), name)
    if p: d["proxy"] = p
def mib(x): return "-" if x is None else f"{x / (1 << 20):.0f}"
def num(x, f="{:.1f}"): return "-" if x is None else f.format(x)

burst = {}
for v in ["bare", "throttled", "ext4"]:
    fw = fio_write(os.path.join(res, f"burst-{v}-fio.json"))
    if not fw: continue
    d = {"fio": fw, "distinct_bytes": fw["distinct_bytes"]}
    d.update(drained_figures(f"burst-{v}", fw["distinct_bytes"]) or {})
    raw = load(os.path.join(res, f"burst-{v}-raw.json"))
    if raw and raw.get("mib_per_second"):
        d["raw_mibs"] = raw["mib_per_second"]
        # the baseline: the span the burst touched (its region: random 4 KiB
        # writes over a quarter of it or more touch every 4 MiB of it) as
        # 4 MiB Put Pages at rawput's rate; and its distinct 4 KiB blocks
        # alone, a stricter figure no 4 MiB uploader reaches
        d["span_bytes"] = fw["region_bytes"] or fw["distinct_bytes"]
        d["raw_seconds"] = d["span_bytes"] / (raw["mib_per_second"] * (1 << 20))
        d["raw_distinct_seconds"] = fw["distinct_bytes"] / (raw["mib_per_second"] * (1 << 20))
    if d.get("drain_seconds") is not None:
        d["total_seconds"] = fw["runtime_s"] + d["drain_seconds"]
        d["drain_over_raw"] = r(ratio(d["drain_seconds"], d.get("raw_seconds")), 2)
        d["drain_over_raw_distinct"] = r(ratio(d["drain_seconds"], d.get("raw_distinct_seconds")), 2)
    elif d.get("gave_up_after_s") is not None:
        # not drained: a lower bound
        d["drain_over_raw_at_least"] = r(ratio(d["gave_up_after_s"], d.get("raw_seconds")), 2)
    add_wire(d, f"burst-{v}", f"burst{v}")
    burst[v] = d
lim = load(os.path.join(res, "throttle.json")) or {}
if lim: R["throttle_limits"] = lim
if burst:
    R["burst"] = burst
    md += ["## 7a. Drain after a burst: 4 KiB random writes (iodepth 32, direct) over 1 GiB of a 4 GiB disk, the remote live", "",
           "| variant | fio MiB/s | written MiB | distinct MiB | pending at fio end MiB | drain s | raw s (span) | drain ÷ raw | drain ÷ raw of distinct | Put+Clear calls in the drain (whole run) | calls / GiB sent in the drain | sent ÷ distinct | wire requests / 503 |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for v, d in burst.items():
        fw = d["fio"]
        if d.get("drained"):
            ds, q = f"{d['drain_seconds']:.1f}", num(d.get("drain_over_raw"), "{:.2f}")
        elif d.get("gave_up_after_s") is not None:
            ds = f"not drained at {d['gave_up_after_s']:.0f} ({mib(d.get('pending_bytes_left'))} MiB left)"
            q = num(d.get("drain_over_raw_at_least"), "> {:.1f}")
        else:
            ds, q = "-", "-"
        wi = d.get("wire")
        ws = f"{wi['requests']:,} / {wi['throttled']:,}" if wi else "-"
        md.append(f"| {v} | {fw['mibs']:.0f} | {mib(fw['io_bytes'])} | {mib(d['distinct_bytes'])} | {mib(d.get('pending_bytes_at_fio_end'))} | "
                  f"{ds} | {num(d.get('raw_seconds'))} | {q} | {num(d.get('drain_over_raw_distinct'), '{:.2f}')} | "
                  f"{num(d.get('requests_in_drain'), '{:,}')} ({num(d.get('requests'), '{:,}')}) | {num(d.get('requests_per_gib_sent_in_drain'), '{:,.0f}')} | "
                  f"{num(d.get('sent_over_distinct'), '{:.2f}')} | {ws} |")
    md += ["", "bare = Azurite itself; throttled = through azurite-throttle at a standard page blob's targets "
           f"({lim.get('rps', '-')} req/s, {lim.get('mibps', '-')} MiB/s per blob), the baseline through it too; "
           "ext4 = the same fio on a 1 GiB file (laid out before) of ext4 on a loop device over the .img, bare Azurite. "
           "drain = from fio's end to `vhdsync unmount` done (the journal on the blob, lease released); "
           "raw = the span the burst touched (the 1 GiB region: random 4 KiB writes over a quarter of it or more touch every 4 MiB of it) "
           "as 4 MiB Put Pages, 8 in flight, at the rate rawput measured first on the same quiet emulator; "
           "raw of distinct = the distinct 4 KiB blocks alone at that rate, a stricter figure no 4 MiB uploader reaches. "
           "distinct = the blocks fio's random map covered (at most 1 GiB; ext4's metadata not counted). "
           "Calls in the drain and calls per GiB sent in the drain count from fio's end; the whole run's calls and bytes sent "
           "are the daemon's counters from the mount to the drain's end (or the give-up); "
           "wire requests count every request to the blob at the proxy, refused ones included.", ""]

fw = fio_write(os.path.join(res, "outage-fio.json"))
if fw:
    d = {"fio": fw, "distinct_bytes": fw["distinct_bytes"]}
    d.update(drained_figures("outage", fw["distinct_bytes"]) or {})
    win = load(os.path.join(res, "outage-window.json")) or {}
    if win:
        d["outage_at_s"] = r(win["stop"] - win["fio_start"], 1); d["outage_s"] = r(win["cont"] - win["stop"], 1)
    smp = load_lines(os.path.join(res, "outage-samples.jsonl"))
    if smp:
        d["peak_pending_bytes"] = max(s.get("journal_bytes", 0) for s in smp)
        d["peak_lag_s"] = max(s.get("lag_seconds", 0) for s in smp)
        if win:
            at = [s for s in smp if s["t"] <= win["cont"]]
            if at: d["pending_bytes_at_resume"] = at[-1].get("journal_bytes")
    raw = load(os.path.join(res, "outage-raw.json"))
    if raw and raw.get("mib_per_second"):
        d["raw_mibs"] = raw["mib_per_second"]
        d["raw_seconds"] = fw["distinct_bytes"] / (raw["mib_per_second"] * (1 << 20))
    if d.get("drain_seconds") is not None:
        d["drain_over_raw"] = r(ratio(d["drain_seconds"], d.get("raw_seconds")), 2)
    elif d.get("gave_up_after_s") is not None:
        d["drain_over_raw_at_least"] = r(ratio(d["gave_up_after_s"], d.get("raw_seconds")), 2)
    R["outage"] = d
    if d.get("drained"):
        ds, q = f"{d['drain_seconds']:.1f}", num(d.get("drain_over_raw"), "{:.2f}")
    elif d.get("gave_up_after_s") is not None:
        ds, q = f"not drained at {d['gave_up_after_s']:.0f} ({mib(d.get('pending_bytes_left'))} MiB left)", num(d.get("drain_over_raw_at_least"), "> {:.1f}")
    else:
        ds, q = "-", "-"
    md += [f"## 7b. Drain after an outage: {fw['runtime_s']:.0f} s of 16 KiB random writes (iodepth 16, direct) over {mib(fw['region_bytes'])} MiB, "
           f"Azurite frozen (SIGSTOP) {d.get('outage_at_s', '-')} s in for {d.get('outage_s', '-')} s", "",
           "| figure | value |", "|---|---:|",
           f"| fio MiB/s / written MiB | {fw['mibs']:.0f} / {mib(fw['io_bytes'])} |",
           f"| distinct MiB | {mib(d['distinct_bytes'])} |",
           f"| journal pending at resume / peak MiB | {mib(d.get('pending_bytes_at_resume'))} / {mib(d.get('peak_pending_bytes'))} |",
           f"| lag peak s | {num(d.get('peak_lag_s'))} |",
           f"| journal pending at fio end MiB | {mib(d.get('pending_bytes_at_fio_end'))} |",
           f"| drain s (fio end to unmount done) | {ds} |",
           f"| raw s (distinct as 4 MiB Put Pages, rawput {num(d.get('raw_mibs'), '{:.0f}')} MiB/s) | {num(d.get('raw_seconds'))} |",
           f"| drain ÷ raw | {q} |",
           f"| bytes sent MiB (in the drain) | {mib(d.get('bytes_sent'))} ({mib(d.get('bytes_sent_in_drain'))}) |",
           f"| bytes sent ÷ distinct | {num(d.get('sent_over_distinct'), '{:.2f}')} |",
           f"| Put+Clear calls (in the drain) | {num(d.get('requests'), '{:,}')} ({num(d.get('requests_in_drain'), '{:,}')}) |", ""]

def steady_figures(name):
    """the steady stage NAME: lag percentiles, the journal's trend, the drain."""
    smp = load_lines(os.path.join(res, f"{name}-samples.jsonl"))
    fw = fio_write(os.path.join(res, f"{name}-fio.json"))
    if not (smp or fw): return None
    d = {"fio": fw, "limits": load(os.path.join(res, f"{name}-limits.json")) or lim}
    lag = [s.get("lag_seconds", 0) for s in smp]
    d.update({"samples": len(smp), "lag_p50_s": quant(lag, 0.5), "lag_p99_s": quant(lag, 0.99), "lag_max_s": max(lag) if lag else None})
    if smp:
        at10 = min(smp, key=lambda s: abs(s["rel"] - 10))
        d["pending_bytes_at_10s"] = at10.get("journal_bytes")
        d["pending_bytes_end"] = smp[-1].get("journal_bytes")
        late = [(s["rel"], s.get("journal_bytes", 0)) for s in smp if s["rel"] >= 10]
        if len(late) >= 2:
            mx = sum(x for x, _ in late) / len(late); my = sum(y for _, y in late) / len(late)
            den = sum((x - mx) ** 2 for x, _ in late)
            d["pending_slope_bytes_per_s"] = sum((x - mx) * (y - my) for x, y in late) / den if den else 0
            # growing: the journal gains over a MiB per 10 s after the first 10 s
            d["journal_growing"] = d["pending_slope_bytes_per_s"] * 10 > (1 << 20)
        for k in ("throttled", "requests_per_second", "mib_per_second", "catch_up_seconds"):
            vals = [s[k] for s in smp if k in s]
            if vals: d[f"daemon_{k}_last"] = vals[-1]
    fe = load(os.path.join(res, f"{name}-fioend.json"))
    if fe:
        d["pending_bytes_at_fio_end"] = fe.get("journal_bytes")
        if d.get("pending_bytes_end") is None: d["pending_bytes_end"] = fe.get("journal_bytes")
    dr = drained_figures(name, fw["distinct_bytes"] if fw else None)
    if dr: d.update({k: dr[k] for k in ("drained", "drain_seconds", "gave_up_after_s", "pending_bytes_left", "bytes_sent", "requests", "throttled")})
    ps = load(os.path.join(res, f"{name}-proxy.json"))
    if ps:
        d["proxy_total"] = ps.get("total")
        b = blob_of(ps, name)
        if b: d["proxy_blob"] = b
        d["proxy_throttled"] = (b or ps.get("total") or {}).get("throttled")
    return d

steady_rows = []
for name, scale in (("steady", "Azure's targets"), ("steadyhalf", "half scale")):
    d = steady_figures(name)
    if not d: continue
    R[name] = d
    fw, L = d["fio"], d["limits"] or {}
    fiops = f"{fw['iops']:.0f}" if fw else "-"
    grow = {True: "growing", False: "not growing"}.get(d.get("journal_growing"), "-")
    if d.get("pending_slope_bytes_per_s") is not None: grow += f" ({d['pending_slope_bytes_per_s'] / 1024:+.0f} KiB/s)"
    dsec = num(d.get("drain_seconds")) if d.get("drained") else (f"not drained at {d['gave_up_after_s']:.0f}" if d.get("gave_up_after_s") is not None else "-")
    steady_rows.append(f"| {scale}: {L.get('rps', '-')} req/s, {L.get('mibps', '-')} MiB/s, {L.get('region_mib', '-')} MiB region | {L.get('iops', '-')} / {fiops} | "
           f"{num(d['lag_p50_s'], '{:.2f}')} | {num(d['lag_p99_s'], '{:.2f}')} | {num(d['lag_max_s'], '{:.2f}')} | "
           f"{num(d.get('pending_bytes_at_10s') and d['pending_bytes_at_10s'] / (1 << 20), '{:.1f}')} | "
           f"{num(d.get('pending_bytes_end') and d['pending_bytes_end'] / (1 << 20), '{:.1f}')} | {grow} | "
           f"{num(d.get('proxy_throttled'), '{:,}')} | {num(d.get('daemon_throttled_last'), '{:,}')} | {dsec} |")
if steady_rows:
    md += ["## 7c. Replica lag at Azure's limits: 8 KiB random writes at a fixed rate through azurite-throttle", "",
           "| limits per blob, hot region | target IOPS / achieved | lag p50 s | lag p99 s | lag max s | pending at 10 s MiB | pending at end MiB | journal | proxy 503s | daemon throttled | drain s |",
           "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"] + steady_rows + ["",
           "Lag (the age of the oldest write the blob lacks) and the journal's pending bytes are sampled every second from "
           "`vhdsync status --json`; growing = the pending bytes' trend after the first 10 s exceeds 1 MiB per 10 s. "
           "drain = from fio's end to `vhdsync unmount` done. Half scale halves the limits, the IOPS and the region: the same "
           "writes per MiB per second and the same cost of a request in bytes, so the same batches and the same send times "
           "on a server that keeps up with 30 MiB/s but not 60.", ""]

# 1b. a database's writes on ext4 ---------------------------------------------------
def fio_db(p):
    j = load(p)
    try:
        jj = j["jobs"][0]; w = jj["write"]; sy = (jj.get("sync") or {}).get("lat_ns") or {}
    except Exception:
        return None
    return {"iops": w.get("iops"), "fdatasync_p99_ms": ((sy.get("percentile") or {}).get("99.000000") or 0) / 1e6,
            "write_p99_ms": (((w.get("clat_ns") or {}).get("percentile") or {}).get("99.000000") or 0) / 1e6}
db = {}
for t in ("pass", "vhdsync"):
    runs = [x for x in (fio_db(os.path.join(res, f"db-{t}-{i}.json")) for i in range(1, 10)) if x]
    if runs:
        med = lambda k: sorted(r[k] for r in runs)[len(runs) // 2]
        db[t] = {"reps": len(runs), "iops": med("iops"), "fdatasync_p99_ms": med("fdatasync_p99_ms"), "write_p99_ms": med("write_p99_ms")}
if db:
    R["db"] = db
    p_, v_ = db.get("pass") or {}, db.get("vhdsync") or {}
    md += ["## 1b. A database's writes: 8 jobs of random 8 KiB writes, each followed by fdatasync, on ext4 on a loop device (remote detached)", "",
           "| target | repetitions | writes/s (median) | fdatasync p99 ms | write p99 ms |", "|---|---:|---:|---:|---:|"]
    for t, d in (("passthrough FUSE", p_), ("vhdsync", v_)):
        if d: md.append(f"| {t} | {d['reps']} | {d['iops']:,.0f} | {d['fdatasync_p99_ms']:.2f} | {d['write_p99_ms']:.2f} |")
    md += ["", f"vhdsync ÷ passthrough: throughput {num(ratio(v_.get('iops'), p_.get('iops')), '{:.2f}')}, "
           f"fdatasync p99 {num(ratio(v_.get('fdatasync_p99_ms'), p_.get('fdatasync_p99_ms')), '{:.2f}')}x. Medians of alternating repetitions.", ""]

# 8. synchronous replication -----------------------------------------------------------
def fio_sync(p):
    """write+fsync pairs per second and the fsync latency percentiles (ms)"""
    j = load(p)
    try:
        jj = j["jobs"][0]; w = jj["write"]; sy = jj["sync"]["lat_ns"]
    except Exception:
        return None
    pc = sy.get("percentile") or {}
    g = lambda k: pc.get(k) and pc[k] / 1e6
    return {"pairs_per_second": w.get("iops"), "fsync_p50_ms": g("50.000000"), "fsync_p99_ms": g("99.000000"),
            "write_p50_ms": ((w.get("clat_ns") or {}).get("percentile") or {}).get("50.000000", 0) / 1e6}
sync_rows = []
for rtt in ("0", "20"):
    pp = load(os.path.join(res, f"sync-{rtt}-putpage.json"))
    for target, sfx in (("disk (.img)", ""), ("ext4, a file each", "ext4-")):
      for jobs in ("1", "16"):
        row = {}
        for mode in ("writeback", "sync"):
            f = fio_sync(os.path.join(res, f"sync-{rtt}-{mode}-{sfx}{jobs}.json"))
            if f: row[mode] = f
        if not row: continue
        row["putpage"] = pp
        R.setdefault("sync", {})[f"rtt{rtt}_{sfx}jobs{jobs}"] = row
        wb, sy = row.get("writeback") or {}, row.get("sync") or {}
        rt = (pp or {}).get("p50_ms")
        sync_rows.append(f"| {rtt} | {target} | {jobs} | {num(rt, '{:.1f}')} | {num(wb.get('pairs_per_second'), '{:,.0f}')} | {num(sy.get('pairs_per_second'), '{:,.0f}')} | "
                         f"{num(ratio(sy.get('pairs_per_second'), wb.get('pairs_per_second')), '{:.2f}')} | "
                         f"{num(wb.get('fsync_p50_ms'), '{:.2f}')} / {num(wb.get('fsync_p99_ms'), '{:.2f}')} | "
                         f"{num(sy.get('fsync_p50_ms'), '{:.1f}')} / {num(sy.get('fsync_p99_ms'), '{:.1f}')} | "
                         f"{num(ratio(sy.get('fsync_p50_ms'), rt), '{:.1f}')} |")
if sync_rows:
    md += ["## 8. Synchronous replication (`mount --sync`): fio write+fsync pairs (4 KiB random, `fsync=1`)", "",
           "| added RTT ms | target | writers | Put Page RTT p50 ms | write-back pairs/s | sync pairs/s | sync ÷ write-back | write-back fsync p50 / p99 ms | sync fsync p50 / p99 ms | sync fsync p50 ÷ Put Page RTT |",
           "|---:|---|---:|---:|---:|---:|---:|---|---|---:|"] + sync_rows + ["",
           "Put Page RTT: one 4 KiB Put Page at a time (rawput, no journal) through azurite-throttle with that much delay added "
           "to every request and no limits; the same proxy serves both mounts. disk: direct writes to the mount's .img; ext4: "
           "ext4 on a loop device over the .img, each writer on its own file. A synchronous fsync waits for the batch holding its "
           "writes: a batch of one epoch until its Put Pages land, a batch of several until its even mark. FUSE holds the "
           "file's lock while an fsync runs, so the disk's barriers (and the writes behind them) go one at a time; ext4 "
           "commits many writers' fsyncs with one flush.", ""]

m = R.get("machine") or {}
head = [f"# vhdsync benchmarks ({m.get('date','')}, commit {m.get('commit','')})", "",
        f"Machine: {m.get('nproc')} CPUs ({m.get('cpu','')}), `free -g`: {m.get('mem','')}, kernel {m.get('kernel')}, disk: {m.get('disk','')}; "
        f"{m.get('fio','')}, {m.get('s3backer','')}; {m.get('reps')} repetitions of {m.get('runtime_s')} s per fio run.", ""]
with open(out_json, "w") as f: json.dump(R, f, indent=1, default=lambda o: None)
with open(out_md, "w") as f: f.write("\n".join(head + md) + "\n")
