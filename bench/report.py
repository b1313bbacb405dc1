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

m = R.get("machine") or {}
head = [f"# vhdsync benchmarks ({m.get('date','')}, commit {m.get('commit','')})", "",
        f"Machine: {m.get('nproc')} CPUs ({m.get('cpu','')}), `free -g`: {m.get('mem','')}, kernel {m.get('kernel')}, disk: {m.get('disk','')}; "
        f"{m.get('fio','')}, {m.get('s3backer','')}; {m.get('reps')} repetitions of {m.get('runtime_s')} s per fio run.", ""]
with open(out_json, "w") as f: json.dump(R, f, indent=1, default=lambda o: None)
with open(out_md, "w") as f: f.write("\n".join(head + md) + "\n")
