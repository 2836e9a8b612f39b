#!/usr/bin/env python3
"""Side-by-side benchmark of `nip serve` against nginx serving the same files statically (the
physical limit for a hit), in one run on 127.0.0.1. Writes BENCHMARKS.md and bench/results.json
with absolute figures, medians, spread and ratios. Bounded: every load loop has a fixed duration.
Usage (from bench/run.sh): run.py NIP_BINARY [--quick]"""
import http.client, json, os, platform, re, socket, statistics, subprocess, sys, tempfile, time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
QUICK = "--quick" in sys.argv
NIP = sys.argv[1]
COUNT, BIG_MIB, DURATION, REPEATS = (2000, 64, 5, 3) if QUICK else (10000, 256, 10, 5)
KEY = "upstream-test-1:1OKmiPyTgRWbLRn0o6A1BS5hkdKbzvU7/rZ1nzddr/s="

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

def wait_up(port, path="/nix-cache-info"):
    for _ in range(300):
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2); c.request("GET", path)
            if c.getresponse().status == 200: return
        except OSError: pass
        time.sleep(0.1)
    raise SystemExit(f"server on {port} did not come up")

def upload_all(port, data):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    for line in open(f"{data}/uploads.txt"):
        h, nar = line.split()
        for path, file in ((f"/nar/{nar}", f"{data}/cache/nar/{nar}"), (f"/{h}.narinfo", f"{data}/cache/{h}.narinfo")):
            with open(file, "rb") as f:
                body = f.read()
            c.request("PUT", path, body=body)
            r = c.getresponse(); r.read()
            if r.status != 200: raise SystemExit(f"upload {path}: HTTP {r.status}")

