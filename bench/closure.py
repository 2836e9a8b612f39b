"""P9: a whole closure substituted the way Nix fetches it. A fixture closure of about 500
input-addressed store paths (mostly a few KiB, a few of 10–50 MiB random bytes, references between
them, NARs xz and zstd) is built once by the real Nix on this machine (`nix-build` of `/bin/sh`
derivations, no nixpkgs), signed and exported as a binary cache with `nix copy`, and kept in a
directory named after its parameters so later runs reuse it. Each measured run is `nix-store -r
ROOT` into a fresh empty store (`--store DIR`), timed as a process: from nginx serving that cache
(direct), through a fresh nip whose upstream is that nginx (cold), and through a nip that already
fetched the closure once (warm)."""
import http.client, json, os, random, shutil, statistics, subprocess, sys, tempfile, time

from common import MIB, summary
from report import absolute

HERE = os.path.dirname(os.path.abspath(__file__))

FIXTURE_VERSION = 1
CACHE_ROOT = os.environ.get("NIP_BENCH_FIXTURES", os.path.expanduser("~/.cache/nip-bench"))
# Nix's own defaults for the narinfo disk cache (this machine's nix.conf sets both TTLs to 0 for the
# tests, which makes Nix 2.8 GET every narinfo ~5 times); each run gets an empty disk cache anyway.
NIX_DEFAULTS = ["--option", "narinfo-cache-positive-ttl", "2592000", "--option", "narinfo-cache-negative-ttl", "3600"]


def nix_expression(count, big_mib, seed):
    """The fixture as one Nix file: `count` derivations built by /bin/sh (sandbox off), each path
    referring to up to 4 earlier ones (its output names their store paths), the last `len(big_mib)`
    of them carrying that many MiB of random bytes; `root` refers to every path nothing else refers
    to, so its closure is all of them. Returns (text, number of references)."""
    rnd = random.Random(seed)
    small = count - len(big_mib) - 1
    lines = ["let", "  sh = name: script: builtins.derivation {",
             "    inherit name; system = builtins.currentSystem; builder = \"/bin/sh\";",
             "    args = [ \"-c\" script ]; PATH = \"/usr/bin:/bin\";", "  };"]
    referenced, edges = set(), 0
    for i in range(small + len(big_mib)):
        # Big ones refer to early paths only (small closures, like data packages).
        pool = range(min(i, 20)) if i >= small else range(i)
        deps = rnd.sample(pool, min(len(pool), rnd.choice((0, 1, 1, 2, 2, 3, 4)))) if i else []
        referenced.update(deps)
        edges += len(deps)
        refs = " ".join(f"${{p{d}}}" for d in deps)
        if i >= small:  # a big one: a directory with a blob and a file naming its references
            mib = big_mib[i - small]
            script = (f"mkdir -p $out/share; echo '{refs}' > $out/share/refs; "
                      f"head -c {mib * MIB} /dev/urandom > $out/share/blob-{seed}-{i}.bin")
        elif i % 10 == 0:  # a small tree, like a package with bin/ and a symlink
            kib = rnd.randint(1, 16)
            script = (f"mkdir -p $out/bin $out/lib; printf '#!/bin/sh\\necho {refs}\\n' > $out/bin/tool-{i}; "
                      f"chmod +x $out/bin/tool-{i}; head -c {kib * 1024} /dev/urandom | base64 > $out/lib/data; "
                      f"ln -s bin/tool-{i} $out/tool")
        else:  # a small file: some text (compressible), random in part
            kib = rnd.randint(1, 12)
            script = (f"{{ echo 'p9 fixture {seed} {i}: {refs}'; head -c {kib * 1024} /dev/urandom | base64; }} "
                      "> $out")
        lines.append(f"  p{i} = sh \"p9-{i}\" \"{script}\";")
    tops = [i for i in range(small + len(big_mib)) if i not in referenced]
    edges += len(tops)
    lines.append(f"in sh \"p9-root-{seed}\" \"echo '{' '.join(f'${{p{t}}}' for t in tops)}' > $out\"")
    return "\n".join(lines) + "\n", edges


def run_nix(args, env=None, timeout=1800):
    out = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(args[:3])} …: exit {out.returncode}: {out.stderr[-3000:]}")
    return out.stdout


