"""Starting and stopping the servers of a run: `nip serve` and its peers (nginx static, the Flask
reference under gunicorn, turborepo-remote-cache), each on a free 127.0.0.1 port, logs in the run's
work directory. `Servers` stops everything it started, also when a scenario fails."""
import os, subprocess, time

from common import HERE, free_port, wait_up

TOKEN = "nip-bench-token-0123456789abcdef"


class Server:
    def __init__(self, name, port, proc, log):
        self.name, self.port, self.proc, self.log = name, port, proc, log

    @property
    def pid(self):
        return self.proc.pid

    def stop(self):
        """SIGTERM, then SIGKILL after 10 s; waits for the process."""
        if self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Servers:
    """The servers of one run; `with Servers(work) as s:` stops them all on the way out."""

    def __init__(self, work, nip_binary):
        self.work, self.nip_binary, self.started = work, nip_binary, []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for s in reversed(self.started):
            s.stop()

    def _start(self, name, cmd, env=None, ready_path="/nix-cache-info", headers=None, port=None):
        port = port or free_port()
        log = f"{self.work}/{name}.log"
        proc = subprocess.Popen([c.replace("{port}", str(port)) for c in cmd], stdout=subprocess.DEVNULL,
                                stderr=open(log, "w"), env={**os.environ, **(env or {})})
        server = Server(name, port, proc, log)
        self.started.append(server)
        if ready_path:
            wait_up(port, ready_path, seconds=120, headers=headers, proc=proc, log=log)
        return server

    def nginx(self, name, root, access_log=None):
        env = {"ACCESS_LOG": access_log} if access_log else {}
        return self._start(name, ["bash", f"{HERE}/run-nginx-static.sh", "{port}", root], env)

    def flask(self, name="flask"):
        return self._start(name, ["bash", f"{HERE}/run-flask-reference.sh", "{port}", f"{self.work}/{name}-data",
                                  TOKEN],
                           ready_path="/v1/health")

    def turbo(self, name="turborepo"):
        return self._start(name, ["bash", f"{HERE}/run-turborepo-remote-cache.sh", "{port}", f"{self.work}/{name}-data",
                                  TOKEN], ready_path="/v8/artifacts/status")

    def nip(self, name, public_key, upstream=None, extra=(), data_dir=None, ready=True):
        """`nip serve` with its own data directory, uploads allowed, TOKEN as a read-write API key,
        trusting public_key upstream and for uploads. Without an upstream it points at a closed
        port, so every miss is a quick 404; uploads of the data set still go through, being signed
        by that key (a trusted upload key vouches while an upstream cannot answer)."""
        cmd = [self.nip_binary, "serve", "--cache-data-path", data_dir or f"{self.work}/{name}-data",
               "--server-addr", "127.0.0.1:{port}", "--cache-allow-put-verb", "--cache-hostname", "bench",
               "--upstream-cache", upstream or "http://127.0.0.1:9", "--upstream-public-key", public_key,
               "--cache-trusted-upload-key", public_key, "--log-level", "warn"]
        return self._start(name, cmd + list(extra), env={"NIP_CACHE_API_KEY": TOKEN},
                           ready_path="/nix-cache-info" if ready else None)

    def stop(self, server):
        server.stop()
        self.started.remove(server)


def cold_start_seconds(servers, name, public_key, data_dir, probe_path, timeout=60):
    """Starts nip on an existing data directory and returns the seconds from exec to the first
    200 on probe_path (polled every 5 ms); the server is left running."""
    t = time.perf_counter()
    server = servers.nip(name, public_key, data_dir=data_dir, ready=False)
    wait_up(server.port, probe_path, seconds=timeout, interval=0.005, proc=server.proc, log=server.log)
    return time.perf_counter() - t, server
