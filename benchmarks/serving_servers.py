"""The servers benchmarks/serving.py drives: their names, labels and command lines, which of the peer's modes run a
workload's requests as asked, and a server process on 127.0.0.1: started in its own session, waited for, measured
(RSS and CPU time from /proc), stopped by PID (SIGTERM, then SIGKILL after GRACE_S)."""

import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
SERVERS = ("sllm-cb", "sllm", "peer", "peer-cb", "peer-own")
SLLM_MODES, PEER_MODES = ("sllm-cb", "sllm"), ("peer", "peer-cb", "peer-own")
OFFLINE = {"sllm-offline": "sllm", "peer-offline": "peer"}  # offline `generate` in this process (--offline)
DEFAULT_SERVERS = {"uniform": ("sllm-cb", "peer", "peer-cb"), "mixed": ("sllm-cb", "peer-own")}
# The peer's modes that run each request with its own settings: `transformers serve` runs a request at temperature
# > 0 greedily where the checkpoint's generation config has no do_sample (the shipped peer's has none), and its
# continuous batching runs every request with the first request's settings; `sllm-serve` on the peer (a plain LM,
# sequential) samples at temperature > 0 and runs each request with its own settings.
QUALIFYING_PEERS = {"uniform": PEER_MODES, "mixed": ("peer-own",)}
LABELS = {"sllm-cb": "SLLM, continuous batching", "sllm": "SLLM, sequential",
          "peer": "token LM, sequential", "peer-cb": "token LM, continuous batching",
          "peer-own": "token LM, sequential under sllm-serve (per-request settings honoured)",
          "sllm-offline": "SLLM, offline generate", "peer-offline": "token LM, offline generate"}  # fmt: skip
GRACE_S = 15  # seconds between SIGTERM and SIGKILL


def wait_for_health(url: str, process: subprocess.Popen, limit: float = 120) -> str | None:
    """Poll `url`/health until it answers 200 (None), or say why it did not: the process exited, or `limit` seconds
    passed."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return f"exited with code {process.returncode}"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return None
        except httpx.TransportError:
            time.sleep(0.3)
    return f"did not answer /health within {limit:g} s"


def process_tree(pid: int) -> list[int]:
    """`pid` and its living descendants (from /proc/*/stat)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    return tree


def start_time(pid: int) -> int | None:
    """When a process started (clock ticks after boot; field 22 of /proc/PID/stat), None if it is gone: with the PID,
    it names one process even after the PID is reused."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def rss_bytes(pids: list[int]) -> int:
    """Sum of VmRSS of the processes (those gone count 0)."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            pass
    return total


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of the processes so far (all their threads)."""
    ticks, per_second = 0, os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return ticks / per_second


def machine_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs so far, from /proc/stat (idle and iowait count as not busy)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest time is inside user)
    return total - fields[3] - fields[4], total


class RssSampler:
    """Samples the RSS of a process tree at `hz` in a thread: the peak between start() and stop()."""

    def __init__(self, pids: list[int], hz: float):
        self.pids, self.interval, self.peak, self.samples = pids, 1.0 / hz, 0, 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while True:
            self.peak = max(self.peak, rss_bytes(self.pids))
            self.samples += 1
            if self.done.wait(self.interval):
                return

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, rss_bytes(self.pids))  # the last moment too


def free_port(host: str, taken: set[int]) -> int:
    """A port of `host` that nothing listens on now and that is not in `taken`."""
    while True:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in taken:
            return port


class Server:
    """One server process: its command, port, log, PID and state."""

    def __init__(self, name: str, command: list[str], host: str, port: int, log: Path):
        self.name, self.command, self.host, self.port, self.log = name, command, host, port, log
        self.url = f"http://{host}:{port}"
        self.process: subprocess.Popen | None = None
        self.pids: list[int] = []
        self.failure: str | None = None
        self.startup_s: float | None = None

    def start(self) -> None:
        """Start the process (its own session: a Ctrl-C at the terminal reaches this script, which stops it)."""
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        env["PYTHONUNBUFFERED"] = "1"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        if shutil.which(self.command[0]) is None:
            self.failure = f"{self.command[0]!r} not found (give the command with --command {self.name}=...)"
            return
        with self.log.open("w") as log:
            log.write("$ " + shlex.join(self.command) + "\n")
            log.flush()
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            cwd=ROOT, start_new_session=True)  # fmt: skip
        self.started = time.perf_counter()

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of the server's log."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_ready(self, deadline: float) -> None:
        """Wait until GET /health answers 200 (sets `failure` if the process exits or the deadline passes)."""
        if self.process is None:
            return
        while True:
            if not self.alive():
                self.failure = f"exited with {self.process.returncode} while starting: {self.log_tail()}"
                return
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    self.startup_s = time.perf_counter() - self.started
                    self.pids = process_tree(self.process.pid)
                    return
            except httpx.HTTPError:
                pass
            if time.perf_counter() > deadline:
                self.failure = f"not ready (/health) within the startup timeout: {self.log_tail()}"
                return
            time.sleep(1)

    def stop(self) -> dict:
        """SIGTERM to the process (and the children it had), SIGKILL after GRACE_S; what happened."""
        if self.process is None:
            return {"stopped": "never started"}
        if self.process.poll() is not None:
            return {"stopped": f"had exited with {self.process.returncode}"}
        others = {p: start_time(p) for p in process_tree(self.process.pid) if p != self.process.pid}
        self.process.terminate()
        try:
            self.process.wait(GRACE_S)
            how = "SIGTERM"
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(GRACE_S)
            how = "SIGKILL"
        for pid, started in others.items():  # children the server left behind, if any (the same processes)
            if started is not None and start_time(pid) == started:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        return {"stopped": how, "returncode": self.process.returncode}

    def wait_quiet(self, limit: float) -> float:
        """Wait (at most `limit` s) until the server uses under 10% of a core over a second; seconds waited."""
        start = time.perf_counter()
        while time.perf_counter() - start < limit and self.alive():
            before = cpu_seconds(self.pids)
            time.sleep(1)
            if cpu_seconds(self.pids) - before < 0.1:
                break
        return time.perf_counter() - start


def server_commands(args) -> dict[str, list[str]]:
    """{server name: argv}, --command overrides filled in."""
    sllm = f"{shlex.quote(args.sllm_serve)} {{folder}} --host {{host}} --port {{port}}"
    peer = "transformers serve {folder} --host {host} --port {port} --dtype float32"
    cb = f"--continuous-batching {args.cb_args}".strip()  # the paged cache's size: the peer's only
    templates = {
        "sllm-cb": f"{sllm} --continuous-batching --dtype float32 --trust-remote-code",
        "sllm": f"{sllm} --dtype float32 --trust-remote-code",
        "peer": peer,
        "peer-cb": f"{peer} {cb}",
        "peer-own": f"{sllm} --dtype float32",
    } | args.command  # fmt: skip
    return {name: shlex.split(templates[name]) for name in args.servers}
