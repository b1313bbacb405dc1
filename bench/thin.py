#!/usr/bin/env python3
"""Helpers of bench/thin.sh (the thin-attach stage of make bench).

  thin.py source FILE PLAN --disk-gib N --data-mib M [--seed S]
      a sparse raw disk FILE of N GiB holding M MiB of random data in
      scattered extents of 4-64 MiB (MiB-aligned, so not all aligned to the
      4 MiB chunks); the extents go to PLAN (JSON)
  thin.py iolog PLAN IMG LOG
      a fio iolog (version 2): one 4 KiB read inside each 4 MiB chunk that
      holds data, at a data-holding offset, in a shuffled order
  thin.py wait-complete --bin B --state DIR --samples OUT [--limit S]
      polls DIR/vhdsync.json until it no longer says "thin" (every 0.1 s;
      `status --json` every 0.5 s into OUT); prints the epoch time at which
      it saw the disk complete; exit 1 past the limit
  thin.py fio-lat FIO.json
      prints the clat p50/p99/mean in microseconds of a fio JSON (as JSON)
  thin.py wire WIRE.jsonl
      the requests in a azurite-throttle wire log, by kind, and the bytes of
      data the ranged reads asked for (as JSON)
  thin.py report RES OUT.json OUT.md
      bench/results-thin.{json,md} from the raw results in RES
"""
import json
import os
import random
import statistics
import subprocess
import sys
import time

MiB = 1 << 20
CHUNK = 4 * MiB


def load(p, default=None):
    try:
        with open(p) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def cmd_source(args):
    path, plan_path = args[0], args[1]
    disk_gib = int(args[args.index("--disk-gib") + 1])
    data_mib = int(args[args.index("--data-mib") + 1])
    seed = int(args[args.index("--seed") + 1]) if "--seed" in args else 23
    rnd = random.Random(seed)
    sizes, left = [], data_mib
    while left > 0:
        s = rnd.randint(4, 64)
        if left - s < 4:
            s = left
        sizes.append(s)
        left -= s
    free = disk_gib * 1024 - data_mib
    # n+1 gaps summing to free: cut points in [0, free]
    cuts = sorted(rnd.randint(0, free) for _ in range(len(sizes)))
    gaps = [cuts[0]] + [cuts[i] - cuts[i - 1] for i in range(1, len(cuts))]
    extents, off = [], 0
    for g, s in zip(gaps, sizes):
        off += g
        extents.append([off * MiB, s * MiB])
        off += s
    with open(path, "wb") as f:
        f.truncate(disk_gib << 30)
        for o, n in extents:
            f.seek(o)
            for p in range(0, n, CHUNK):
                f.write(os.urandom(min(CHUNK, n - p)))
    with open(plan_path, "w") as f:
        json.dump({"disk_bytes": disk_gib << 30, "data_bytes": data_mib * MiB, "extents": extents, "seed": seed}, f)


