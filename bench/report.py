"""Result rows (one per target of issue 8) and the BENCHMARKS.md / results.json they become."""
import json, os

from common import HERE, ROOT


HOW = [
    "P1: one and eight concurrent `curl` downloads of the same big NAR, uploaded to nip with PUT as Nix "
    "does, and served by nginx from the same file (sendfile).",
    "P2: `wrk` (2 threads, 50 connections) cycling through distinct narinfo paths; `/v1/artifacts/{key}` "
    "lookups with the bearer token against nip and the Flask reference after uploading the same artifacts "
    "to both.",
    "P3: a fresh nip whose upstream is an nginx serving a cache signed with a key nip trusts; time to first "
    "byte of distinct misses on one kept-alive connection, through nip and straight from the upstream; 50 "
    "identical concurrent misses, counted in the upstream's access log.",
    "P4: nip's VmHWM (reset with `/proc/PID/clear_refs` before the round) while 16 `curl` downloads of "
    "one artifact and 4 `curl` multipart uploads run at once.",
    "P5: `curl` uploads of fresh bytes each repeat: multipart `POST /v1/artifacts/{key}` to nip and Flask, "
    "`PUT /v8/artifacts/{hash}` to turborepo-remote-cache; nip's VmHWM over each series.",
    "P6: narinfo rows inserted straight into nip's SQLite database, then exec-to-first-200 of a narinfo, "
    "p99 of 2000 sequential GETs on one connection, and wrk over 10000 random rows.",
    "P7: `nip build` of a recipe writing random bytes, timed as a process: again on the machine that built "
    "it (local hit), and on a fresh HOME (remote hit) against `curl` fetching the same artifact to a file.",
    "P8: a fresh nip whose upstream is an nginx serving the big NAR: its narinfo fetched first, then "
    "`curl` of the NAR through nip (one client, and 10 at once) against `curl` straight from that nginx, each "
    "repeat on a fresh data directory; the same for a NAR of real installed files stored compressed upstream "
    "(zstd and xz, with a FileHash), which nip checks and serves as stored. The floor: one Python thread "
    "receiving the NAR from nginx, hashing it (OpenSSL SHA-256), writing and fsyncing it.",
    "P9: a fixture closure of input-addressed store paths built once by the real Nix here (`/bin/sh` "
    "derivations referring to each other; mostly a few KiB, a few of 10–50 MiB of random bytes), signed and "
    "exported with `nix copy` (NARs xz and zstd) and served by nginx; each run is Nix 2.8's `nix-store -r ROOT` "
    "into a fresh empty store with an empty narinfo disk cache (Nix defaults: max-jobs 1, http-connections "
    "25), timed as a process: from that nginx directly, through a fresh nip whose upstream is that nginx "
    "(cold; its requests counted in the upstream's access log), and through the first cold run's nip (warm). "
    "Runs interleaved; the ratio is the peer's median time over nip's.",
]


def num(x):
    """A figure with about three significant digits."""
    if x is None:
        return "–"
    if float(x).is_integer() and abs(x) < 1e6:
        return str(int(x))
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def spread(s, unit=""):
    """`median (min–max) unit` of a summary, or a bare number."""
    if isinstance(s, dict):
        text = f"{num(s['median'])} ({num(s['min'])}–{num(s['max'])})"
    else:
        text = num(s)
    return f"{text} {unit}".strip()


def median(s):
    return s["median"] if isinstance(s, dict) else s


def versus(id_, scenario, unit, nip, peer_name, peer, want, lower_is_better=False):
    """A target stated as a ratio nip/peer (≥ want, or ≤ want for times)."""
    ratio = median(nip) / median(peer)
    met = ratio <= want if lower_is_better else ratio >= want
    return {"id": id_, "scenario": scenario, "unit": unit, "nip": nip, "peer": peer_name, "peer_value": peer,
            "ratio": ratio, "target": f"{'≤' if lower_is_better else '≥'}{want}× {peer_name}", "met": met}


