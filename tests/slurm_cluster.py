"""A real one-node SLURM cluster on 127.0.0.1, from Debian's packages, for the tests.

Nothing here is mocked: ``munged``, ``mariadbd``, ``slurmdbd``, ``slurmctld`` and
``slurmd`` run as root, each in the foreground as a child of the test process (so each is
stopped by its own process id), with every file under one scratch folder and every port
picked free:

* munge authenticates the daemons and the clients (its own key and socket);
* MariaDB (a scratch data folder, TCP on 127.0.0.1) stores slurmdbd's accounting, so
  ``sacct`` answers from the database as on a production cluster;
* the node declares the machine's CPUs and no GPU (there is none).

One system path is touched: ``/etc/slurm/slurm.conf`` becomes a symbolic link to the
scratch configuration while the cluster runs (and is removed after). The SLURM executor
plugin's job step clears every ``SLURM_*`` variable before its inner ``srun``,
``SLURM_CONF`` included, so ``srun`` inside a job only finds a configuration at the
default path. A machine that already has its own ``/etc/slurm/slurm.conf`` is left alone
(the test is skipped). A lock file keeps two test clusters from running at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import TextIO

PACKAGES = ("munge", "slurmctld", "slurmd", "slurm-client", "slurmdbd", "mariadb-server")
COMMANDS = ("munged", "munge", "mariadbd", "mariadb-install-db", "mariadb", "slurmdbd",
            "slurmctld", "slurmd", "sbatch", "srun", "squeue", "sacct", "sacctmgr", "scontrol",
            "sinfo", "scancel")
SYSTEM_CONF = Path("/etc/slurm/slurm.conf")
MACHINE_LOCK = Path("/run/lock" if Path("/run/lock").is_dir() else "/tmp") / "emoprompt-slurm.lock"
MARKER = "emoprompt-slurm-cluster"  # in the scratch folder's name: our own links are recognised
CLUSTER = "emoprompt"


class ClusterUnavailable(Exception):
    """SLURM cannot run here (not installable, not root, ...): the reason is the message."""


def missing_commands() -> list[str]:
    return [c for c in COMMANDS if shutil.which(c) is None]


def install_slurm(timeout: float = 300) -> None:
    """Install Debian's SLURM, munge and MariaDB packages where they are missing.

    Raises ClusterUnavailable with the reason when that is impossible here. While apt-get
    runs, a policy-rc.d (where there is none) keeps the packages from starting services.
    """
    if not missing_commands():
        return
    if os.name != "posix" or os.geteuid() != 0:
        raise ClusterUnavailable("SLURM is not installed, and installing it needs root")
    if shutil.which("apt-get") is None:
        raise ClusterUnavailable("SLURM is not installed and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    bounded = ["-o", "Acquire::http::Timeout=20", "-o", "Acquire::Retries=1"]
    install = ["apt-get", *bounded, "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    policy = Path("/usr/sbin/policy-rc.d")
    own_policy = not policy.exists()
    if own_policy:
        policy.write_text("#!/bin/sh\n# emoprompt tests: no services start during apt-get\n"
                          "exit 101\n")
        policy.chmod(0o755)
    try:
        result = _apt(install, env, timeout)
        if result.returncode != 0:  # package lists may be missing or stale: update once
            update = _apt(["apt-get", *bounded, "update", "-q"], env, timeout)
            if update.returncode != 0:
                raise ClusterUnavailable(f"apt-get update failed: {_tail(update.stdout)}")
            result = _apt(install, env, timeout)
        if result.returncode != 0:
            raise ClusterUnavailable(f"apt-get install failed: {_tail(result.stdout)}")
    finally:
        if own_policy:
            policy.unlink(missing_ok=True)
    if missing_commands():
        raise ClusterUnavailable(f"installed, but still missing: {', '.join(missing_commands())}")


def _apt(cmd: list[str], env: Mapping[str, str], timeout: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise ClusterUnavailable(f"{' '.join(cmd)} took over {timeout:g} s") from None
    except OSError as exc:
        raise ClusterUnavailable(f"{' '.join(cmd)} could not run: {exc}") from None


def _tail(text: str, lines: int = 6) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])


def free_port(taken: Collection[int] = ()) -> int:
    """A free port below the kernel's ephemeral range. The daemons bind theirs tens of
    seconds after the ports are chosen, and meanwhile the clients' own connections
    (sacctmgr, scontrol, slurmctld to slurmdbd) take ephemeral ports: a port from that
    range was once taken before slurmd bound it ("Address already in use"). Never one
    of ``taken``."""
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in random.sample(range(max(1024, low - 12000), low), 200):
        if port in taken:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise ClusterUnavailable(f"no free port below the ephemeral range ({low})")


def wait_for(process: subprocess.Popen, what: str, check: Callable[[], bool], timeout: float,
             logs: list[Path]) -> None:
    """Poll ``check`` until it is true; fail, with the daemon's logs, when ``process`` exits
    or after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            problem = f"{what} exited with status {process.returncode}"
            break
        if check():
            return
        time.sleep(0.5)
    else:
        problem = f"{what} not ready after {timeout:g} s"
    tails = "\n".join(f"--- {log}\n{_tail(log.read_text(errors='replace'), 15)}"
                      for log in logs if log.exists())
    raise RuntimeError(f"{problem}\n{tails}")


