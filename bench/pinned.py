"""P2 again with the load generator and the servers on separate cores (`taskset`): on a 2-core
machine wrk and the server under test otherwise take turns on the same cores, and a server that
uses more CPU per request loses twice (its own work, and the core wrk needed). Pinned, each server
has one core to itself and wrk the other, so the ratio shows the servers' cost per request."""
import os, subprocess

from common import wrk_summary
from report import versus


def descendants(pid):
    """pid and every process below it (nginx's master and its workers)."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        for task in os.listdir(f"/proc/{p}/task"):
            try:
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
            except FileNotFoundError:
                pass
    return pids


def cpu_seconds(pid):
    """User + system CPU seconds of pid and its descendants so far."""
    total = 0
    for p in descendants(pid):
        with open(f"/proc/{p}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def pin(pid, cpus):
    """Every thread of pid and of its descendants onto cpus ("0", "0,1")."""
    for p in descendants(pid):
        subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(p)], check=True, capture_output=True)


def p2_pinned(ctx):
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        ctx.details.append("P2 pinned: skipped, this machine lets the run use one CPU.")
        return []
    server_cpu, load_cpu, every = str(cpus[0]), str(cpus[1]), ",".join(map(str, cpus))
    if "p1_p2" not in ctx.raw:
        from scenarios import upload_nix
        upload_nix(ctx.nip.port, ctx.manifest["cache"], ctx.manifest["small"])
    results = {}
    for s in (ctx.nginx, ctx.nip):
        pin(s.pid, server_cpu)
        try:
            before = cpu_seconds(s.pid)
            results[s.name] = wrk_summary(s.port, ctx.narinfos, ctx.duration, ctx.repeats, cpus=load_cpu)
            spent = cpu_seconds(s.pid) - before
        finally:
            pin(s.pid, every)
        # CPU per request is what the server costs, whoever else shares the machine.
        requests = sum(results[s.name]["rps"]["runs"]) * ctx.duration
        results[s.name]["cpu_us_per_request"] = spent / requests * 1e6
    ctx.raw["p2_pinned"] = results
    n, g = results["nip"], results["nginx"]
    ctx.details.append(
        f"P2 pinned (server on CPU {server_cpu}, wrk on CPU {load_cpu}): nip {n['rps']['median']:.0f} req/s, "
        f"p99 {n['p99_ms']['median']:.2f} ms; nginx ({'one core for all its workers'}) "
        f"{g['rps']['median']:.0f} req/s, p99 {g['p99_ms']['median']:.2f} ms; non-2xx: nip {n['errors']}, "
        f"nginx {g['errors']}. Server CPU per request: nip {n['cpu_us_per_request']:.1f} µs, nginx "
        f"{g['cpu_us_per_request']:.1f} µs ({n['cpu_us_per_request'] / g['cpu_us_per_request']:.2f}×): where "
        "neither server fills its core, the req/s ratio is set by latency and the load generator, "
        "not by the server's cost.")
    return [versus("P2", f"narinfo hits, {len(ctx.manifest['small'])} distinct, req/s, server and wrk on "
                   "separate cores", "req/s", n["rps"], "nginx", g["rps"], 0.8)]