def data_chunks(plan):
    """{chunk index: [(off, end)] of data inside it}"""
    ch = {}
    for o, n in plan["extents"]:
        e = o + n
        for c in range(o // CHUNK, (e - 1) // CHUNK + 1):
            ch.setdefault(c, []).append((max(o, c * CHUNK), min(e, (c + 1) * CHUNK)))
    return ch


def cmd_iolog(args):
    plan, img, log = load(args[0]), args[1], args[2]
    rnd = random.Random(plan.get("seed", 23) + 1)
    reads = []
    for c, parts in sorted(data_chunks(plan).items()):
        o, e = rnd.choice(parts)
        reads.append(o + 4096 * rnd.randrange((e - o) // 4096))
    rnd.shuffle(reads)
    with open(log, "w") as f:
        f.write("fio version 2 iolog\n%s add\n%s open\n" % (img, img))
        for o in reads:
            f.write("%s read %d 4096\n" % (img, o))
        f.write("%s close\n" % img)
    print(len(reads))


def cmd_wait_complete(args):
    b = args[args.index("--bin") + 1]
    st = args[args.index("--state") + 1]
    out = args[args.index("--samples") + 1]
    limit = float(args[args.index("--limit") + 1]) if "--limit" in args else 900
    t0 = time.time()
    last = 0.0
    with open(out, "a") as f:
        while time.time() - t0 < limit and os.path.isdir(st):
            j = load(os.path.join(st, "vhdsync.json"))
            if j is not None and not j.get("thin"):
                print("%.6f" % time.time())
                return 0
            if time.time() - last >= 0.5:
                last = time.time()
                r = subprocess.run([b, "status", "--state", st, "--json"], capture_output=True, text=True)
                try:
                    s = json.loads(r.stdout)
                    f.write(json.dumps({"t": last, "thin": s.get("thin")}) + "\n")
                    f.flush()
                except ValueError:
                    pass
            time.sleep(0.1)
    return 1


def fio_lat(p):
    j = load(p)
    r = j["jobs"][0]["read"]
    pc = r["clat_ns"]["percentile"]
    return {"ios": r["total_ios"], "p50_us": pc["50.000000"] / 1000, "p99_us": pc["99.000000"] / 1000,
            "mean_us": r["clat_ns"]["mean"] / 1000, "max_us": r["clat_ns"]["max"] / 1000}


def wire(p):
    kinds, data, n = {}, 0, 0
    with open(p) as f:
        for line in f:
            w = json.loads(line)
            n += 1
            k = w["method"] + (" comp=" + w["comp"] if w.get("comp") else "")
            if w.get("range"):
                k += " ranged"
                a, b = w["range"].split("=")[-1].split("-")
                if w["method"] == "GET" and not w.get("comp"):
                    data += int(b) - int(a) + 1
            kinds[k] = kinds.get(k, 0) + 1
    return {"requests": n, "by_kind": kinds, "data_bytes_asked": data}


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def cmd_report(args):
    res, oj, om = args
    R = {"machine": load(os.path.join(res, "machine.json"), {}),
         "source": load(os.path.join(res, "source.json"), {})}
    plan = load(os.path.join(res, "plan.json"), {})
    R["source"]["extents"] = len(plan.get("extents", []))
    R["source"]["data_chunks"] = len(data_chunks(plan)) if plan else None
    # a. create --thin
    c = load(os.path.join(res, "create.json"), {})
    st = load(os.path.join(res, "create-proxy-stats.json"), {})
    blob = {}
    for k, v in (st.get("blobs") or {}).items():
        blob = v
    c["proxy_total"] = st.get("total")
    c["proxy_blob"] = blob
    c["proxy_note"] = "proxy bytes charge a ranged GET its whole range: the page-range list's range is the disk"
    try:
        import re
        mt = re.search(r"(\d+) page ranges holding", open(os.path.join(res, "create.log")).read())
        c["page_ranges"] = int(mt.group(1)) if mt else None
    except OSError:
        c["page_ranges"] = None
    if os.path.exists(os.path.join(res, "create-wire.jsonl")):
        c["wire"] = wire(os.path.join(res, "create-wire.jsonl"))
    direct = []
    for i in range(1, 10):
        t = load(os.path.join(res, "prefetch-%d.json" % i))
        if t and t.get("create_s") is not None:
            direct.append(t["create_s"])
    c["direct_s"] = direct
    R["create"] = c
    # b. first read
    fr = {}
    if os.path.exists(os.path.join(res, "read-cold.json")):
        fr["cold"] = fio_lat(os.path.join(res, "read-cold.json"))
    if os.path.exists(os.path.join(res, "read-warm.json")):
        fr["local"] = fio_lat(os.path.join(res, "read-warm.json"))
    if "cold" in fr and "local" in fr:
        fr["ratio_p50"] = fr["cold"]["p50_us"] / fr["local"]["p50_us"]
        fr["ratio_p99"] = fr["cold"]["p99_us"] / fr["local"]["p99_us"]
    s = load(os.path.join(res, "read-status.json"), {})
    fr["thin_status_after_cold"] = s.get("thin")
    fr["image_equals_source"] = load(os.path.join(res, "read-cmp.json"), {}).get("equal")
    R["first_read"] = fr
    # c. prefetch vs download
    reps = []
    for i in range(1, 10):
        t = load(os.path.join(res, "prefetch-%d.json" % i))
        d = load(os.path.join(res, "download-%d.json" % i))
        if not t and not d:
            continue
        r = {"rep": i}
        if t:
            r["thin"] = t
            if t.get("complete_s"):
                r["thin_mibs"] = t["allocated_bytes"] / MiB / t["complete_s"]
        if d:
            r["download"] = d
            if d.get("ok"):
                r["download_mibs"] = d["bytes"] / MiB / d["seconds"]
        reps.append(r)
    pm, dm = med([r.get("thin_mibs") for r in reps]), med([r.get("download_mibs") for r in reps])
    R["prefetch"] = {"reps": reps, "thin_mibs_median": pm, "download_mibs_median": dm,
                     "ratio": pm / dm if pm and dm else None}
    with open(oj, "w") as f:
        json.dump(R, f, indent=1)
        f.write("\n")

    m = R["machine"]
    src = R["source"]
    L = []
    L.append("# vhdsync benchmarks: thin attach (%s, commit %s)" % (m.get("date"), m.get("commit")))
    L.append("")
    L.append("Machine: %s CPUs (%s), kernel %s, %s, %s. Shared machine (2 cores, other test runs at the same "
             "time; load average at the start: %s): the figures are noisy, read them as orders of magnitude. "
             "`bench/thin.sh`, raw figures in results-thin.json." % (
                 m.get("nproc"), m.get("cpu", ""), m.get("kernel"), m.get("fio"), m.get("go"), m.get("loadavg", "-")))
    L.append("")
    L.append("Blob: a %d GiB disk (page blob on a private Azurite) holding %d MiB of random data in %s extents of "
             "4-64 MiB at MiB-aligned random offsets (%s chunks of 4 MiB hold data), uploaded with `vhdsync import`."
             % (src.get("disk_bytes", 0) >> 30, src.get("data_bytes", 0) // MiB, src.get("extents"), src.get("data_chunks")))
    L.append("")
    L.append("| measure | thin attach | baseline | ratio | how |")
    L.append("|---|---:|---:|---:|---|")

    def f1(x, nd=1):
        return "-" if x is None else ("%.*f" % (nd, x))

    cw = c.get("wire") or {}
    L.append("| `create --from-blob --thin`, s | %s | - | - | wall time, through azurite-throttle (--rps 0 --mibps 0); "
             "without the proxy (the prefetch reps' creates): %s s |" % (
                 f1(c.get("seconds"), 2), ", ".join(f1(x, 2) for x in direct) or "-"))
    nr = c.get("page_ranges")
    L.append("| what it read from the blob | %s B of page data + 1 page-range list (%s ranges, ~%s B of XML) | - | - | "
             "the proxy's wire log: %s requests (%s); page data = the bytes its ranged Get Blob asked for (the footer); "
             "the proxy does not count the list's answer, estimated at ~60 B per range |" % (
                 cw.get("data_bytes_asked", "-"), nr if nr is not None else "-",
                 (200 + 60 * nr) if nr is not None else "-", cw.get("requests", "-"),
                 ", ".join("%s %d" % kv for kv in sorted((cw.get("by_kind") or {}).items()))))
    if "cold" in fr and "local" in fr:
        L.append("| first read of an unfetched 4 KiB block, p50 / p99 µs | %s / %s | %s / %s (local) | %s / %s | fio psync "
                 "direct 4 KiB reads, one per data chunk (%d reads, shuffled), `--prefetch off`; baseline: the same job "
                 "again, every chunk local |" % (
                     f1(fr["cold"]["p50_us"], 0), f1(fr["cold"]["p99_us"], 0), f1(fr["local"]["p50_us"], 0),
                     f1(fr["local"]["p99_us"], 0), f1(fr["ratio_p50"]), f1(fr["ratio_p99"]), fr["cold"]["ios"]))
    L.append("| prefetch rate, MiB/s (median) | %s | %s (`vhdsync download`) | %s | allocated bytes / time from `mount "
             "--prefetch on` until vhdsync.json no longer says thin; download: wall time of `vhdsync download` of the "
             "same blob (8 workers) |" % (f1(pm), f1(dm), f1(pr := (pm / dm if pm and dm else None), 2)))
    L.append("")
    L.append("Repetitions of the prefetch (alternating with the download):")
    L.append("")
    L.append("| rep | order | create s | thin complete s | thin MiB/s | fetch requests (last status before completion) | download s | download MiB/s | load average (1 min) after thin / download |")
    L.append("|---:|---|---:|---:|---:|---:|---:|---:|---|")
    for r in reps:
        t, d = r.get("thin") or {}, r.get("download") or {}
        L.append("| %d | %s | %s | %s | %s | %s | %s | %s | %s / %s |" % (
            r["rep"], t.get("order", d.get("order", "-")), f1(t.get("create_s"), 2), f1(t.get("complete_s"), 1),
            f1(r.get("thin_mibs")), (t.get("last_status") or {}).get("fetch_requests", "-"),
            f1(d.get("seconds"), 1), f1(r.get("download_mibs")), t.get("loadavg", "-"), d.get("loadavg", "-")))
    L.append("")
    notes = []
    ts = fr.get("thin_status_after_cold")
    if ts:
        notes.append("The cold reads, by `status --json` after them: %d chunks fetched on demand in %d requests "
                     "(%.0f MiB), %.2f s waited in total, %d chunks still missing." % (
                         ts.get("demand_chunks", 0), ts.get("fetch_requests", 0), ts.get("fetched_bytes", 0) / MiB,
                         ts.get("demand_wait_seconds", 0), ts.get("missing_chunks", 0)))
    if fr.get("image_equals_source") is not None:
        notes.append("After the cold reads the local image %s the source file (`cmp`)." %
                     ("equals" if fr["image_equals_source"] else "DIFFERS FROM"))
    for r in reps:
        t = r.get("thin") or {}
        if t.get("image_equals_source") is not None:
            notes.append("Rep %d: after the prefetch the local image %s the source file (`cmp`)." %
                         (r["rep"], "equals" if t["image_equals_source"] else "DIFFERS FROM"))
    if notes:
        L.append(" ".join(notes))
        L.append("")
    with open(om, "w") as f:
        f.write("\n".join(L))


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "source":
        cmd_source(args)
    elif cmd == "iolog":
        cmd_iolog(args)
    elif cmd == "wait-complete":
        sys.exit(cmd_wait_complete(args))
    elif cmd == "fio-lat":
        print(json.dumps(fio_lat(args[0])))
    elif cmd == "wire":
        print(json.dumps(wire(args[0])))
    elif cmd == "report":
        cmd_report(args)
    else:
        sys.exit("unknown command " + cmd)


if __name__ == "__main__":
    main()
