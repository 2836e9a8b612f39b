"""The scenarios of issue 8. Each takes the run context `ctx` (parameters, work directory, data
manifest, the `Servers` of the run), returns result rows for the report and adds details
(`ctx.details`) and raw figures (`ctx.raw`)."""
import hashlib, http.client, json, os, random, re, shutil, statistics, subprocess, threading, time
from concurrent.futures import ThreadPoolExecutor

from common import (MIB, auth, copy_with_prefix, curl, curl_multipart, curl_parallel, curl_times, download,
                    http_multipart, peak_rss_mib, percentile, reset_peak_rss, summary, throughput, ttfb_ms,
                    wrk_summary)
from peers import TOKEN, cold_start_seconds
from report import absolute, versus
import dataset


def upload_nix(port, cache, entries):
    """PUTs each entry's NAR then its narinfo, as `nix copy` does, on one kept-alive connection
    (with the API key: once a key exists, Nix uploads need one)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    for e in entries:
        for path, file in ((f"/nar/{e['nar']}", f"{cache}/nar/{e['nar']}"),
                           (f"/{e['hash']}.narinfo", f"{cache}/{e['hash']}.narinfo")):
            with open(file, "rb") as f:
                c.request("PUT", path, body=f, headers={**auth(TOKEN), "Content-Length": str(os.path.getsize(file))})
                r = c.getresponse()
                r.read()
            if r.status != 200:
                raise SystemExit(f"upload {path}: HTTP {r.status}")


def p1_p2_hits(ctx):
    """P2 narinfo hits (wrk) and P1 a big cached NAR (1 and 8 clients), nip vs nginx."""
    m, nip, nginx = ctx.manifest, ctx.nip, ctx.nginx
    upload_nix(nip.port, m["cache"], m["small"] + [m["medium"], m["big"]])
    big = f"/nar/{m['big']['nar']}"
    results = {}
    for s in (nginx, nip):
        results[s.name] = {"narinfo": wrk_summary(s.port, ctx.narinfos, ctx.duration, ctx.repeats),
                           "big_1": summary([throughput(s.port, big, 1) for _ in range(ctx.repeats)]),
                           "big_8": summary([throughput(s.port, big, 8) for _ in range(ctx.repeats)])}
    ctx.raw["p1_p2"] = results
    n, g = results["nip"], results["nginx"]
    ctx.details.append(f"P2 narinfo p99 latency under wrk: nip {n['narinfo']['p99_ms']['median']:.1f} ms, nginx "
                       f"{g['narinfo']['p99_ms']['median']:.1f} ms; non-2xx answers: nip {n['narinfo']['errors']}, "
                       f"nginx {g['narinfo']['errors']}.")
    mib = m["big"]["size"] // MIB
    return [versus("P2", f"narinfo hits, {len(m['small'])} distinct, req/s", "req/s", n["narinfo"]["rps"],
                   "nginx", g["narinfo"]["rps"], 0.8),
            versus("P1", f"{mib} MiB cached NAR, 1 client", "MiB/s", n["big_1"], "nginx", g["big_1"], 0.9),
            versus("P1", f"{mib} MiB cached NAR, 8 clients", "MiB/s", n["big_8"], "nginx", g["big_8"], 0.9)]


def p2b_artifact_lookups(ctx):
    """P2 `/v1/artifacts/{key}` lookups (wrk, with the bearer token), nip vs the Flask reference."""
    keys = [f"bench-art-{i}" for i in range(ctx.artifacts)]
    for s in (ctx.nip, ctx.flask):
        for k in keys:
            status = http_multipart(s.port, f"/v1/artifacts/{k}", os.urandom(512), TOKEN,
                                    '{"name": "bench", "version": "1"}')
            if status not in (200, 201):
                raise SystemExit(f"{s.name}: upload {k}: HTTP {status}")
    paths = f"{ctx.work}/artifact-paths.txt"
    with open(paths, "w") as f:
        f.writelines(f"/v1/artifacts/{k}\n" for k in keys)
    results = {s.name: wrk_summary(s.port, paths, ctx.duration, ctx.repeats, TOKEN) for s in (ctx.flask, ctx.nip)}
    ctx.raw["p2b"] = results
    n, fl = results["nip"], results["flask"]
    ctx.details.append(f"P2 `/v1/artifacts/{{key}}` lookups over {len(keys)} keys: p99 nip "
                       f"{n['p99_ms']['median']:.1f} ms, Flask {fl['p99_ms']['median']:.1f} ms; non-2xx: nip "
                       f"{n['errors']}, Flask {fl['errors']}.")
    return [versus("P2", f"`/v1/artifacts/{{key}}` lookups, {len(keys)} keys, req/s", "req/s", n["rps"],
                   "Flask", fl["rps"], 20)]


def upstream_fetches(log, path):
    """How many requests for path the upstream nginx logged."""
    with open(log) as f:
        return sum(1 for line in f if f" {path} HTTP/" in line)


def concurrent_gets(port, path, clients):
    """`clients` GETs of path released together; returns the sizes received."""
    gate = threading.Barrier(clients)

    def one(_):
        gate.wait(30)
        return download(port, path)[0]

    with ThreadPoolExecutor(clients) as ex:
        return list(ex.map(one, range(clients)))


def ttfb_batch(port, paths):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    out = [ttfb_ms(c, p) for p in paths]
    c.close()
    return out


def coalesced_fetches(proxy, log, m):
    """50 identical concurrent misses through nip, for a narinfo and then (its narinfo known) a
    16 MiB NAR: how many requests for each reached the upstream."""
    fetches = {}
    for label, entry, path in (("narinfo", m["small"][-1], f"/{m['small'][-1]['hash']}.narinfo"),
                               ("NAR", m["medium"], f"/nar/{m['medium']['nar']}")):
        if label == "NAR":
            download(proxy.port, f"/{entry['hash']}.narinfo")
        sizes = concurrent_gets(proxy.port, path, 50)
        # nip adds its own signature to a narinfo: only a NAR has the upstream's size.
        want = os.path.getsize(f"{m['cache']}{path}")
        if label == "NAR" and any(s != want for s in sizes):
            raise SystemExit(f"P3: a coalesced {label} download was short: {sorted(set(sizes))}")
        fetches[label] = upstream_fetches(log, path)
    return fetches


def added_ttfb(ctx, upstream, proxy):
    """Time to first byte of distinct narinfo and NAR misses through nip minus the same requests
    sent to the upstream directly, in batches (one per repeat); returns (added ms per batch,
    all samples)."""
    entries = ctx.manifest["small"][:ctx.misses]
    added = {"narinfo": [], "NAR": []}
    samples = {"narinfo": {"direct": [], "nip": []}, "NAR": {"direct": [], "nip": []}}
    for batch in (entries[i::ctx.repeats] for i in range(ctx.repeats)):
        for label, paths in (("narinfo", [f"/{e['hash']}.narinfo" for e in batch]),
                             ("NAR", [f"/nar/{e['nar']}" for e in batch])):
            direct, through = ttfb_batch(upstream.port, paths), ttfb_batch(proxy.port, paths)
            samples[label]["direct"] += direct
            samples[label]["nip"] += through
            added[label].append(statistics.median(through) - statistics.median(direct))
    return added, samples


def p3_misses(ctx):
    """P3: misses through a fresh nip whose upstream is nginx with the signed cache, against the
    same requests sent to that nginx directly; 50 identical concurrent misses; one big NAR miss."""
    m = ctx.manifest
    log = f"{ctx.work}/upstream-access.log"
    upstream = ctx.servers.nginx("upstream", m["cache"], access_log=log)
    proxy = ctx.servers.nip("nip-proxy", m["public_key"], upstream=f"http://127.0.0.1:{upstream.port}")
    coalesced = coalesced_fetches(proxy, log, m)
    added, samples = added_ttfb(ctx, upstream, proxy)
    download(proxy.port, f"/{m['big']['hash']}.narinfo")
    big = f"/nar/{m['big']['nar']}"
    direct = curl_times([f"http://127.0.0.1:{upstream.port}{big}"])
    through = curl_times([f"http://127.0.0.1:{proxy.port}{big}"])
    ctx.servers.stop(proxy)
    ctx.servers.stop(upstream)
    ctx.raw["p3"] = {"added_ttfb_ms": added, "coalesced_upstream_fetches": coalesced,
                     "big_miss_curl_s": {"direct": direct, "nip": through}}
    for label, s in samples.items():
        ctx.details.append(
            f"P3 {label} misses ({len(s['nip'])} distinct, sequential, kept-alive connection): time to first byte "
            f"median {statistics.median(s['nip']):.2f} ms through nip vs {statistics.median(s['direct']):.2f} ms "
            f"direct; p99 {percentile(s['nip'], 99):.2f} vs {percentile(s['direct'], 99):.2f} ms.")
    mib = m["big"]["size"] // MIB
    ctx.details.append(f"P3 a {mib} MiB NAR miss (curl, one run each): first byte after {through[0] * 1000:.1f} ms "
                       f"through nip vs {direct[0] * 1000:.1f} ms direct; whole body {mib / through[1]:.0f} MiB/s "
                       f"vs {mib / direct[1]:.0f} MiB/s direct.")
    return [absolute("P3", "narinfo miss, added time to first byte", "ms", summary(added["narinfo"]), 5),
            absolute("P3", "small NAR miss, added time to first byte", "ms", summary(added["NAR"]), 5),
            absolute("P3", "50 identical concurrent narinfo misses: upstream fetches", "", coalesced["narinfo"], 1,
                     exact=True),
            absolute("P3", "50 identical concurrent 16 MiB NAR misses: upstream fetches", "", coalesced["NAR"], 1,
                     exact=True)]


def p4_memory(ctx):
    """P4: nip's peak RSS while 16 clients download a big artifact and 4 upload one."""
    nip, size = ctx.nip, ctx.p4_mib * MIB
    file = f"{ctx.work}/p4.bin"
    dataset.write_random(file, size)
    curl_multipart(f"http://127.0.0.1:{nip.port}/v1/artifacts/p4-download", file, TOKEN)
    url = f"http://127.0.0.1:{nip.port}/v1"
    bearer = ["-H", f"Authorization: Bearer {TOKEN}"]
    peaks, seconds = [], []
    for r in range(ctx.heavy_repeats):
        reset_peak_rss(nip.pid)
        downloads = [bearer + [f"{url}/download/p4-download"] for _ in range(16)]
        uploads = [bearer + ["-F", f"file=@{file}", "-F", "metadata={}", f"{url}/artifacts/p4-upload-{r}-{i}"]
                   for i in range(4)]
        seconds.append(curl_parallel(downloads + uploads)[0])
        peaks.append(peak_rss_mib(nip.pid))
    os.remove(file)
    ctx.raw["p4"] = {"peak_rss_mib": peaks, "seconds": seconds}
    ctx.details.append(f"P4 {ctx.p4_mib} MiB: 16 downloads of one artifact and 4 uploads (the same bytes under 4 "
                       f"new keys each round) took {statistics.median(seconds):.1f} s; {ctx.heavy_repeats} round(s).")
    return [absolute("P4", f"peak RSS, 16 downloads + 4 uploads of {ctx.p4_mib} MiB", "MiB", summary(peaks), 64)]


