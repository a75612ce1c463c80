"""A throwaway one-node Slurm cluster on this machine: munge auth, slurmctld and slurmd with a
generated config in a temporary directory. Needs root (the daemons run as root) and the Debian
packages ``slurmctld slurmd slurm-client munge``, which :func:`ensure_installed` installs."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "munged")
MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_PARENT = "/run" if os.access("/run", os.W_OK) else None


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be set up here; the message says why (tests skip with it)."""


def _missing() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def ensure_installed(timeout_s: float = 900) -> None:
    """apt-get install the Slurm and munge packages when their binaries are missing."""
    if not _missing():
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"missing {', '.join(_missing())} and not root to install "
                               f"{' '.join(PACKAGES)}")
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"missing {', '.join(_missing())} and no apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    if res.returncode != 0:  # a stale package index is the usual cause
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=timeout_s)
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    if res.returncode != 0 or _missing():
        raise SlurmUnavailable(f"could not install {' '.join(PACKAGES)}: "
                               f"{(res.stderr or res.stdout)[-500:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _real_memory_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return max(256, int(line.split()[1]) // 1024 - 256)  # headroom: never "too low"
    raise SlurmUnavailable("no MemTotal in /proc/meminfo")


def _read_pid(path: Path, timeout_s: float = 30) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            return int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            time.sleep(0.2)
    raise SlurmUnavailable(f"no pid file {path} after {timeout_s:.0f} s")


def _stop_pid(pid: int, timeout_s: float = 30) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class SlurmCluster:
    """One node (this host, all its CPUs) in partition ``debug``; ``env`` points clients at it.

    Ports are picked free, so several clusters (e.g. one per pytest-xdist worker) coexist."""

    node_suffix = ""
    """Appended to slurmd's spool, pid and log paths (``-%n``: one per node name)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._pids: list[int] = []  # started by us, stopped in reverse order
        self.munge_dir: Path | None = None

    def start(self, timeout_s: float = 120) -> SlurmCluster:
        if os.geteuid() != 0:
            raise SlurmUnavailable("the test cluster runs slurmctld/slurmd as root; not root")
        ensure_installed()
        self._start_munge()
        self._write_conf()
        self._daemon(["slurmctld", "-f", str(self.conf)], "slurmctld")
        self._start_slurmd()
        self._wait_idle(timeout_s)
        return self

    def _daemon(self, cmd: list[str], name: str) -> None:
        res = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if res.returncode != 0:
            raise SlurmUnavailable(f"{name} did not start: {res.stderr[-500:]}\n"
                                   f"{self.log_tail(name)}")
        self._pids.append(_read_pid(self.root / f"{name}.pid"))

    def _start_slurmd(self) -> None:
        self._daemon(["slurmd", "-f", str(self.conf)], "slurmd")

    def stop(self, timeout_s: float = 120) -> None:
        """Cancel whatever jobs are left (their slurmstepd would outlive slurmd), then stop the
        daemons this cluster started, by pid."""
        if self._pids and self.conf.exists():
            subprocess.run(["scancel", "--partition=debug"], env=self.env, capture_output=True,
                           timeout=60)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                res = subprocess.run(["squeue", "-h", "-o", "%A"], env=self.env,
                                     capture_output=True, text=True, timeout=60)
                if res.returncode != 0 or not res.stdout.strip():
                    break
                time.sleep(1)
        while self._pids:
            _stop_pid(self._pids.pop())
        if self.munge_dir is not None:
            shutil.rmtree(self.munge_dir, ignore_errors=True)
            self.munge_dir = None

    def run(self, *cmd: str, check: bool = True, timeout: float = 120, tries: int = 5) -> str:
        """Run a client command; retried when slurmctld is too busy to answer in time."""
        for attempt in range(tries):
            res = subprocess.run(cmd, env=self.env, capture_output=True, text=True,
                                 timeout=timeout)
            if res.returncode == 0 or "timed out" not in res.stderr or attempt == tries - 1:
                break
            time.sleep(2)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {res.returncode}: {res.stderr}")
        return res.stdout

    def log_tail(self, daemon: str, lines: int = 30) -> str:
        path = self.root / f"{daemon}.log"
        return "\n".join(path.read_text().splitlines()[-lines:]) if path.exists() else ""

    # ------------------------------------------------------------------ internals
    def _start_munge(self) -> None:
        """A munged of our own on a private socket (slurm.conf's AuthInfo), so clusters of
        parallel test workers and any system munged never share or stop each other's."""
        if not MUNGE_KEY.exists():
            MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
            MUNGE_KEY.write_bytes(os.urandom(1024))
            shutil.chown(MUNGE_KEY, "munge", "munge")
            MUNGE_KEY.chmod(0o400)
        # munged runs as user munge, which cannot enter pytest's root-only temp directories
        self.munge_dir = Path(tempfile.mkdtemp(prefix="munge-pytest-", dir=MUNGE_PARENT))
        self.munge_dir.chmod(0o755)  # munged wants its socket directory searchable by all
        shutil.chown(self.munge_dir, "munge", "munge")
        d = self.munge_dir
        res = subprocess.run(["runuser", "-u", "munge", "--", "munged", f"--socket={d}/socket",
                              f"--pid-file={d}/munged.pid", f"--log-file={d}/munged.log",
                              f"--seed-file={d}/munged.seed"],
                             capture_output=True, text=True, timeout=60)
        if res.returncode != 0:
            raise SlurmUnavailable(f"munged did not start: {res.stderr[-500:]}")
        self._pids.append(_read_pid(d / "munged.pid"))

    def _nodes_conf(self) -> tuple[str, str]:
        """``SlurmctldHost`` value and the node + partition lines: this host, all its CPUs."""
        host = socket.gethostname().split(".")[0]
        return host, (f"NodeName={host} CPUs={os.cpu_count()} RealMemory={_real_memory_mib()} "
                      f"State=UNKNOWN\nPartitionName=debug Nodes={host} Default=YES "
                      "MaxTime=INFINITE State=UP\n")

    def _write_conf(self) -> None:
        ctl, nodes = self._nodes_conf()
        for d in ("state", "spool"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        r = self.root
        self.conf.write_text(f"""\
ClusterName=pytest
SlurmctldHost={ctl}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
AuthInfo=socket={self.munge_dir}/socket
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmUser=root
SlurmdUser=root
MpiDefault=none
ReturnToService=2
MinJobAge=3600
KillWait=10
MessageTimeout=60
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool{self.node_suffix}
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd{self.node_suffix}.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd{self.node_suffix}.log
JobCompType=jobcomp/filetxt
JobCompLoc={r}/jobcomp.log
{nodes}""")

    def _wait_idle(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        state = ""
        while time.monotonic() < deadline:
            res = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env,
                                 capture_output=True, text=True, timeout=30)
            state = res.stdout.strip()
            if state and set(state.split()) == {"idle"}:
                return
            time.sleep(1)
        slurmd = "slurmd" + self.node_suffix.replace("%n", "node0")
        raise SlurmUnavailable(f"nodes not idle after {timeout_s:.0f} s (sinfo: {state!r})\n"
                               f"{self.log_tail('slurmctld')}\n{self.log_tail(slurmd)}")