def make_fixture(count, big_mib, xz_every):
    """The signed binary cache of the fixture closure, built once per parameter set under
    CACHE_ROOT (kept between runs; the store paths also stay in /nix/store). Returns its manifest."""
    key = f"p9-v{FIXTURE_VERSION}-n{count}-big{'_'.join(map(str, big_mib))}-xz{xz_every}"
    out = f"{CACHE_ROOT}/{key}"
    if os.path.exists(f"{out}/manifest.json"):
        return {**json.load(open(f"{out}/manifest.json")), "reused": True}
    if shutil.which("nix-store") is None:
        raise SystemExit("P9 needs Nix: run scripts/nix-fixture/install-nix.sh (as root)")
    t = time.perf_counter()
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    work = tempfile.mkdtemp(prefix="p9-fixture-")
    env = {"XDG_CACHE_HOME": f"{work}/xdg"}
    try:
        seed = random.randrange(1 << 30)  # new store paths for each fixture
        text, edges = nix_expression(count, big_mib, seed)
        with open(f"{out}/fixture.nix", "w") as f:
            f.write(text)
        run_nix(["nix-store", "--generate-binary-cache-key", "p9-upstream-1", f"{out}/secret.key", f"{out}/public.key"])
        root = run_nix(["nix-build", f"{out}/fixture.nix", "--no-out-link", "--option", "substituters", ""],
                       env).strip()
        info = json.loads(run_nix(["nix", "path-info", "--json", "-r", root]))
        refs = {i["path"]: [r for r in i["references"] if r != i["path"]] for i in info}
        closure = sorted(refs)
        run_nix(["nix", "store", "sign", "--key-file", f"{out}/secret.key", "-r", root], env)
        cache = f"{out}/cache"
        # A binary cache takes a path only with its references, and nix copy skips the paths the
        # cache has: so the xz part goes first, a set closed under references (the closures of the
        # 1st and 3rd big path and then of small paths, smallest closures first, up to 1/xz_every
        # of all paths), and everything else follows as zstd.
        big = sorted((p for p in closure if os.path.isdir(f"{p}/share")),
                     key=lambda p: sum(e.stat().st_size for e in os.scandir(f"{p}/share")))

        def closure_of(p, seen=None):
            seen = set() if seen is None else seen
            if p not in seen:
                seen.add(p)
                for r in refs[p]:
                    closure_of(r, seen)
            return seen

        xz = set()
        for p in big[0::2] + sorted((p for p in closure if p not in big and p != root),
                                    key=lambda p: len(closure_of(p))):
            more = closure_of(p) | xz
            if p in big or len(more) <= len(closure) // xz_every:
                xz = more
        run_nix(["nix", "copy", "--no-recursive", "--to", f"file://{cache}?compression=xz"]
                + sorted(xz, key=lambda p: len(closure_of(p))), env)
        run_nix(["nix", "copy", "--to", f"file://{cache}?compression=zstd", root], env)
        with open(f"{cache}/nix-cache-info", "w") as f:
            f.write("StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n")
        public_key = open(f"{out}/public.key").read().strip()
        run_nix(["nix", "store", "verify", "--store", f"file://{cache}", "-r", "--option", "trusted-public-keys",
                 public_key, root], env)
        nars = os.listdir(f"{cache}/nar")
        sizes = sorted(os.path.getsize(f"{cache}/nar/{n}") for n in nars)
        manifest = {
            "key": key, "cache": cache, "root": root, "public_key": public_key, "paths": len(closure),
            "references": edges, "nars": len(nars), "xz": sum(n.endswith(".xz") for n in nars),
            "zstd": sum(n.endswith(".zst") for n in nars), "nar_mib": sum(sizes) / MIB,
            "big_mib": list(big_mib), "small_median_kib": statistics.median(sizes[:-len(big_mib)]) / 1024,
            "build_seconds": time.perf_counter() - t}
        if manifest["paths"] != count or manifest["nars"] != count:
            raise SystemExit(f"P9 fixture: {manifest['paths']} paths and {manifest['nars']} NARs, expected {count}")
        with open(f"{out}/manifest.json", "w") as f:
            json.dump(manifest, f, indent=1)
        return {**manifest, "reused": False}
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def substitute(work, url, key, root, timeout=900):
    """`nix-store -r root` into a fresh empty store from `url` trusting only `key`, Nix's defaults
    otherwise (http-connections 25, max-jobs 1); its wall-clock seconds. The store, and Nix's
    narinfo disk cache, are deleted afterwards."""
    d = tempfile.mkdtemp(prefix="p9-store-", dir=work)
    try:
        cmd = ["nix-store", "--store", f"{d}/store", "-r", root, "--option", "substituters", url,
               "--option", "trusted-public-keys", key, "--option", "require-sigs", "true"] + NIX_DEFAULTS
        t = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                             env={**os.environ, "XDG_CACHE_HOME": f"{d}/xdg"})
        seconds = time.perf_counter() - t
        if out.returncode != 0:
            raise SystemExit(f"P9: nix-store -r from {url} failed ({out.returncode}): {out.stderr[-3000:]}")
        valid = subprocess.run(["nix-store", "--store", f"{d}/store", "-qR", root], capture_output=True, text=True,
                               timeout=120, check=True).stdout.split()
        return seconds, len(valid)
    finally:
        subprocess.run(["chmod", "-R", "u+w", d], capture_output=True)
        shutil.rmtree(d, ignore_errors=True)