def upload_series(ctx, base, tag, targets):
    """Each repeat uploads fresh bytes (base with a new first 16 bytes) to every target in turn;
    returns {name: summary of MiB/s} and nip's peak RSS over the series."""
    mib = os.path.getsize(base) / MIB
    speeds = {name: [] for name, _ in targets}
    reset_peak_rss(ctx.nip.pid)
    for r in range(ctx.repeats):
        file = f"{ctx.work}/upload-{tag}.bin"
        copy_with_prefix(base, file, os.urandom(16))
        for name, upload in targets:
            speeds[name].append(mib / upload(file, f"bench-{tag}-{r}"))
        os.remove(file)
    return {name: summary(v) for name, v in speeds.items()}, peak_rss_mib(ctx.nip.pid)


def p5_uploads(ctx):
    """P5: upload throughput, nip vs turborepo-remote-cache (64 MiB) and vs Flask (256 MiB)."""
    nip, flask, turbo = ctx.nip, ctx.flask, ctx.turbo
    multipart = lambda s: lambda file, key: curl_multipart(f"http://127.0.0.1:{s.port}/v1/artifacts/{key}", file, TOKEN)
    turbo_put = lambda file, key: curl(["-H", f"Authorization: Bearer {TOKEN}", "-H",
                                        "Content-Type: application/octet-stream", "-T", file,
                                        f"http://127.0.0.1:{turbo.port}/v8/artifacts/{key}?teamId=bench"])
    base = f"{ctx.work}/p5.bin"
    dataset.write_random(base, 64 * MIB)
    reset_peak_rss(turbo.pid)
    small, rss_small = upload_series(ctx, base, "p5-turbo-64", [("nip", multipart(nip)), ("turborepo", turbo_put)])
    turbo_rss = peak_rss_mib(turbo.pid)
    dataset.write_random(base, ctx.p5_flask_mib * MIB)
    large, rss_large = upload_series(ctx, base, f"p5-flask-{ctx.p5_flask_mib}", [("nip", multipart(nip)),
                                                                          ("flask", multipart(flask))])
    os.remove(base)
    ctx.raw["p5"] = {"64": small, str(ctx.p5_flask_mib): large, "nip_peak_rss_mib": [rss_small, rss_large],
                     "turborepo_peak_rss_mib": turbo_rss}
    ctx.details.append(f"P5 nip's peak RSS: {rss_small:.0f} MiB during the 64 MiB uploads, {rss_large:.0f} MiB during "
                       f"the {ctx.p5_flask_mib} MiB ones (flat means the same); turborepo-remote-cache peaked at "
                       f"{turbo_rss:.0f} MiB (it buffers bodies in memory). Uploads with curl, multipart for nip and "
                       "Flask, a plain PUT for turborepo-remote-cache.")
    return [versus("P5", "64 MiB upload", "MiB/s", small["nip"], "turborepo", small["turborepo"], 1.5),
            versus("P5", f"{ctx.p5_flask_mib} MiB upload", "MiB/s", large["nip"], "Flask", large["flask"], 3),
            absolute("P5", f"peak RSS during the {ctx.p5_flask_mib} MiB uploads", "MiB", rss_large, 64)]


