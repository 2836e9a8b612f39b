#!/usr/bin/env python3
"""Side-by-side benchmarks of `nip serve` against its peers (issue 8), in one run on 127.0.0.1:
nginx serving the same files statically (and as the signed upstream for misses), the Flask
reference of the /v1 API under gunicorn, and turborepo-remote-cache. Writes BENCHMARKS.md and
bench/results.json with the machine, versions, medians with min–max over repeats, and ratios to
the targets. Every load loop is bounded in count and time.
Usage (from bench/run.sh): run.py NIP_BINARY [--quick] [--only p1p2,p2b,p3,p4,p5,p5n,p6,p7,p7d,p3c,p8,p2pin,p9,p9far,zstd,criterion]"""
import argparse, datetime, importlib.metadata, json, os, platform, shutil, tempfile, time

import closure, dataset, pinned, report, scenarios
from common import ROOT, version
from peers import Servers

QUICK = dict(narinfos=2000, big_mib=64, duration=3, repeats=3, artifacts=300, misses=60, p4_mib=256,
             heavy_repeats=1, p5_flask_mib=64, index_entries=100_000, p7_mib=32,
             p9_paths=500, p9_big_mib=[10, 20, 30, 40, 50], p9_repeats=2)
FULL = dict(narinfos=10000, big_mib=256, duration=8, repeats=5, artifacts=1000, misses=250, p4_mib=1024,
            heavy_repeats=1, p5_flask_mib=256, index_entries=1_000_000, p7_mib=100,
            p9_paths=500, p9_big_mib=[10, 20, 30, 40, 50], p9_repeats=5)
SCENARIOS = {"p1p2": scenarios.p1_p2_hits, "p2b": scenarios.p2b_artifact_lookups, "p3": scenarios.p3_misses,
             "p4": scenarios.p4_memory, "p5": scenarios.p5_uploads, "p6": scenarios.p6_big_index,
             "p7": scenarios.p7_client, "zstd": scenarios.zstd_on_the_fly,
             "p5n": scenarios.nix_upload_check, "p7d": scenarios.p7d_dead_remote, "p3c": scenarios.p3c_cluster_followers,
             "p8": scenarios.p8_cold_miss, "p2pin": pinned.p2_pinned, "p9": closure.p9_closure,
             "p9far": closure.p9_far_upstream}


class Context:
    """What the scenarios share: parameters, the work directory, the data set and the servers."""

    def __init__(self, params, work, nip_binary, servers, manifest):
        self.__dict__.update(params)
        self.work, self.nip_binary, self.servers, self.manifest = work, nip_binary, servers, manifest
        self.root, self.narinfos = ROOT, manifest["narinfos"]
        self.details, self.raw = [], {}
        self.nip = servers.nip("nip", manifest["public_key"])
        self.nginx = servers.nginx("nginx", manifest["cache"])
        self.flask = servers.flask()
        self.turbo = servers.turbo()


def machine(nip_binary, flask_workers):
    def meta(package):
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "unknown"

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    mem_kib = int(next(l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemTotal")))
    turbo_pkg = "/tmp/nip-bench-turbo/node_modules/turborepo-remote-cache/package.json"
    return {"cpus": os.cpu_count(), "cpu_model": cpu, "memory_gib": mem_kib / (1 << 20), "kernel": platform.release(),
            "nip": version([nip_binary, "--version"]), "nginx": version(["nginx", "-v"]),
            "flask": meta("flask"), "gunicorn": meta("gunicorn"), "gunicorn_workers": flask_workers,
            "turborepo": json.load(open(turbo_pkg))["version"] if os.path.exists(turbo_pkg) else "unknown",
            "node": version(["node", "--version"]), "wrk": version(["wrk", "-v"]).split(" [")[0],
            "curl": " ".join(version(["curl", "--version"]).split()[:2])}


def notes(p, quick):
    scale = "quick mode: smaller sizes than the issue's (said in each row)" if quick else "full mode"
    return [scale, f"{p['narinfos']} distinct narinfos", f"{p['artifacts']} /v1 artifacts",
            f"{p['misses']} distinct misses for P3", f"P4 {p['p4_mib']} MiB", f"P5 64 MiB and {p['p5_flask_mib']} MiB",
            f"P6 {p['index_entries']} index entries", f"P7 {p['p7_mib']} MiB",
            f"P9 {p['p9_paths']} store paths ({'+'.join(map(str, p['p9_big_mib']))} MiB big ones), {p['p9_repeats']} runs"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("nip_binary")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default=",".join(list(SCENARIOS) + ["criterion"]))
    args = ap.parse_args()
    params = QUICK if args.quick else FULL
    only = args.only.split(",")
    start = time.perf_counter()
    work = tempfile.mkdtemp(prefix="nip-bench-")
    try:
        run(args, params, only, start, work)
    finally:
        if not os.environ.get("NIP_BENCH_KEEP"):
            shutil.rmtree(work, ignore_errors=True)


def run(args, params, only, start, work):
    manifest = dataset.make(f"{work}/data", params["narinfos"], params["big_mib"])
    rows, timings = [], {}
    with Servers(work, os.path.abspath(args.nip_binary)) as servers:
        ctx = Context(params, work, os.path.abspath(args.nip_binary), servers, manifest)
        for name in only:
            if name in SCENARIOS:
                t = time.perf_counter()
                print(f"bench: {name} …", flush=True)
                rows += SCENARIOS[name](ctx)
                timings[name] = round(time.perf_counter() - t, 1)
    micro = []
    if "criterion" in only:
        t = time.perf_counter()
        print("bench: criterion …", flush=True)
        try:
            micro = scenarios.criterion(ctx)
        except (Exception, SystemExit) as e:  # the scenarios' figures are still worth writing
            ctx.details.append(f"The criterion benches failed: {e}")
        timings["criterion"] = round(time.perf_counter() - t, 1)
    seconds = time.perf_counter() - start
    ctx.details.append("Seconds per scenario: " + ", ".join(f"{k} {v}" for k, v in timings.items()) + ".")
    result = {"mode": "quick" if args.quick else "full", "params": {**params, "wrk_seconds": params["duration"]},
              "finished": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "seconds": seconds, "machine": machine(args.nip_binary, 2 * os.cpu_count() + 1),
              "notes": notes(params, args.quick), "rows": rows, "details": ctx.details, "criterion": micro,
              "raw": ctx.raw}
    report.write(result)
    for r in rows:
        print(report.row_line(r))
    print(f"bench: done in {seconds:.0f} s; wrote BENCHMARKS.md and bench/results.json")


if __name__ == "__main__":
    main()
