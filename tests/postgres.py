"""A throwaway PostgreSQL server for tests: its own cluster in a temporary folder, on a free loopback port.

    server = PostgresServer.start_new()     # pytest.skip(...) when PostgreSQL or a driver is missing
    url = server.database("name")          # a new database, as a SQLAlchemy URL
    server.stop(); server.start()          # the same cluster and port again
    server.remove()                        # stop and delete the folder

Debian's ``postgresql`` package (``apt-get install postgresql``) puts the binaries in
``/usr/lib/postgresql/<version>/bin``. PostgreSQL refuses to run as root: as root, the
server runs as the package's ``postgres`` user (``runuser``), owning the folder. Loopback
only, trust authentication, no fsync: a test server, never a real one.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

USER = "graphprune"


def binaries() -> Path | None:
    """The newest PostgreSQL's bin folder (Debian's layout, else initdb on PATH), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


def driver() -> str | None:
    """The SQLAlchemy dialect+driver for an installed PostgreSQL driver (psycopg 3, else psycopg2), or None."""
    for module, name in (("psycopg", "postgresql+psycopg"), ("psycopg2", "postgresql+psycopg2")):
        if importlib.util.find_spec(module) is not None:
            return name
    return None


def free_port() -> int:
    """A loopback port nothing listens on now (the server binds it a moment later)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PostgresServer:
    """One cluster in ``folder``, served on ``127.0.0.1:port`` (its unix socket in ``folder`` too)."""

    def __init__(self, bin_dir: Path, dialect: str, folder: Path, as_user: list[str]):
        self.bin, self.dialect, self.folder, self.as_user = bin_dir, dialect, folder, as_user
        self.data, self.log, self.port = folder / "data", folder / "server.log", free_port()

    @classmethod
    def start_new(cls) -> "PostgresServer":
        """initdb and start a new server; skips the test (with the reason) where that cannot be done here."""
        bin_dir, dialect = binaries(), driver()
        if bin_dir is None:
            pytest.skip("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): apt-get install postgresql")
        if dialect is None:
            pytest.skip("no PostgreSQL driver for SQLAlchemy: pip install 'psycopg[binary]'")
        folder = Path(tempfile.mkdtemp(prefix="graphprune-pg-"))
        as_user = []
        if os.geteuid() == 0:  # postgres will not run as root: as the package's user, which must own the folder
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(folder)
                pytest.skip("running as root and there is no 'postgres' user to run PostgreSQL as (Debian's package makes one)")
            os.chown(folder, owner.pw_uid, owner.pw_gid)
            as_user = ["runuser", "-u", "postgres", "--"]
        server = cls(bin_dir, dialect, folder, as_user)
        try:
            server._run("initdb", "-D", str(server.data), "-U", USER, "--auth=trust", "--encoding=UTF8", "--no-locale", "--no-sync")
            server.start()
        except (OSError, subprocess.SubprocessError) as error:
            detail = f"{error}\n{server.log_tail()}".strip()
            server.remove()
            pytest.skip(f"could not start a PostgreSQL server ({bin_dir}): {detail[-1500:]}")
        return server

    def _run(self, tool: str, *args: str, timeout: float = 60) -> None:
        """Run one of PostgreSQL's programs (as the server's user), raising CalledProcessError with its output."""
        command = [*self.as_user, str(self.bin / tool), *args]
        done = subprocess.run(command, cwd=self.folder, capture_output=True, text=True, timeout=timeout)
        if done.returncode:
            raise subprocess.CalledProcessError(done.returncode, command, done.stdout, done.stderr)

    def start(self) -> None:
        """Start (or start again) the server and wait until it accepts connections."""
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.folder} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=100")
        try:
            self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start", timeout=90)
        except subprocess.CalledProcessError as error:
            raise subprocess.SubprocessError(f"pg_ctl start failed: {(error.stderr or error.stdout).strip()}") from error

    def stop(self) -> None:
        """Stop the server now: open sessions are ended, as when a database server goes down."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop", timeout=90)

    def database(self, name: str, password: str | None = None) -> str:
        """Create database ``name``; its SQLAlchemy URL (a password only shows in the URL: trust ignores it)."""
        subprocess.run([str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", USER, name],
                       check=True, capture_output=True, timeout=60)
        return f"{self.dialect}://{USER}{':' + password if password else ''}@127.0.0.1:{self.port}/{name}"

    def log_tail(self) -> str:
        """The end of the server's log, for a failure's message."""
        try:
            return self.log.read_text(errors="replace")[-1500:]
        except OSError:
            return ""

    def remove(self) -> None:
        """Stop the server if it runs, then delete its folder."""
        if (self.data / "postmaster.pid").exists():
            try:
                self.stop()
            except (OSError, subprocess.SubprocessError):
                pid = (self.data / "postmaster.pid").read_text().split("\n")[0]
                if pid.isdigit():  # our own server's postmaster, by its pid file
                    subprocess.run(["kill", "-QUIT", pid], check=False)
        shutil.rmtree(self.folder, ignore_errors=True)