def log_lines(log):
    with open(log) as f:
        return f.readlines()


def p9_closure(ctx):
    """P9: the fixture closure substituted by Nix 2.8 into a fresh store each run: from nginx
    directly, through a fresh nip (cold: every path a miss fetched from that nginx), and through a
    nip that fetched it once (warm); medians of the runs, interleaved."""
    fx = make_fixture(ctx.p9_paths, ctx.p9_big_mib, 5)
    work = f"{ctx.work}/p9"
    os.makedirs(work, exist_ok=True)
    log = f"{work}/upstream-access.log"
    direct = ctx.servers.nginx("p9-direct", fx["cache"])
    upstream = ctx.servers.nginx("p9-upstream", fx["cache"], access_log=log)
    up = f"http://127.0.0.1:{upstream.port}"
    runs = {"direct": [], "cold": [], "warm": []}
    upstream_requests, warm_requests, warm_nip, valid = [], [], None, set()
    for r in range(ctx.p9_repeats):
        runs["direct"].append(substitute(work, f"http://127.0.0.1:{direct.port}", fx["public_key"], fx["root"]))
        data = f"{work}/nip-cold-{r}-data"
        nip = ctx.servers.nip(f"p9-cold-{r}", fx["public_key"], upstream=up, data_dir=data)
        key = download_text(nip.port, "/pubkey")
        before = len(log_lines(log))
        runs["cold"].append(substitute(work, f"http://127.0.0.1:{nip.port}", key, fx["root"]))
        lines = log_lines(log)[before:]
        upstream_requests.append({"total": len(lines), "narinfo": sum(".narinfo HTTP/" in l for l in lines),
                                  "nar": sum(" /nar/" in l for l in lines),
                                  "other": sum(".narinfo HTTP/" not in l and " /nar/" not in l for l in lines)})
        if warm_nip is None:  # the first cold run's nip, now holding the closure, serves the warm runs
            warm_nip, warm_key = nip, key
        else:
            ctx.servers.stop(nip)
            shutil.rmtree(data, ignore_errors=True)
        warm_before = len(log_lines(log))
        runs["warm"].append(substitute(work, f"http://127.0.0.1:{warm_nip.port}", warm_key, fx["root"]))
        warm_requests.append(len(log_lines(log)) - warm_before)
        for v in runs.values():
            valid.add(v[-1][1])
    for s in (warm_nip, direct, upstream):
        ctx.servers.stop(s)
    if valid != {fx["paths"]}:
        raise SystemExit(f"P9: the fresh stores held {sorted(valid)} paths, expected {fx['paths']}")
    secs = {k: summary([s for s, _ in v]) for k, v in runs.items()}
    per_run = [u["total"] for u in upstream_requests]
    ctx.raw["p9"] = {"fixture": fx, "seconds": secs, "upstream_requests": upstream_requests,
                     "warm_upstream_requests": warm_requests}
    d, c, w = (secs[k]["median"] for k in ("direct", "cold", "warm"))
    u = upstream_requests[0]
    ctx.details.append(
        f"P9 fixture: {fx['paths']} input-addressed store paths with {fx['references']} references, "
        f"{fx['nar_mib']:.0f} MiB of NARs ({fx['xz']} xz, {fx['zstd']} zstd; big ones "
        f"{', '.join(map(str, fx['big_mib']))} MiB of random bytes, small NARs median {fx['small_median_kib']:.1f} KiB), "
        f"built by Nix in {fx['build_seconds']:.0f} s{' (reused from ' + CACHE_ROOT + ')' if fx['reused'] else ''}. "
        f"`nix-store -r` (Nix 2.8, max-jobs 1, http-connections 25) into a fresh store, {ctx.p9_repeats} runs each: "
        f"nginx direct {d:.2f} s, nip cold {c:.2f} s, nip warm {w:.2f} s (warm {d / w:.2f}×, cold {d / c:.2f}× of "
        f"direct). Upstream requests per cold run: {', '.join(map(str, per_run))} ({u['narinfo']} narinfo, "
        f"{u['nar']} NAR, {u['other']} other in the first) for {fx['paths']} paths; {sum(warm_requests)} in the warm runs.")
    fetched = [u["narinfo"] + u["nar"] for u in upstream_requests]
    return [time_versus("P9", f"{fx['paths']}-path closure by `nix-store -r`, warm nip, wall time", secs["warm"],
                        "nginx", secs["direct"], 0.9),
            time_versus("P9", f"{fx['paths']}-path closure by `nix-store -r`, cold nip, wall time", secs["cold"],
                        "upstream direct", secs["direct"], 0.8),
            absolute("P9", f"narinfo + NAR requests to the upstream per cold closure ({fx['paths']} paths)", "",
                     summary(fetched), 2 * fx["paths"])]


