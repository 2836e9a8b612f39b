"""Helpers shared by the benchmark scenarios: ports, waiting for servers, wrk and curl runs, timing
of single requests, process memory, and medians with spread. Everything talks to 127.0.0.1 only,
and every loop is bounded in count and time."""
import http.client, os, re, socket, statistics, subprocess, time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MIB = 1 << 20


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def get_status(port, path, headers=None, timeout=2):
    """Status of one GET (body read and dropped), or None when the server does not answer."""
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        c.request("GET", path, headers=headers or {})
        r = c.getresponse()
        r.read()
        c.close()
        return r.status
    except OSError:
        return None


def wait_up(port, path="/nix-cache-info", seconds=60, headers=None, interval=0.1, proc=None, log=None):
    """Seconds until GET path answers 200; exits when that takes longer than `seconds`, or when
    the server's process `proc` ends first (showing the end of its `log`)."""
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        if get_status(port, path, headers) == 200:
            return time.perf_counter() - start
        if proc is not None and proc.poll() is not None:
            tail = open(log).read()[-2000:] if log else ""
            raise SystemExit(f"server on port {port} exited ({proc.returncode}) before answering:\n{tail}")
        time.sleep(interval)
    raise SystemExit(f"server on port {port} did not answer 200 on {path} within {seconds} s")


def summary(values):
    """Median with min–max over repeats (the raw runs kept for the JSON)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def percentile(values, p):
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


def wrk(port, paths_file, duration, token=None, connections=50, cpus=None):
    """One bounded wrk run cycling through the paths in paths_file: (req/s, p99 ms, non-2xx);
    on the CPUs `cpus` (taskset list) when given."""
    cmd = (["taskset", "-c", cpus] if cpus else []) + ["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--timeout", "5s", "--latency",
           "-s", f"{HERE}/paths.lua"]
    if token:
        cmd += ["-H", f"Authorization: Bearer {token}"]
    out = subprocess.run(cmd + [f"http://127.0.0.1:{port}"], env={**os.environ, "PATHS": paths_file},
                         capture_output=True, text=True, check=True, timeout=duration + 30).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    p99_ms = float(p99.group(1)) * {"us": 0.001, "ms": 1, "s": 1000}[p99.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rps, p99_ms, int(errors.group(1)) if errors else 0


def wrk_summary(port, paths_file, duration, repeats, token=None, cpus=None):
    runs = [wrk(port, paths_file, duration, token, cpus=cpus) for _ in range(repeats)]
    return {"rps": summary([r[0] for r in runs]), "p99_ms": summary([r[1] for r in runs]),
            "errors": sum(r[2] for r in runs)}


def auth(token):
    return {"Authorization": f"Bearer {token}"} if token else {}


def download(port, path, token=None, timeout=600):
    """GET path, reading the body in 1 MiB pieces: (bytes, seconds to first byte, total seconds)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    t = time.perf_counter()
    c.request("GET", path, headers=auth(token))
    r = c.getresponse()
    first = r.read(1)
    ttfb = time.perf_counter() - t
    n = len(first)
    while True:
        b = r.read(MIB)
        if not b:
            break
        n += len(b)
    c.close()
    if r.status != 200:
        raise SystemExit(f"GET {path} on port {port}: HTTP {r.status}")
    return n, ttfb, time.perf_counter() - t


def curl_parallel(commands, timeout=900):
    """Starts one curl per argument list together and waits for all (bounded by timeout);
    returns (seconds, bytes downloaded in total). Any failed transfer ends the run."""
    t = time.perf_counter()
    procs = [subprocess.Popen(["curl", "-sS", "--fail", "-o", "/dev/null", "-w", "%{size_download}", "-H", "Expect:"]
                              + c, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for c in commands]
    deadline, total, failures = time.monotonic() + timeout, 0, []
    for p in procs:
        try:
            out, err = p.communicate(timeout=max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        if p.returncode != 0:
            failures.append(err.decode().strip() or f"exit {p.returncode}")
        else:
            total += int(float(out or 0))
    if failures:
        raise SystemExit(f"{len(failures)} of {len(commands)} transfers failed: {failures[0]}")
    return time.perf_counter() - t, total


def throughput(port, path, parallel, token=None):
    """MiB/s summed over `parallel` concurrent curl downloads of path (curl, not Python, so the
    client is not the limit)."""
    args = ["-H", f"Authorization: Bearer {token}"] if token else []
    seconds, total = curl_parallel([args + [f"http://127.0.0.1:{port}{path}"] for _ in range(parallel)])
    return total / seconds / MIB


def ttfb_ms(conn, path):
    """Milliseconds from sending a GET on a kept-alive connection to its first body byte."""
    t = time.perf_counter()
    conn.request("GET", path)
    r = conn.getresponse()
    r.read(1)
    ms = (time.perf_counter() - t) * 1000
    r.read()
    if r.status != 200:
        raise SystemExit(f"GET {path}: HTTP {r.status}")
    return ms


def curl_times(args, timeout=600):
    """Runs curl (fails on HTTP errors); returns the seconds to the first byte and in total."""
    out = subprocess.run(["curl", "-sS", "--fail", "-o", "/dev/null", "-w", "%{time_starttransfer} %{time_total}",
                          "-H", "Expect:"] + args, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise SystemExit(f"curl {' '.join(args)}: {out.stderr.strip()}")
    first, total = out.stdout.split()
    return float(first), float(total)


def curl(args, timeout=600):
    """Seconds curl reports for the whole transfer."""
    return curl_times(args, timeout)[1]


def curl_multipart(url, file, token, metadata="{}"):
    """Seconds for a multipart upload (fields `file` and `metadata`), streamed from file."""
    return curl(["-H", f"Authorization: Bearer {token}", "-F", f"file=@{file}",
                 "-F", f"metadata={metadata}", url])


def http_multipart(port, path, body, token, metadata="{}"):
    """Small multipart upload over http.client (no curl process per request); returns the status."""
    boundary = "nipbenchboundary"
    data = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"metadata\"\r\n\r\n{metadata}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + body + f"\r\n--{boundary}--\r\n".encode()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    c.request("POST", path, body=data, headers={**auth(token),
              "Content-Type": f"multipart/form-data; boundary={boundary}"})
    r = c.getresponse()
    r.read()
    c.close()
    return r.status


def copy_with_prefix(src, dst, prefix):
    """dst = src with its first bytes replaced by prefix: same size, different content (so a
    content-addressed server cannot skip storing it)."""
    with open(src, "rb") as f, open(dst, "wb") as g:
        f.seek(len(prefix))
        g.write(prefix)
        while True:
            b = f.read(8 * MIB)
            if not b:
                break
            g.write(b)


def reset_peak_rss(pid):
    """Resets VmHWM of a process (Linux: clear_refs 5), so the next read is this phase's peak."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


def version(cmd):
    """First line a program prints about its version, or 'unknown'."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except OSError:
        return "unknown"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "unknown"
