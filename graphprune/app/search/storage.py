"""A search's RDB storage when its server goes away: bounded waits, one clear error, no hung trial.

Optuna's RDBStorage (PostgreSQL, MySQL, SQLite) shares a study between workers. Left as it
is, a worker whose server stops either fails with a traceback from deep inside SQLAlchemy,
or, in a long trial, keeps computing for hours while its heartbeats fail in a background
thread. Here:

- :func:`engine_kwargs`: a connect timeout (a server that does not answer is an error in
  seconds, not the operating system's minutes), TCP keepalives on PostgreSQL (a vanished
  peer is noticed on an open connection too) and ``pool_pre_ping`` (a connection the
  server dropped, say on a restart, is replaced rather than failing the next query);
- :class:`Heartbeat`: records the running trial's heartbeat as Optuna's own thread does,
  and when none could be recorded for the grace period (after which the other workers
  fail the trial as dead anyway) interrupts the trial, which then ends the search;
- :func:`storage_errors`: turns a lost connection into :class:`StorageLost`, one line
  that names the storage (password masked) and says what to do. The finished trials are
  in the database: the same command resumes the study once the server is back.
"""

from __future__ import annotations

import _thread
import contextlib
import re
import threading
import time

from ...ir.errors import GraphpruneError

CONNECT_TIMEOUT_S = 10  # a server that does not answer a connection attempt in this long is taken as gone


class StorageLost(GraphpruneError, RuntimeError):
    """The study's RDB could not be reached (at the start, or mid-search); its finished trials are kept there."""


def masked(url: str) -> str:
    """The storage URL with its password, if any, replaced by ``***`` (the URL goes into error messages)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy can parse: mask what looks like user:password@
        return re.sub(r"(//[^/:@]*:)[^/@]*@", r"\1***@", url)


def engine_kwargs(url: str) -> dict:
    """SQLAlchemy engine options for ``url``: pre-ping everywhere, and a connect timeout (with TCP keepalives
    on PostgreSQL) where the driver takes one; an option the URL's query already sets is left to it."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "postgresql":  # libpq's names, for psycopg 3 and psycopg2 alike
        connect = {"connect_timeout": CONNECT_TIMEOUT_S, "keepalives": 1, "keepalives_idle": 10,
                   "keepalives_interval": 5, "keepalives_count": 3}
    elif backend == "mysql":  # PyMySQL and mysqlclient
        connect = {"connect_timeout": CONNECT_TIMEOUT_S}
    else:  # SQLite: a file, nothing to time out on (its "timeout" is how long to wait for a lock)
        connect = {}
    connect = {k: v for k, v in connect.items() if k not in parsed.query}
    return {"pool_pre_ping": True, **({"connect_args": connect} if connect else {})}


def storage_error(error: BaseException):
    """The SQLAlchemy error behind ``error`` when it means the database could not be reached (a dropped or refused
    connection, a timeout), else None. Optuna wraps some of them in ``StorageInternalError``, so the chain is walked."""
    from sqlalchemy import exc

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (exc.OperationalError, exc.InterfaceError)) or getattr(error, "connection_invalidated", False):
            return error
        error = error.__cause__ or error.__context__
    return None


def _reason(error: BaseException) -> str:
    """``Type: first line of the driver's message``, short enough for a one-line error."""
    inner = getattr(error, "orig", None) or error  # the driver's own error, without SQLAlchemy's SQL and links
    text = " ".join(str(inner).split("\n")[0].split())[:200]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def lost(url: str, reason: str, *, opening: bool = False) -> StorageLost:
    """The error that ends a search whose storage is gone: what failed, why, and what to do."""
    if opening:
        return StorageLost(f"search: cannot open the study's storage {masked(url)} ({reason}); check that its server is "
                           "running and reachable from here and that the URL is right, then run the command again")
    return StorageLost(f"search: lost the study's storage {masked(url)} ({reason}); the finished trials are kept there: "
                       "rerun the same command when it is back and the study resumes")


@contextlib.contextmanager
def storage_errors(url: str | None, *, opening: bool = False):
    """Within: an error that means the RDB at ``url`` is unreachable becomes :class:`StorageLost` (``opening``: the
    search could not start). Without a URL (the journal file) nothing is changed."""
    try:
        yield
    except StorageLost:
        raise
    except Exception as error:
        cause = storage_error(error) if url else None
        if cause is None:
            raise
        raise lost(url, _reason(cause), opening=opening) from error


class Heartbeat:
    """``with Heartbeat(storage, trial_id, interval, grace):`` around a running trial, in place of Optuna's heartbeat
    thread (a storage without heartbeats, the journal, gets nothing).

    One thread records the heartbeat every ``interval`` seconds, and a failed attempt is simply tried again next
    time: a server restart costs nothing. Another watches: when no heartbeat has been recorded for ``grace`` seconds
    (at least two intervals, so that a grace set shorter than the interval cannot stop a healthy trial; a call may
    hang rather than fail, so the watcher is a thread of its own), the other workers take the trial as
    dead, so it is interrupted (``_thread.interrupt_main``: a trial is plain Python and torch on the main thread)
    and leaves this block as :class:`StorageLost`. Off the main thread nothing is interrupted (it would hit the
    wrong thread): the trial runs to its end and its ``tell`` fails instead."""

    def __init__(self, storage, trial_id: int, interval: float, grace: float):
        from optuna.storages._heartbeat import is_heartbeat_enabled

        self.storage, self.trial_id, self.interval, self.grace = storage, trial_id, interval, max(grace, 2 * interval)
        self.enabled = is_heartbeat_enabled(storage)
        self.stop, self.fired, self.lock = threading.Event(), threading.Event(), threading.Lock()
        self.armed = threading.current_thread() is threading.main_thread()
        self.last_ok, self.error = time.monotonic(), None  # the first heartbeat was recorded when the trial was claimed

    def _beat(self) -> None:
        """Record the heartbeat every ``interval`` s until stopped; failures are kept for the message, not raised."""
        while not self.stop.wait(self.interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
                self.last_ok = time.monotonic()
            except Exception as error:
                self.error = error

    def _watch(self) -> None:
        """Interrupt the trial once no heartbeat has been recorded for ``grace`` s."""
        while not self.stop.wait(min(1.0, self.interval)):
            if time.monotonic() - self.last_ok > self.grace:
                with self.lock:  # never after __exit__ has disarmed it: the interrupt must land in the trial
                    if self.armed:
                        self.fired.set()
                        _thread.interrupt_main()
                return

    def __enter__(self):
        if self.enabled:
            self.threads = [threading.Thread(target=f, daemon=True, name=f"graphprune-heartbeat-{f.__name__[1:]}")
                            for f in (self._beat, self._watch)]
            for thread in self.threads:
                thread.start()
        return self

    def __exit__(self, kind, value, traceback):
        if not self.enabled:
            return False
        try:
            with self.lock:
                self.armed = False
            self.stop.set()  # an interrupt sent just before the disarm is delivered by the end of this call
        except KeyboardInterrupt:
            if not self.fired.is_set():
                raise
        for thread in self.threads if not self.fired.is_set() else ():  # a beat hung on a dead server is not waited for
            thread.join(timeout=self.interval)
        if self.fired.is_set() and (kind is None or issubclass(kind, KeyboardInterrupt)):
            reason = f"no heartbeat recorded for {self.grace:g} s" + (f": {_reason(storage_error(self.error) or self.error)}"
                                                                      if self.error else "")
            raise lost(self.storage.url, reason) from value
        return False