FAR_MS = 10


def p9_far_upstream(ctx):
    """P9far: the P9 closure with the upstream one 10 ms round trip away (a relay on loopback
    holds each request 10 ms), as a real binary cache is: Nix straight from it, and through a fresh
    nip in front of it, with and without NAR prefetch; one run each, interleaved."""
    fx = make_fixture(ctx.p9_paths, ctx.p9_big_mib, 5)
    work = f"{ctx.work}/p9far"
    os.makedirs(work, exist_ok=True)
    upstream = ctx.servers.nginx("p9far-upstream", fx["cache"])
    far = ctx.servers._start("p9far-relay", [sys.executable, f"{HERE}/delay_proxy.py", "{port}",
                                             str(upstream.port), str(FAR_MS)])
    up = f"http://127.0.0.1:{far.port}"
    runs = {"direct": [], "cold": [], "cold_no_prefetch": []}
    for r in range(ctx.p9_repeats):
        runs["direct"].append(substitute(work, up, fx["public_key"], fx["root"]))
        for kind, extra in (("cold", ()), ("cold_no_prefetch", ("--cache-prefetch-nar-max-size", "0"))):
            data = f"{work}/nip-{kind}-{r}-data"
            nip = ctx.servers.nip(f"p9far-{kind}-{r}", fx["public_key"], upstream=up, data_dir=data, extra=extra)
            key = download_text(nip.port, "/pubkey")
            runs[kind].append(substitute(work, f"http://127.0.0.1:{nip.port}", key, fx["root"]))
            ctx.servers.stop(nip)
            shutil.rmtree(data, ignore_errors=True)
    for s in (far, upstream):
        ctx.servers.stop(s)
    if {n for v in runs.values() for _, n in v} != {fx["paths"]}:
        raise SystemExit(f"P9far: a fresh store did not hold the {fx['paths']} paths")
    secs = {k: summary([s for s, _ in v]) for k, v in runs.items()}
    ctx.raw["p9far"] = {"seconds": secs, "delay_ms": FAR_MS}
    d, c, n = (secs[k]["median"] for k in ("direct", "cold", "cold_no_prefetch"))
    ctx.details.append(
        f"P9far: the P9 closure from an upstream {FAR_MS} ms away (each request held {FAR_MS} ms by a relay on "
        f"loopback): Nix straight from it {d:.2f} s, through a fresh nip {c:.2f} s ({d / c:.2f}× of direct), "
        f"the same without NAR prefetch {n:.2f} s ({d / n:.2f}×).")
    return [time_versus("P9far", f"{fx['paths']}-path closure, upstream {FAR_MS} ms away, cold nip, wall time",
                        secs["cold"], "upstream direct", secs["direct"], 0.8)]


def time_versus(id_, scenario, nip, peer_name, peer, want):
    """A target stated as a wall-time ratio peer/nip ≥ want (1 = as fast as the peer)."""
    ratio = peer["median"] / nip["median"]
    return {"id": id_, "scenario": scenario, "unit": "s", "nip": nip, "peer": peer_name, "peer_value": peer,
            "ratio": ratio, "target": f"≥{want}× {peer_name} (its time / nip's)", "met": ratio >= want}


def download_text(port, path):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("GET", path)
    r = c.getresponse()
    body = r.read().decode().strip()
    c.close()
    if r.status != 200:
        raise SystemExit(f"GET {path}: HTTP {r.status}")
    return body