def p6_big_index(ctx):
    """P6: narinfo latency and cold start with a large index generated directly in SQLite."""
    data_dir = f"{ctx.work}/nip-index-data"
    # A first start creates the database (migrations).
    first = ctx.servers.nip("nip-index", ctx.manifest["public_key"], data_dir=data_dir)
    ctx.servers.stop(first)
    t = time.perf_counter()
    hashes = dataset.fill_narinfos(f"{data_dir}/db/db.sqlite", ctx.index_entries)
    fill_seconds = time.perf_counter() - t
    probe = f"/{random.choice(hashes)}.narinfo"
    starts = []
    for _ in range(ctx.repeats):
        seconds, server = cold_start_seconds(ctx.servers, "nip-index", ctx.manifest["public_key"], data_dir, probe)
        starts.append(seconds)
        ctx.servers.stop(server)
    server = ctx.servers.nip("nip-index", ctx.manifest["public_key"], data_dir=data_dir)
    paths = f"{ctx.work}/index-paths.txt"
    with open(paths, "w") as f:
        f.writelines(f"/{h}.narinfo\n" for h in random.sample(hashes, min(10000, len(hashes))))
    hits = wrk_summary(server.port, paths, ctx.duration, ctx.repeats)
    sequential = sequential_p99(server.port, paths, ctx.repeats)
    ctx.servers.stop(server)
    ctx.raw["p6"] = {"entries": ctx.index_entries, "fill_seconds": fill_seconds, "cold_start_s": starts, "wrk": hits,
                     "sequential_p99_ms": sequential}
    if "p1_p2" in ctx.raw:  # the same measure on the small index of P1/P2, to see what size costs
        small = sequential_p99(ctx.nip.port, ctx.narinfos, ctx.repeats)
        ctx.details.append(f"P6 for comparison, one connection on the {len(ctx.manifest['small'])}-entry index of "
                           f"P2: narinfo p99 {small['median']:.2f} ms (vs {sequential['median']:.2f} ms with "
                           f"{ctx.index_entries} entries).")
    ctx.details.append(f"P6 {ctx.index_entries} narinfo rows written with python sqlite3 in {fill_seconds:.0f} s "
                       f"(NARs not stored, as after narinfo-only traffic); wrk over 10000 random ones: "
                       f"{hits['rps']['median']:.0f} req/s, {hits['errors']} non-2xx. Cold start = exec to the "
                       "first 200 on a narinfo, page cache warm (caches are not dropped on a shared machine).")
    return [absolute("P6", f"narinfo p99 latency, {ctx.index_entries} entries, 1 connection", "ms", sequential, 2),
            absolute("P6", f"narinfo p99 latency, {ctx.index_entries} entries, wrk 50 connections", "ms",
                     hits["p99_ms"], 2),
            absolute("P6", f"cold start to first 200, {ctx.index_entries} entries", "s", summary(starts), 1)]


