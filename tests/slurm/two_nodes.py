"""A throwaway two-node Slurm cluster on one machine: each node is a network namespace with its
own address on a private bridge (veth pairs), its own hostname (UTS namespace) and a hosts file
naming both nodes (mount namespace), running its own slurmd; slurmctld runs on the host at the
bridge's address. Torch's rendezvous, gloo and Slurm's own traffic between the nodes go over
the bridge, as between two machines. The filesystem is shared, as a cluster's is.

Needs root, ``ip`` (iproute2), ``nsenter`` and ``unshare`` (util-linux), besides what
``cluster.SlurmCluster`` needs."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
from pathlib import Path

from tests.slurm.cluster import SlurmCluster, SlurmUnavailable, _read_pid, _real_memory_mib

NODES = ("node0", "node1")


def _ip(*args: str, check: bool = True) -> None:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and res.returncode != 0:
        raise SlurmUnavailable(f"ip {' '.join(args)}: {res.stderr.strip()}")


class TwoNodeCluster(SlurmCluster):
    """Nodes ``node0`` and ``node1`` (each declared with all of this host's CPUs) in partition
    ``debug``. Names are unique per instance, so clusters of parallel test workers coexist."""

    node_suffix = "-%n"

    def __init__(self, root: Path):
        super().__init__(root)
        self.net = random.randrange(1, 250)
        self.bridge = f"ercb{self.net}"
        self.netns = {n: f"erc{self.net}{n}" for n in NODES}
        self.addr = {n: f"10.213.{self.net}.{10 + i}" for i, n in enumerate(NODES)}
        self.ctl_addr = f"10.213.{self.net}.1"
        self._net_up = False

    def start(self, timeout_s: float = 120) -> TwoNodeCluster:
        if os.geteuid() != 0:
            raise SlurmUnavailable("the two-node cluster needs root (network namespaces)")
        for tool in ("ip", "nsenter", "unshare"):
            if shutil.which(tool) is None:
                raise SlurmUnavailable(f"no {tool} on this machine")
        self._network_up()
        return super().start(timeout_s)

    def stop(self, timeout_s: float = 120) -> None:
        super().stop(timeout_s)
        if self._net_up:
            for ns in self.netns.values():
                _ip("netns", "del", ns, check=False)
            _ip("link", "del", self.bridge, check=False)
            self._net_up = False

    def node_pids(self, node: str) -> list[int]:
        """Pids of the processes living in ``node``'s network namespace."""
        res = subprocess.run(["ip", "netns", "pids", self.netns[node]], capture_output=True,
                             text=True, timeout=30)
        return [int(p) for p in res.stdout.split()]

    def kill_node_jobs(self, node: str) -> int:
        """SIGKILL every job process on ``node`` (torchrun, its ranks, the job's shell), as if
        the machine's jobs died; Slurm's own daemons stay. Returns how many were killed."""
        keep = {"slurmd", "slurmstepd"}
        killed = 0
        for pid in self.node_pids(node):
            try:
                name = Path(f"/proc/{pid}/comm").read_text().strip()
                if name in keep:
                    continue
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except (OSError, ProcessLookupError):
                pass
        return killed

    # ------------------------------------------------------------------ internals
    def _network_up(self) -> None:
        self._net_up = True  # from here on, stop() removes whatever was created
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.ctl_addr}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, node in enumerate(NODES):
            ns, veth = self.netns[node], f"erc{self.net}v{i}"
            _ip("netns", "add", ns)
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", veth, "master", self.bridge, "up")
            _ip("-n", ns, "addr", "add", f"{self.addr[node]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        host = socket.gethostname().split(".")[0]
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "hosts").write_text(
            "127.0.0.1 localhost\n" + f"{self.ctl_addr} {host}\n"
            + "".join(f"{a} {n}\n" for n, a in self.addr.items()))

    def _nodes_conf(self) -> tuple[str, str]:
        host = socket.gethostname().split(".")[0]
        mem = _real_memory_mib() // len(NODES)
        lines = "".join(f"NodeName={n} NodeAddr={a} CPUs={os.cpu_count()} RealMemory={mem} "
                        "State=UNKNOWN\n" for n, a in self.addr.items())
        return (f"{host}({self.ctl_addr})",
                lines + f"PartitionName=debug Nodes={','.join(NODES)} Default=YES "
                        "MaxTime=INFINITE State=UP\n")

    def _start_slurmd(self) -> None:
        # nsenter, not `ip netns exec` (which remounts /sys and hides the cgroup tree slurmd
        # needs); the new UTS and mount namespaces give the node its hostname and hosts file
        for node in NODES:
            (self.root / f"spool-{node}").mkdir(exist_ok=True)
            script = (f"mount --bind {self.root / 'hosts'} /etc/hosts && hostname {node} && "
                      f"exec slurmd -f {self.conf}")
            res = subprocess.run(["nsenter", f"--net=/run/netns/{self.netns[node]}", "unshare",
                                  "--uts", "--mount", "sh", "-c", script], env=self.env,
                                 capture_output=True, text=True, timeout=60)
            if res.returncode != 0:
                raise SlurmUnavailable(f"slurmd on {node} did not start: {res.stderr[-500:]}\n"
                                       f"{self.log_tail('slurmd-' + node)}")
            self._pids.append(_read_pid(self.root / f"slurmd-{node}.pid"))