class SlurmCluster:
    """Start with :meth:`start` (or ``with``), stop with :meth:`stop` (always safe)."""

    def __init__(self, root: Path, partition: str = "cpu") -> None:
        self.root = root / MARKER
        self.partition = partition
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "etc" / "slurm.conf"
        self.processes: list[tuple[str, subprocess.Popen]] = []
        self._lock: TextIO | None = None
        self._linked = False

    # -- environment -------------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        """The environment for SLURM clients (sbatch, sacct, snakemake's SLURM executor)."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *cmd: str, timeout: float = 60, check: bool = True) -> str:
        result = subprocess.run(cmd, env=self.env, capture_output=True, text=True,
                                timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {result.stdout}{result.stderr}")
        return result.stdout

    def _ok(self, *cmd: str) -> bool:
        try:
            return subprocess.run(cmd, env=self.env, capture_output=True, timeout=20,
                                  check=False).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    # -- start / stop ------------------------------------------------------------------
    def __enter__(self) -> SlurmCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, lock_timeout: float = 900) -> None:
        if os.geteuid() != 0:
            raise ClusterUnavailable("the cluster's daemons (slurmd, munged) need root")
        self._take_machine_lock(lock_timeout)
        try:
            self._claim_system_conf()
            self._start_all()
        except BaseException:
            self.stop()
            raise

    def _take_machine_lock(self, timeout: float) -> None:
        handle = open(MACHINE_LOCK, "a+", encoding="utf-8")  # noqa: SIM115 - held until stop()
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    handle.close()
                    raise ClusterUnavailable(
                        f"another test SLURM cluster held {MACHINE_LOCK} for {timeout:g} s"
                    ) from None
                time.sleep(2)
        self._lock = handle

    def _claim_system_conf(self) -> None:
        if SYSTEM_CONF.is_symlink() and MARKER in os.readlink(SYSTEM_CONF):
            SYSTEM_CONF.unlink()  # left by a test run that was killed (we hold the lock)
        if SYSTEM_CONF.exists() or SYSTEM_CONF.is_symlink():
            raise ClusterUnavailable(
                f"this machine has its own SLURM configuration ({SYSTEM_CONF}); "
                "the test does not touch it"
            )
        SYSTEM_CONF.parent.mkdir(parents=True, exist_ok=True)
        SYSTEM_CONF.symlink_to(self.conf)
        self._linked = True

    def _daemon(self, name: str, *cmd: str) -> subprocess.Popen:
        log = open(self.root / "log" / f"{name}.out", "ab")  # noqa: SIM115 - the child's
        try:
            process = subprocess.Popen(cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT)
        finally:
            log.close()
        self.processes.append((name, process))
        return process

    def _start_all(self) -> None:
        for folder in ("etc", "log", "run", "munge", "db", "state", "spool"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        (self.root / "munge").chmod(0o700)
        ports: dict[str, int] = {}
        for name in ("slurmctld", "slurmd", "slurmdbd", "mariadb"):
            ports[name] = free_port(taken=ports.values())
        log = self.root / "log"

        # munge: a fresh key, a private socket.
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        sock = self.root / "munge" / "munge.socket"
        munged = self._daemon("munged", "munged", "-F", "--force", f"--socket={sock}",
                              f"--key-file={key}", f"--log-file={log / 'munged.log'}",
                              f"--pid-file={self.root / 'run' / 'munged.pid'}",
                              f"--seed-file={self.root / 'munge' / 'munged.seed'}")
        wait_for(munged, "munged", lambda: self._ok("munge", "-n", "-S", str(sock)), 30,
                 [log / "munged.log", log / "munged.out"])

        # MariaDB for slurmdbd.
        db = self.root / "db"
        self.run("mariadb-install-db", "--no-defaults", f"--datadir={db}", "--user=root",
                 "--auth-root-authentication-method=normal", "--skip-test-db", timeout=180)
        db_sock = self.root / "run" / "mysqld.sock"
        mariadbd = self._daemon(
            "mariadbd", "mariadbd", "--no-defaults", f"--datadir={db}", "--user=root",
            f"--socket={db_sock}", f"--port={ports['mariadb']}", "--bind-address=127.0.0.1",
            "--skip-name-resolve", f"--pid-file={self.root / 'run' / 'mysqld.pid'}",
            f"--log-error={log / 'mariadbd.log'}", "--innodb-buffer-pool-size=64M",
        )
        client = ("mariadb", "--no-defaults", f"--socket={db_sock}", "-uroot")
        wait_for(mariadbd, "mariadbd", lambda: self._ok(*client, "-e", "SELECT 1"), 60,
                 [log / "mariadbd.log", log / "mariadbd.out"])
        self.run(*client, "-e", "CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm'; "
                 "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';")

        self._write_configs(ports, sock)

        slurmdbd = self._daemon("slurmdbd", "slurmdbd", "-D")
        wait_for(slurmdbd, "slurmdbd", lambda: self._ok("sacctmgr", "-n", "list", "cluster"), 60,
                 [log / "slurmdbd.log", log / "slurmdbd.out"])
        self.run("sacctmgr", "-i", "add", "cluster", CLUSTER)

        slurmctld = self._daemon("slurmctld", "slurmctld", "-D")
        wait_for(slurmctld, "slurmctld", lambda: self._ok("scontrol", "ping"), 60,
                 [log / "slurmctld.log", log / "slurmctld.out"])
        slurmd = self._daemon("slurmd", "slurmd", "-D")

        def node_idle() -> bool:
            state = self.run("sinfo", "-h", "-n", self.host, "-o", "%t", check=False).strip()
            return state == "idle"

        wait_for(slurmd, "slurmd", node_idle, 60,
                 [log / "slurmd.log", log / "slurmd.out", log / "slurmctld.log"])

    def _write_configs(self, ports: Mapping[str, int], munge_socket: Path) -> None:
        log, run = self.root / "log", self.root / "run"
        auth = f"AuthType=auth/munge\nAuthInfo=socket={munge_socket}\n"
        dbd = self.root / "etc" / "slurmdbd.conf"  # read from SLURM_CONF's folder
        dbd.write_text(
            auth + f"DbdHost={self.host}\nDbdAddr=127.0.0.1\nDbdPort={ports['slurmdbd']}\n"
            f"SlurmUser=root\nLogFile={log / 'slurmdbd.log'}\nPidFile={run / 'slurmdbd.pid'}\n"
            "StorageType=accounting_storage/mysql\nStorageHost=127.0.0.1\n"
            f"StoragePort={ports['mariadb']}\nStorageUser=slurm\nStoragePass=slurm\n"
            "StorageLoc=slurm_acct_db\n"
        )
        dbd.chmod(0o600)
        cpus = os.cpu_count() or 1
        memory = int(Path("/proc/meminfo").read_text().split()[1]) // 1024  # MemTotal, MiB
        self.memory_mb = max(512, int(memory * 0.8))
        self.conf.write_text(
            f"ClusterName={CLUSTER}\nSlurmctldHost={self.host}(127.0.0.1)\n"
            f"SlurmctldPort={ports['slurmctld']}\nSlurmdPort={ports['slurmd']}\n"
            "SlurmUser=root\nSlurmdUser=root\n" + auth + "CredType=cred/munge\n"
            f"StateSaveLocation={self.root / 'state'}\nSlurmdSpoolDir={self.root / 'spool'}\n"
            f"SlurmctldPidFile={run / 'slurmctld.pid'}\nSlurmdPidFile={run / 'slurmd.pid'}\n"
            f"SlurmctldLogFile={log / 'slurmctld.log'}\nSlurmdLogFile={log / 'slurmd.log'}\n"
            # No cgroups here: plain process tracking, no task binding, no usage sampling.
            "ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\n"
            "JobAcctGatherType=jobacct_gather/none\n"
            # Accounting in slurmdbd (sacct); the munge socket of that connection is its
            # "password".
            "AccountingStorageType=accounting_storage/slurmdbd\n"
            f"AccountingStorageHost=127.0.0.1\nAccountingStoragePort={ports['slurmdbd']}\n"
            f"AccountingStoragePass={munge_socket}\nAccountingStoreFlags=job_comment\n"
            "JobCompType=jobcomp/none\nMpiDefault=none\nReturnToService=2\n"
            "SchedulerType=sched/backfill\nSelectType=select/cons_tres\n"
            "SelectTypeParameters=CR_Core\nMinJobAge=86400\n"
            "SlurmctldTimeout=30\nSlurmdTimeout=30\n"
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus} "
            f"RealMemory={self.memory_mb} State=UNKNOWN\n"
            f"PartitionName={self.partition} Nodes={self.host} Default=YES "
            "MaxTime=INFINITE State=UP\n"
        )
        self.conf.chmod(0o644)

    def stop(self) -> None:
        """Cancel every job, stop every daemon this object started, undo the link."""
        try:
            if any(name == "slurmctld" and p.poll() is None for name, p in self.processes):
                self._cancel_jobs()
        finally:
            for name, process in reversed(self.processes):
                self._terminate(name, process)
            self.processes.clear()
            if self._linked:
                with contextlib.suppress(FileNotFoundError):
                    if SYSTEM_CONF.is_symlink() and os.readlink(SYSTEM_CONF) == str(self.conf):
                        SYSTEM_CONF.unlink()
                self._linked = False
            if self._lock is not None:
                self._lock.close()
                self._lock = None

    def _cancel_jobs(self, timeout: float = 60) -> None:
        with contextlib.suppress(Exception):
            jobs = self.run("squeue", "-h", "-o", "%A", check=False).split()
            if jobs:
                self.run("scancel", *jobs, check=False)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if not self.run("squeue", "-h", "-t", "PD,R,CG,S", "-o", "%A",
                                check=False).strip():
                    return
                time.sleep(1)

    @staticmethod
    def _terminate(name: str, process: subprocess.Popen, timeout: float = 30) -> None:
        if process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