def sequential_p99(port, paths_file, repeats, count=2000):
    """p99 latency (ms) of `count` narinfo GETs one after another on one kept-alive connection,
    so queueing behind other clients is left out; one figure per repeat."""
    with open(paths_file) as f:
        paths = [line.strip() for line in f][:count]
    return summary([percentile(ttfb_batch(port, paths), 99) for _ in range(repeats)])


def nip_build(ctx, home, recipes):
    """Runs `nip build bigart --json` as a user with this HOME; returns (seconds, parsed JSON)."""
    env = {**os.environ, "HOME": home, "XDG_CONFIG_HOME": f"{home}/.config", "XDG_CACHE_HOME": f"{home}/.cache",
           "XDG_DATA_HOME": f"{home}/.local/share", "NIP_RECIPES_PATH": recipes,
           "NIP_REMOTE_CACHE_URL": f"http://127.0.0.1:{ctx.nip.port}", "NIP_REMOTE_CACHE_API_KEY": TOKEN,
           "NIP_REMOTE_CACHE_ENABLED": "true"}
    os.makedirs(home, exist_ok=True)
    t = time.perf_counter()
    out = subprocess.run([ctx.nip_binary, "build", "bigart", "--json"], env=env, cwd=home, capture_output=True,
                         text=True, timeout=600)
    seconds = time.perf_counter() - t
    if out.returncode != 0:
        raise SystemExit(f"nip build: exit {out.returncode}: {out.stderr.strip()[-500:]}")
    return seconds, json.loads(out.stdout)


def p7_client(ctx):
    """P7: `nip build` of a 100 MiB artifact: a local hit, and a remote hit against curl of the same bytes."""
    root = f"{ctx.work}/p7"
    recipes = f"{root}/recipes"
    os.makedirs(recipes, exist_ok=True)
    with open(f"{recipes}/bigart.toml", "w") as f:
        f.write(f'name = "bigart"\nversion = "1.0"\ndescription = "{ctx.p7_mib} MiB of random bytes"\n'
                f"build = 'head -c {ctx.p7_mib * MIB} /dev/urandom > \"$OUT/blob\"'\n")
    _, built = nip_build(ctx, f"{root}/a", recipes)
    if built["source"] != "built":
        raise SystemExit(f"P7: first build came from {built['source']}")
    local, remote, plain, floor = [], [], [], []
    for r in range(ctx.repeats):
        seconds, out = nip_build(ctx, f"{root}/a", recipes)
        assert out["source"] == "local", out
        local.append(seconds * 1000)
        seconds, out = nip_build(ctx, f"{root}/b{r}", recipes)
        assert out["source"] == "remote", out
        remote.append(seconds)
        plain.append(curl(["-H", f"Authorization: Bearer {TOKEN}", "-o", f"{root}/b{r}/curl.bin",
                           f"http://127.0.0.1:{ctx.nip.port}/v1/download/{built['key']}"]))
        floor.append(store_and_hash_seconds(ctx.nip.port, f"/v1/download/{built['key']}", f"{root}/floor.bin",
                                            {"Authorization": f"Bearer {TOKEN}"}))
        subprocess.run(["rm", "-rf", f"{root}/b{r}"], check=True)
    ctx.raw["p7"] = {"local_ms": local, "remote_s": remote, "curl_s": plain, "floor_s": floor}
    ctx.details.append(f"P7 `nip build` is timed as a process (start to exit), each remote hit on a fresh HOME; "
                       f"curl writes the same {ctx.p7_mib} MiB to a file; nip also checks the SHA-256 and unpacks. "
                       f"The least a client that checks what it keeps does (one thread: receive, SHA-256 with "
                       f"OpenSSL, write, fsync; no unpacking): {statistics.median(floor):.2f} s, "
                       f"{statistics.median(f / c for f, c in zip(floor, plain)):.2f}× curl; `nip build`, which also "
                       f"unpacks but does not fsync what it downloads (after a reboot it checks a package against "
                       f"its archive before using it again; docs/binary-cache.md), takes "
                       f"{statistics.median(r / f for r, f in zip(remote, floor)):.2f}× of that.")
    return [absolute("P7", f"`nip build`, local hit, {ctx.p7_mib} MiB artifact", "ms", summary(local), 50),
            versus("P7", f"`nip build`, remote hit, {ctx.p7_mib} MiB artifact", "s", summary(remote), "curl",
                   summary(plain), 1.5, lower_is_better=True)]