def absolute(id_, scenario, unit, nip, limit, lower_is_better=True, exact=False):
    """A target stated as an absolute figure of nip (≤ limit, ≥ limit, or exactly limit)."""
    value = median(nip)
    met = value == limit if exact else (value <= limit if lower_is_better else value >= limit)
    sign = "=" if exact else ("≤" if lower_is_better else "≥")
    return {"id": id_, "scenario": scenario, "unit": unit, "nip": nip, "peer": None, "peer_value": None,
            "ratio": None, "target": f"{sign}{num(limit)} {unit}".strip(), "met": met}


def verdict(row):
    if row["met"]:
        return "met"
    if row["ratio"] is not None:
        return f"**missed** ({row['ratio']:.2f}×)"
    return f"**missed** ({num(median(row['nip']))} {row['unit']})".replace(" )", ")")


def row_line(r):
    peer = f"{spread(r['peer_value'], r['unit'])} ({r['peer']})" if r["peer"] else "–"
    ratio = f"{r['ratio']:.2f}×" if r["ratio"] is not None else "–"
    cells = [r["id"], r["scenario"], spread(r["nip"], r["unit"]), peer, ratio, r["target"], verdict(r)]
    return "| " + " | ".join(cells) + " |"


def write(report):
    with open(f"{HERE}/results.json", "w") as f:
        json.dump(report, f, indent=2)
    m, p = report["machine"], report["params"]
    lines = [
        "# Benchmarks", "",
        f"Written by `bench/run.sh{' --quick' if report['mode'] == 'quick' else ''}` (mode **{report['mode']}**, "
        f"{report['finished']}, {report['seconds']:.0f} s without builds). `nip serve` (release build) and its",
        "peers run side by side on 127.0.0.1 in the same run; each figure is the median of the repeats with",
        "min–max in brackets. The load generators share the machine's cores with the servers, so absolute",
        "figures are low and noisy: read the ratios.", "",
        f"Machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['memory_gib']:.0f} GiB, kernel {m['kernel']}. "
        f"Versions: {m['nip']}; {m['nginx']}; Flask {m['flask']} under gunicorn {m['gunicorn']} "
        f"({m['gunicorn_workers']} sync workers); turborepo-remote-cache {m['turborepo']} on node {m['node']}; "
        f"{m['wrk']}; {m['curl']}.", "",
        f"Parameters: {p['repeats']} repeats, wrk {p['wrk_seconds']} s × 50 connections; "
        + "; ".join(report["notes"]) + ".", "",
        "| id | scenario | nip | peer | ratio | target | result |", "|---|---|---|---|---|---|---|",
    ] + [row_line(r) for r in report["rows"]]
    missed = [r for r in report["rows"] if not r["met"]]
    lines += ["", f"**{len(report['rows']) - len(missed)} of {len(report['rows'])} targets met.**"
              + (" Missed: " + ", ".join(f"{r['id']} {r['scenario']} ({verdict(r).split('(')[1]}" for r in missed)
                 if missed else ""), ""]
    lines += ["## How each scenario is measured", ""] + [f"- {h}" for h in HOW] + [""]
    lines += ["## Details of this run", ""] + [f"- {d}" for d in report["details"]] + [""]
    # Hand-written: profiles, experiments and runs of their own, kept across runs.
    notes = os.path.join(HERE, "notes.md")
    if os.path.exists(notes):
        with open(notes) as f:
            lines += [f.read().rstrip("\n"), ""]
    if report.get("criterion"):
        lines += ["## Micro-benchmarks (criterion, `--quick`)", "",
                  "| function | time per call |", "|---|---|"]
        lines += [f"| `{c['name']}` | {c['estimate']} ({c['low']} – {c['high']})"
                  + (f", {c['throughput']}" if c.get("throughput") else "") + " |" for c in report["criterion"]]
        lines += [""]
    with open(os.path.join(ROOT, "BENCHMARKS.md"), "w") as f:
        f.write("\n".join(lines))