def wrk(port, paths):
    out = subprocess.run(["wrk", "-t2", "-c50", f"-d{DURATION}s", "--latency", "-s", f"{HERE}/paths.lua",
                          f"http://127.0.0.1:{port}"], env={**os.environ, "PATHS": paths},
                         capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    p99_ms = float(p99.group(1)) * {"us": 0.001, "ms": 1, "s": 1000}[p99.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rps, p99_ms, int(errors.group(1)) if errors else 0

def download(port, path):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    t = time.perf_counter(); c.request("GET", path); r = c.getresponse(); n = 0
    while True:
        b = r.read(1 << 20)
        if not b: break
        n += len(b)
    return n, time.perf_counter() - t

def throughput(port, path, parallel):
    t = time.perf_counter()
    with ThreadPoolExecutor(parallel) as ex:
        sizes = [n for n, _ in ex.map(lambda _: download(port, path), range(parallel))]
    return sum(sizes) / (time.perf_counter() - t) / (1 << 20)

def rss_peak_mib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"): return int(line.split()[1]) / 1024

def summary(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}

def main():
    work = tempfile.mkdtemp(prefix="nip-bench-")
    data = f"{work}/data"
    subprocess.run([sys.executable, f"{HERE}/mkdata.py", data, str(COUNT), str(BIG_MIB)], check=True)
    nginx_port, nip_port = free_port(), free_port()
    nginx = subprocess.Popen(["bash", f"{HERE}/run-nginx-static.sh", str(nginx_port), f"{data}/cache"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    nip = subprocess.Popen([NIP, "serve", "--cache-data-path", f"{work}/nip", "--server-addr", f"127.0.0.1:{nip_port}",
                            "--cache-allow-put-verb", "--upstream-cache", "http://127.0.0.1:9",
                            "--upstream-public-key", KEY, "--log-level", "warn"],
                           stdout=subprocess.DEVNULL, stderr=open(f"{work}/nip.log", "w"))
    try:
        wait_up(nginx_port); wait_up(nip_port)
        upload_all(nip_port, data)
        big = open(f"{data}/big.txt").read().strip()
        results = {}
        for name, port in (("nginx", nginx_port), ("nip", nip_port)):
            runs = [wrk(port, f"{data}/narinfos.txt") for _ in range(REPEATS)]
            results[name] = {
                "narinfo_rps": summary([r[0] for r in runs]),
                "narinfo_p99_ms": summary([r[1] for r in runs]),
                "narinfo_errors": sum(r[2] for r in runs),
                "big_1_mib_s": summary([throughput(port, big, 1) for _ in range(REPEATS)]),
                "big_8_mib_s": summary([throughput(port, big, 8) for _ in range(REPEATS)]),
            }
        results["nip"]["peak_rss_mib"] = rss_peak_mib(nip.pid)
    finally:
        nip.terminate(); nginx.terminate()
        nip.wait(); nginx.wait()
    ratio = lambda k: results["nip"][k]["median"] / results["nginx"][k]["median"]
    report = {
        "mode": "quick" if QUICK else "full", "narinfos": COUNT, "big_mib": BIG_MIB, "duration_s": DURATION,
        "repeats": REPEATS, "machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
        "nginx": subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip(),
        "nip": subprocess.run([NIP, "--version"], capture_output=True, text=True).stdout.strip()},
        "results": results,
        "ratios": {"P2 narinfo hits req/s nip/nginx": ratio("narinfo_rps"),
                   "P1 big download 1 client nip/nginx": ratio("big_1_mib_s"),
                   "P1 big download 8 clients nip/nginx": ratio("big_8_mib_s")},
    }
    json.dump(report, open(f"{HERE}/results.json", "w"), indent=2)
    write_markdown(report)
    print(json.dumps(report["ratios"], indent=2))

def write_markdown(r):
    n, g = r["results"]["nip"], r["results"]["nginx"]
    fmt = lambda s: f"{s['median']:.0f} ({s['min']:.0f}–{s['max']:.0f})"
    target = lambda ratio, want: "met" if ratio >= want else f"**missed** ({ratio:.2f}× vs ≥{want}×)"
    rows = [
        ("P2 narinfo hits, wrk 2 threads × 50 connections, req/s", fmt(n["narinfo_rps"]), fmt(g["narinfo_rps"]),
         r["ratios"]["P2 narinfo hits req/s nip/nginx"], target(r["ratios"]["P2 narinfo hits req/s nip/nginx"], 0.8)),
        (f"P1 {r['big_mib']} MiB cached NAR, 1 client, MiB/s", fmt(n["big_1_mib_s"]), fmt(g["big_1_mib_s"]),
         r["ratios"]["P1 big download 1 client nip/nginx"], target(r["ratios"]["P1 big download 1 client nip/nginx"], 0.9)),
        (f"P1 {r['big_mib']} MiB cached NAR, 8 clients, MiB/s total", fmt(n["big_8_mib_s"]), fmt(g["big_8_mib_s"]),
         r["ratios"]["P1 big download 8 clients nip/nginx"], target(r["ratios"]["P1 big download 8 clients nip/nginx"], 0.9)),
    ]
    lines = [
        "# Benchmarks", "",
        f"Written by `bench/run.sh{' --quick' if r['mode'] == 'quick' else ''}` (mode {r['mode']}): `nip serve` (release build) and nginx",
        "serving the same files (sendfile) on 127.0.0.1 in the same run. Medians of "
        f"{r['repeats']} runs with min–max in brackets; {r['narinfos']} distinct narinfos; machine: {r['machine']['cpus']} CPUs, "
        f"kernel {r['machine']['kernel']}, {r['machine']['nginx']}, {r['machine']['nip']}. The load generator runs on the same 2 cores,",
        "so absolute figures are low and noisy; the ratios are what to read.", "",
        "| scenario | nip | nginx | nip/nginx | target |", "|---|---|---|---|---|",
    ] + [f"| {a} | {b} | {c} | {d:.2f} | {e} |" for a, b, c, d, e in rows] + [
        "", f"nip narinfo p99 latency: {n['narinfo_p99_ms']['median']:.1f} ms (nginx {g['narinfo_p99_ms']['median']:.1f} ms); "
        f"non-2xx answers: nip {n['narinfo_errors']}, nginx {g['narinfo_errors']}; nip peak RSS over the whole run: {n['peak_rss_mib']:.0f} MiB.", "",
        "Not measured yet (issue 8): P3 misses through the proxy, P4 RSS under mixed 1 GiB load, P5 uploads against",
        "turborepo-remote-cache and the Flask reference, P6 1 M-entry index, P7 `nip build`, criterion micro-benchmarks.", "",
    ]
    open(os.path.join(ROOT, "BENCHMARKS.md"), "w").write("\n".join(lines))

main()