def build_tiny(ctx, home, recipes, env_extra):
    """Runs `nip build tiny --json` as a user with this HOME and remote settings; returns (seconds, JSON)."""
    env = {**os.environ, "HOME": home, "XDG_CONFIG_HOME": f"{home}/.config", "XDG_CACHE_HOME": f"{home}/.cache",
           "XDG_DATA_HOME": f"{home}/.local/share", "NIP_RECIPES_PATH": recipes, **env_extra}
    os.makedirs(home, exist_ok=True)
    t = time.perf_counter()
    out = subprocess.run([ctx.nip_binary, "build", "tiny", "--json"], env=env, cwd=home, capture_output=True,
                         text=True, timeout=600)
    seconds = time.perf_counter() - t
    if out.returncode != 0:
        raise SystemExit(f"nip build: exit {out.returncode}: {out.stderr.strip()[-500:]}")
    result = json.loads(out.stdout)
    if result["source"] != "built":
        raise SystemExit(f"P7d: the build came from {result['source']}")
    return seconds


def p7d_dead_remote(ctx):
    """P7d: what a dead remote adds to `nip build` (the default policies: 3 attempts, 5 s apart), against the
    same build without a remote: one that refuses connections, and one that accepts them in the kernel's
    backlog and never answers (black-holed). Each timed run has a fresh HOME, so it asks the remote; the
    next builds in the same HOME skip a server found unreachable for a while, measured too."""
    import socket
    root = f"{ctx.work}/p7d"
    recipes = f"{root}/recipes"
    os.makedirs(recipes, exist_ok=True)
    with open(f"{recipes}/tiny.toml", "w") as f:
        f.write('name = "tiny"\nversion = "1.0"\nbuild = \'echo hi > "$OUT/f"\'\n')
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        refused_port = s.getsockname()[1]
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(1024)
    lookup_deadline = 5.0  # the client's default lookupTimeout
    remote = lambda port: {"NIP_REMOTE_CACHE_URL": f"http://127.0.0.1:{port}", "NIP_REMOTE_CACHE_API_KEY": TOKEN,
                           "NIP_REMOTE_CACHE_ENABLED": "true"}
    runs = {"none": [], "refused": [], "refused_again": [], "hole": [], "hole_again": []}
    try:
        for r in range(ctx.repeats):
            runs["none"].append(build_tiny(ctx, f"{root}/none{r}", recipes, {"NIP_REMOTE_CACHE_ENABLED": "false"}))
            for name, port in (("refused", refused_port), ("hole", hole.getsockname()[1])):
                home = f"{root}/{name}{r}"
                runs[name].append(build_tiny(ctx, home, recipes, remote(port)))
                # The same machine's next build: its local cache emptied so it builds again.
                for d in (f"{home}/.cache/nip/binary-cache", f"{home}/.local/share/nip/pkgs"):
                    shutil.rmtree(d, ignore_errors=True)
                runs[f"{name}_again"].append(build_tiny(ctx, home, recipes, remote(port)))
    finally:
        hole.close()
        shutil.rmtree(root, ignore_errors=True)
    ctx.raw["p7d"] = runs
    over = {k: [max(0.0, t - b) for t, b in zip(v, runs["none"])] for k, v in runs.items() if k != "none"}
    ctx.details.append(
        f"P7d `nip build` of a tiny recipe without a remote: {statistics.median(runs['none']):.2f} s; the next "
        f"build against a server found unreachable skips it: overhead {statistics.median(over['refused_again']):.2f} s "
        f"(refused), {statistics.median(over['hole_again']):.2f} s (black-holed); the lookup deadline is "
        f"{lookup_deadline:.0f} s.")
    return [absolute("P7d", "`nip build` overhead, remote refusing connections", "s", summary(over["refused"]), 1),
            absolute("P7d", "`nip build` overhead, black-holed remote", "s", summary(over["hole"]),
                     lookup_deadline + 0.5)]


def p3c_cluster_followers(ctx):
    """P3c: two instances sharing one database and store (SQLite and a directory on one machine);
    one client misses the big NAR on A, which takes the fill lease and fetches it; a second client
    asks B 100 ms later, which waits for A's fill and serves it from the shared store. Time to first
    byte and throughput of each, against the same NAR straight from the upstream."""
    m = ctx.manifest
    log = f"{ctx.work}/p3c-upstream.log"
    upstream = ctx.servers.nginx("p3c-upstream", m["cache"], access_log=log)
    shared = f"{ctx.work}/p3c-shared"
    up = f"http://127.0.0.1:{upstream.port}"
    big = f"/nar/{m['big']['nar']}"
    mib = m["big"]["size"] / MIB
    leader, follower, direct = [], [], []
    for r in range(ctx.repeats):
        shutil.rmtree(shared, ignore_errors=True)
        nodes = [ctx.servers.nip(f"p3c-{n}{r}", m["public_key"], upstream=up, data_dir=shared,
                                 extra=("--cache-temp-path", f"{ctx.work}/p3c-{n}{r}-tmp")) for n in "ab"]
        for n in nodes:
            download(n.port, f"/{m['big']['hash']}.narinfo")
        with ThreadPoolExecutor(2) as ex:
            first = ex.submit(curl_times, [f"http://127.0.0.1:{nodes[0].port}{big}"])
            time.sleep(0.1)
            second = ex.submit(curl_times, [f"http://127.0.0.1:{nodes[1].port}{big}"])
            leader.append(first.result())
            follower.append(second.result())
        for n in nodes:
            ctx.servers.stop(n)
    fetches = upstream_fetches(log, big)
    for _ in range(ctx.repeats):
        direct.append(curl_times([f"{up}{big}"]))
    ctx.servers.stop(upstream)
    shutil.rmtree(shared, ignore_errors=True)
    ctx.raw["p3c"] = {"leader_s": leader, "follower_s": follower, "direct_s": direct, "upstream_fetches": fetches}
    med = lambda runs, i: statistics.median(r[i] for r in runs)
    # The follower's clock starts 100 ms after the leader's.
    ctx.details.append(
        f"P3c a {mib:.0f} MiB NAR missed on two instances sharing database and store, the second asked "
        f"100 ms after the first: the fetching instance's client had the first byte after "
        f"{med(leader, 0) * 1000:.0f} ms and the whole body at {mib / med(leader, 1):.0f} MiB/s; the waiting "
        f"instance's client had its first byte after {med(follower, 0) * 1000:.0f} ms (the rest of the fetch) "
        f"and the body at {mib / med(follower, 1):.0f} MiB/s overall, {mib / max(1e-9, med(follower, 1) - med(follower, 0)):.0f} MiB/s "
        f"once it started; straight from the upstream {mib / med(direct, 1):.0f} MiB/s. Upstream fetches: {fetches} in {ctx.repeats} runs.")
    return [absolute("P3c", "waiting instance: time to first byte of a NAR another instance fetches", "s",
                     summary([r[0] for r in follower]), med(leader, 1) + 1.0),
            absolute("P3c", "upstream fetches per NAR missed on both instances", "", fetches / ctx.repeats, 1,
                     exact=True)]


def store_and_hash_seconds(port, path, out, headers=None):
    """Seconds for one thread to receive `path` from 127.0.0.1:`port` in 1 MiB reads, hash it with
    SHA-256 (OpenSSL, as nip's own hashing uses the CPU's SHA extensions) and write it to `out`,
    then fsync: the least work a proxy that checks and stores does, without sending anything on."""
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("GET", path, headers=headers or {})
    resp = conn.getresponse()
    if resp.status != 200:
        raise SystemExit(f"GET {path}: HTTP {resp.status}")
    digest = hashlib.sha256()
    with open(out, "wb") as f:
        while piece := resp.read(MIB):
            digest.update(piece)
            f.write(piece)
        f.flush()
        os.fsync(f.fileno())
    conn.close()
    took = time.perf_counter() - start
    os.remove(out)
    return took


def p8_cold_miss(ctx):
    """P8: the big NAR missed by a fresh nip in front of nginx (narinfo fetched first), against the
    same NAR straight from that nginx: time to first byte and throughput of one client, and of
    each of 10 clients missing it together."""
    m = ctx.manifest
    upstream = ctx.servers.nginx("p8-upstream", m["cache"])
    up = f"http://127.0.0.1:{upstream.port}"
    big = f"/nar/{m['big']['nar']}"
    mib = m["big"]["size"] / MIB
    one, direct, ten, floor, ten_direct = [], [], [], [], []
    for r in range(ctx.repeats):
        for clients, into in ((1, one), (10, ten)):
            shutil.rmtree(f"{ctx.work}/p8-{r}-{clients}-data", ignore_errors=True)
            nip = ctx.servers.nip(f"p8-{r}-{clients}", m["public_key"], upstream=up)
            download(nip.port, f"/{m['big']['hash']}.narinfo")
            if clients == 1:
                into.append(curl_times([f"http://127.0.0.1:{nip.port}{big}"]))
            else:
                with ThreadPoolExecutor(clients) as ex:
                    into.append(list(ex.map(lambda _: curl_times([f"http://127.0.0.1:{nip.port}{big}"]),
                                            range(clients))))
            ctx.servers.stop(nip)
            shutil.rmtree(f"{ctx.work}/p8-{r}-{clients}-data", ignore_errors=True)
        direct.append(curl_times([f"{up}{big}"]))
        floor.append(store_and_hash_seconds(upstream.port, big, f"{ctx.work}/p8-floor.nar"))
        # The same 10 clients straight from nginx: what these cores give 10 downloads at once.
        with ThreadPoolExecutor(10) as ex:
            ten_direct.append(list(ex.map(lambda _: curl_times([f"{up}{big}"]), range(10))))
    compressed_rows = p8_compressed(ctx, up)
    ctx.servers.stop(upstream)
    ctx.raw["p8"] = {"one_s": one, "direct_s": direct, "ten_s": ten, "floor_s": floor, "ten_direct_s": ten_direct}
    tput = lambda t: mib / t[1]
    added_ttfb = [(a[0] - d[0]) * 1000 for a, d in zip(one, direct)]
    ratio_one = [tput(a) / tput(d) for a, d in zip(one, direct)]
    # Each of the ten against one direct download of the same run.
    ratio_ten = [min(tput(c) for c in run) / tput(d) for run, d in zip(ten, direct)]
    ctx.details.append(
        f"P8 a {mib:.0f} MiB uncompressed NAR missed by a fresh nip: {statistics.median(tput(a) for a in one):.0f} MiB/s "
        f"vs {statistics.median(tput(d) for d in direct):.0f} MiB/s straight from nginx; first byte "
        f"{statistics.median(added_ttfb):.1f} ms later than direct; 10 clients on the same miss: the slowest got "
        f"{statistics.median(min(tput(c) for c in run) for run in ten):.0f} MiB/s. The least a proxy that checks "
        f"and stores does, in one thread and without sending anything on (receive, SHA-256, write, fsync): "
        f"{statistics.median(mib / f for f in floor):.0f} MiB/s, "
        f"{statistics.median(d[1] / f for d, f in zip(direct, floor)):.2f}× of direct; nip reaches "
        f"{statistics.median(f / a[1] for a, f in zip(one, floor)):.2f}× of that. 10 clients straight from nginx at "
        f"once: the slowest got {statistics.median(min(tput(c) for c in run) for run in ten_direct):.0f} MiB/s, "
        f"{statistics.median(min(tput(c) for c in run) / tput(d) for run, d in zip(ten_direct, direct)):.2f}× of "
        f"one direct download (the target asks 0.8× of nip's 10).")
    return [absolute("P8", "cold NAR miss: throughput vs nginx direct", "×", summary(ratio_one), 0.8,
                     lower_is_better=False),
            absolute("P8", "cold NAR miss: added time to first byte", "ms", summary(added_ttfb), 5),
            absolute("P8", "10 clients on one cold miss: slowest client vs one direct download", "×",
                     summary(ratio_ten), 0.8, lower_is_better=False)] + compressed_rows


def p8_compressed(ctx, up):
    """P8 for NARs stored compressed upstream (zstd, xz) with a FileHash, as `nix copy` and
    cache.nixos.org store them: a NAR of real installed files the size of the big one, missed by
    a fresh nip, against the same file straight from the upstream. nip stores and serves the
    compressed bytes as they are, checked against FileHash."""
    m = ctx.manifest
    blob = f"{ctx.work}/p8-real.nar"
    real_files_blob(blob, m["big"]["size"])
    rows, said = [], []
    for compression in ("zstd", "xz"):
        e = dataset.add_compressed(m["cache"], m["signing_key"], f"p8-{compression}", blob, compression)
        path = f"/nar/{e['nar']}"
        through, direct = [], []
        for r in range(ctx.repeats):
            data = f"{ctx.work}/p8{compression}-{r}-data"
            shutil.rmtree(data, ignore_errors=True)
            nip = ctx.servers.nip(f"p8{compression}-{r}", m["public_key"], upstream=up)
            download(nip.port, f"/{e['hash']}.narinfo")
            through.append(curl_times([f"http://127.0.0.1:{nip.port}{path}"]))
            ctx.servers.stop(nip)
            shutil.rmtree(data, ignore_errors=True)
            direct.append(curl_times([f"{up}{path}"]))
        mib = e["size"] / MIB
        ratio = [d[1] / a[1] for a, d in zip(through, direct)]
        added_ttfb = [(a[0] - d[0]) * 1000 for a, d in zip(through, direct)]
        said.append(f"{compression} ({mib:.0f} MiB from a {e['nar_size'] / MIB:.0f} MiB NAR): "
                    f"{statistics.median(mib / a[1] for a in through):.0f} vs "
                    f"{statistics.median(mib / d[1] for d in direct):.0f} MiB/s direct, first byte "
                    f"{statistics.median(added_ttfb):.1f} ms later")
        rows += [absolute("P8", f"cold NAR miss, {compression} as stored upstream: throughput vs nginx direct", "×",
                          summary(ratio), 0.8, lower_is_better=False),
                 absolute("P8", f"cold NAR miss, {compression}: added time to first byte", "ms",
                          summary(added_ttfb), 5)]
    os.remove(blob)
    ctx.details.append("P8 NARs stored compressed upstream with a FileHash (real installed files; compressed by "
                       "the zstd and xz commands at fast levels), missed by a fresh nip, which checks and "
                       "stores the compressed bytes and serves them as they are: " + "; ".join(said) + ".")
    return rows


CRITERION_LINE = re.compile(r"^(?P<name>\S.*?)?\s+time:\s+\[(\S+ \S+) (\S+ \S+) (\S+ \S+)\]")
# "thrpt:  [1.40 GiB/s 1.41 GiB/s 1.41 GiB/s]"; a "change:" block has a thrpt line in percent, skipped.
CRITERION_THRPT = re.compile(r"thrpt:\s+\[\S+ \S+/s (\S+ \S+/s) \S+ \S+/s\]")


def criterion(ctx):
    """Runs the criterion benches in their bounded mode (--quick, 1 s warm-up, at most 2 s of
    measurement each) and reads the estimates from their output."""
    found, name = [], None
    for package, bench in (("nip-core", "core"), ("nip-client", "cache_key")):
        out = subprocess.run(["nice", "cargo", "bench", "--locked", "-q", "-p", package, "--bench", bench, "--",
                              "--quick", "--noplot", "--warm-up-time", "1", "--measurement-time", "2"],
                             cwd=ctx.root, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise SystemExit(f"cargo bench -p {package}: {out.stderr[-1000:]}")
        for line in out.stdout.splitlines():
            match = CRITERION_LINE.match(line)
            if match:
                name = match.group("name") or name
                found.append({"name": name.strip(), "low": match.group(2), "estimate": match.group(3),
                              "high": match.group(4)})
            elif CRITERION_THRPT.search(line) and found:
                found[-1].setdefault("throughput", CRITERION_THRPT.search(line).group(1))
            elif line and not line[0].isspace() and "time:" not in line:
                name = line.strip()
    return found


def real_files_blob(path, size):
    """SIZE bytes of real installed files (libraries, binaries, docs), as NARs hold: the input for
    measuring on-the-fly compression (random bytes would not compress at all)."""
    written = 0
    with open(path, "wb") as out:
        for root in ("/usr/lib", "/usr/share", "/usr/bin"):
            for d, _, files in os.walk(root):
                for name in sorted(files):
                    try:
                        with open(os.path.join(d, name), "rb") as f:
                            data = f.read(size - written)
                    except OSError:
                        continue
                    out.write(data)
                    written += len(data)
                    if written >= size:
                        return
    raise SystemExit(f"only {written} bytes of files under /usr for the zstd scenario")


def cpu_seconds(pid):
    """User + system CPU time of a process so far."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def zstd_on_the_fly(ctx):
    """Issue 6: the CPU cost of serving an uncompressed NAR zstd-compressed to a client that
    accepts it (as Harmonia does), against serving it as stored. Reported, no target."""
    nip, mib = ctx.nip, ctx.p7_mib
    file = f"{ctx.work}/zstd.nar"
    real_files_blob(file, mib * MIB)
    digest = hashlib.sha256(open(file, "rb").read()).digest()
    nar = f"/nar/{dataset.nix32(digest)}.nar"
    put_s = curl(["-H", f"Authorization: Bearer {TOKEN}", "-T", file,
                  f"http://127.0.0.1:{nip.port}{nar}"])
    os.remove(file)
    figures = {}
    for name, headers in (("identity", []), ("zstd", ["-H", "Accept-Encoding: zstd"])):
        runs = []
        for _ in range(ctx.repeats):
            before = cpu_seconds(nip.pid)
            out = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{size_download} %{time_total}",
                                  *headers, f"http://127.0.0.1:{nip.port}{nar}"],
                                 capture_output=True, text=True, check=True).stdout.split()
            runs.append({"cpu_s": cpu_seconds(nip.pid) - before, "bytes": int(out[0]), "s": float(out[1])})
        figures[name] = {"cpu_s_per_gib": statistics.median(r["cpu_s"] * 1024 / mib for r in runs),
                         "mib_s": statistics.median(mib / r["s"] for r in runs),
                         "sent_mib": runs[0]["bytes"] / MIB}
    ctx.raw["zstd"] = {"put_s": put_s, **figures}
    z, i = figures["zstd"], figures["identity"]
    ctx.details.append(
        f"zstd on the fly (issue 6), {mib} MiB of installed files as an uncompressed NAR: served as stored "
        f"{i['mib_s']:.0f} MiB/s using {i['cpu_s_per_gib']:.2f} CPU-s per GiB; with Accept-Encoding: zstd "
        f"{z['mib_s']:.0f} MiB/s of NAR using {z['cpu_s_per_gib']:.2f} CPU-s per GiB, sending "
        f"{z['sent_mib']:.0f} MiB ({z['sent_mib'] / mib:.0%} of the NAR).")
    return []


def put_timed(conn, path, file):
    """One PUT of file's bytes on a kept-alive connection; its milliseconds."""
    with open(file, "rb") as f:
        t = time.perf_counter()
        conn.request("PUT", path, body=f, headers={**auth(TOKEN), "Content-Length": str(os.path.getsize(file))})
        r = conn.getresponse()
        r.read()
        ms = (time.perf_counter() - t) * 1000
    if r.status != 200:
        raise SystemExit(f"upload {path}: HTTP {r.status}")
    return ms


def nix_upload_check(ctx):
    """The upstream check of a Nix upload (issue 16): before a new path is accepted, nip asks its
    upstream (here nginx with an empty cache: a 404). Narinfo PUT time of new paths that ask, against
    paths whose absence the negative cache already knows (a GET miss just before), on one nip."""
    m = ctx.manifest
    empty = f"{ctx.work}/empty-cache"
    os.makedirs(empty, exist_ok=True)
    with open(f"{empty}/nix-cache-info", "w") as f:  # a cache with no paths
        f.write("StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n")
    log = f"{ctx.work}/empty-upstream-access.log"
    upstream = ctx.servers.nginx("empty-upstream", empty, access_log=log)
    nip = ctx.servers.nip("nip-uploads", m["public_key"], upstream=f"http://127.0.0.1:{upstream.port}",
                          extra=["--cache-negative-ttl", "10m"])
    entries = m["small"][: min(len(m["small"]), 400)]
    half = len(entries) // 2
    conn = http.client.HTTPConnection("127.0.0.1", nip.port, timeout=60)
    times = {"asks upstream": [], "absence known": []}
    for i, e in enumerate(entries):
        known = i >= half
        if known:  # a GET miss first: the upstream's 404 is remembered
            conn.request("GET", f"/{e['hash']}.narinfo")
            r = conn.getresponse()
            r.read()
            if r.status != 404:
                raise SystemExit(f"GET /{e['hash']}.narinfo: HTTP {r.status}, expected 404")
        put_timed(conn, f"/nar/{e['nar']}", f"{m['cache']}/nar/{e['nar']}")
        label = "absence known" if known else "asks upstream"
        times[label].append(put_timed(conn, f"/{e['hash']}.narinfo", f"{m['cache']}/{e['hash']}.narinfo"))
    with open(log) as f:
        asked = sum(1 for line in f if ".narinfo HTTP/" in line)
    ctx.servers.stop(nip)
    ctx.servers.stop(upstream)
    added = statistics.median(times["asks upstream"]) - statistics.median(times["absence known"])
    ctx.raw["nix_upload_check"] = {**times, "upstream_narinfo_requests": asked}
    ctx.details.append(
        f"Nix upload check: {half} narinfo PUTs of new paths took median "
        f"{statistics.median(times['asks upstream']):.2f} ms (each asks the upstream first) vs "
        f"{statistics.median(times['absence known']):.2f} ms for {len(entries) - half} whose absence the negative "
        f"cache knew; the upstream saw {asked} narinfo requests for {len(entries)} uploads.")
    return [absolute("P5n", "narinfo upload of a new path: time added by the upstream check (median)", "ms", added, 5),
            absolute("P5n", "narinfo upload of a new path asking a loopback upstream", "ms",
                     summary(times["asks upstream"]), 10)]
