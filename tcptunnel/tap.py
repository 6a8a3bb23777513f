"""twistd glue: ``twistd tcptunnel --config settings.xml``.

``Options.postOptions`` loads and checks the settings (a bad file is a
``UsageError`` with one precise message); ``makeService`` returns a
MultiService with one child per ``Instance``, in file order, so they start
in that order and stop in reverse.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import stat
import sys
import threading
from typing import IO, Any, TextIO, cast

from twisted.application import service
from twisted.internet import defer
from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    Logger,
    PredicateResult,
    textFileLogObserver,
)
from twisted.python import usage
from twisted.python.components import Componentized

from tcptunnel.config import (
    ConfigError,
    GatewayConfig,
    InstanceConfig,
    Settings,
    StartupError,
    load_settings,
)
from tcptunnel.heap import HeapTrimmer, glibc_allocator
from tcptunnel.tls import TlsSetupError

# Children of TunnelService that are not Instances (no config, not reloaded).
AUXILIARY_SERVICES = frozenset({"status", "heap-trimmer"})


class Options(usage.Options):
    """Command-line options of the tcptunnel plugin."""

    synopsis = "[--config settings.xml]"
    longdesc = ("Run the Gateway / Proxy-Server / Proxy-Client instances of a TcpTunnel "
                "settings.xml file (see docs/configuration.md).")
    optParameters = [  # noqa: N815 - Twisted attribute name
        ["config", "c", "settings.xml", "Path of the settings file."],
    ]

    settings: Settings

    def postOptions(self) -> None:  # noqa: N802
        """Load the settings file; any problem is a :class:`ConfigFileError` naming file and
        line."""
        try:
            # An empty <Settings> runs, doing nothing, as the original does (its warning
            # says so at start-up).
            self.settings = load_settings(self["config"])
        except ConfigError as e:
            raise ConfigFileError(e, self["config"]) from None


class ConfigFileError(SystemExit):
    """The settings file is unusable: exit status 1 and one message on stderr.

    Not a UsageError: twistd answers those with its whole help text (11 lines) on stdout
    and then the error, and the error is not about the command line.  A SystemExit raised
    while twistd parses its options ends the process before anything else runs (no pidfile,
    no log, no daemon), and the interpreter prints its message on stderr.
    """

    def __init__(self, error: ConfigError, path: str) -> None:
        check = f"python -m tcptunnel check-config {shlex.quote(path)}"
        super().__init__(f"tcptunnel: {error}\n(check the whole file with: {check})")
        self.error = error


class LogFile:
    """The log file of a twistd run, ours rather than twistd's: appended to, and reopened at
    the same path on SIGUSR1 (logrotate's ``postrotate``), with the first file's mode.

    twistd's own SIGUSR1 handler rotates the file itself and, once logrotate has moved the
    file away, its reopened file takes the process umask: 0o077 in daemon mode, so a log
    created 0o640 came back 0o600 and unreadable to the group that reads logs.  Here the
    mode of the first file (an existing file's, or 0o640 less the umask for a new one) is
    the mode of every file reopened after it.
    """

    # Log lines name peers' addresses and session ids: readable by the owner and the
    # log-reading group, not by everyone.
    NEW_FILE_MODE = 0o640

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)  # twistd may chdir (--rundir) after this
        self._file = self._open(None)
        self.mode = stat.S_IMODE(os.fstat(self._file.fileno()).st_mode)

    def _open(self, mode: int | None) -> TextIO:
        """Open for appending; a file this creates gets ``mode`` exactly (whatever the
        umask), or NEW_FILE_MODE less the umask when ``mode`` is None."""
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags | os.O_EXCL, self.NEW_FILE_MODE)
            if mode is not None:
                os.fchmod(fd, mode)
        except FileExistsError:
            fd = os.open(self.path, flags)  # logrotate's "create" made it: its mode stays
        return open(fd, "a", encoding="utf-8", errors="backslashreplace")

    def write(self, text: str) -> None:
        """Append ``text`` (one formatted log event)."""
        self._file.write(text)

    def flush(self) -> None:
        """Flush to the file (the observer flushes after each event)."""
        self._file.flush()

    def reopen(self) -> None:
        """Close the file and open ``path`` again (a new file with the first one's mode if
        it was moved away)."""
        new = self._open(self.mode)
        old, self._file = self._file, new
        old.close()

    def close(self) -> None:
        """Close the file."""
        self._file.close()


def twistd_log_file(options: usage.Options) -> LogFile | None:
    """Our LogFile when twistd (the parent options of ours) logs to a file, else None.

    Mirrors twistd's own choice: ``--logger`` or ``--syslog`` win, ``--logfile=-`` (or
    ``-n`` without ``--logfile``) is stdout, otherwise ``--logfile`` or twistd.log.
    """
    parent = options.parent
    if parent is None or "logfile" not in parent or "nodaemon" not in parent:
        return None  # not twistd (e.g. twist, or a test): its own logging stays
    if parent.get("logger") or parent.get("syslog"):
        return None
    path = parent["logfile"]
    if path == "-" or (parent["nodaemon"] and not path):
        return None
    return LogFile(path or "twistd.log")


def twistd_logs_to_stdout(options: usage.Options) -> bool:
    """Whether twistd logs to stdout (``-n`` without ``--logfile`` or with ``--logfile=-``:
    systemd units, the journal)."""
    parent = options.parent
    if parent is None or "logfile" not in parent or "nodaemon" not in parent:
        return False
    if parent.get("logger") or parent.get("syslog"):
        return False
    return bool(parent["nodaemon"]) and (parent["logfile"] == "-" or not parent["logfile"])


# Twisted's own lines about listening ports ("GatewayFactory starting on 25201", "(TCP Port
# 25201 Closed)"): they repeat what each instance logs itself, with its index and address.
_TWISTED_PORT_LINES = re.compile(r"\w+ starting on \d+|\((?:TCP|UDP|UNIX) Port \S+ Closed\)")


def _ours(event: dict[str, Any]) -> PredicateResult:
    if event.get("log_namespace") == "log_legacy" and _TWISTED_PORT_LINES.fullmatch(
            str(event.get("log_text", ""))):
        return PredicateResult.no
    return PredicateResult.maybe


def quiet_observer(observer: ILogObserver) -> ILogObserver:
    """``observer`` without Twisted's port start/stop lines (see _TWISTED_PORT_LINES)."""
    return cast(ILogObserver,
                FilteringLogObserver(observer, [cast(ILogFilterPredicate, _ours)]))


def make_instance_service(instance: InstanceConfig, reactor: Any) -> service.IService:
    """The service for one Instance."""
    if isinstance(instance, GatewayConfig):
        from tcptunnel.gateway import GatewayService

        return GatewayService(instance, reactor)
    if instance.role == "proxy-server":
        from tcptunnel.proxyserver import ProxyServerService

        return ProxyServerService(instance, reactor)
    from tcptunnel.proxyclient import ProxyClientService

    return ProxyClientService(instance, reactor)


class TunnelService(service.MultiService):
    """All instances of one settings file; SIGHUP reloads it."""

    log = Logger()

    def __init__(self, settings: Settings, reactor: Any, log_file: LogFile | None = None,
                 stderr_fd: int | None = None, log_to_stdout: bool = False) -> None:
        super().__init__()
        self.settings = settings
        self.reactor = reactor
        self.log_file = log_file
        self.log_to_stdout = log_to_stdout  # twistd logs to stdout: our observer does
        # A copy of the standard error twistd started with (see _tell_stderr).
        self.stderr_fd = stderr_fd
        # The signal that stopped us (SIGTERM), recorded by our own handler.
        self.exit_signal: int | None = None
        self._previous_handlers: dict[int, Any] = {}
        for instance in settings.instances:
            self._add_instance(instance)
        if settings.status is not None:
            from tcptunnel.status import StatusService

            status = StatusService(settings.status, self, reactor)
            status.setName("status")
            status.setServiceParent(self)
        trimmer = HeapTrimmer(reactor, glibc_allocator())
        trimmer.setName("heap-trimmer")
        trimmer.setServiceParent(self)

    def _add_instance(self, instance: InstanceConfig) -> Any:
        child = make_instance_service(instance, self.reactor)
        child.setName(f"{instance.index}:{instance.role}")
        try:
            child.setServiceParent(self)  # starts it if we are running
        except (StartupError, TlsSetupError):
            # Not left in the tree half-started: a later reload adds it afresh.
            self.removeService(child)
            raise
        return child

    @defer.inlineCallbacks
    def reload(self) -> Any:
        """Re-read the settings file and apply what changed (see docs/operations.md).

        An invalid file is logged and ignored: everything keeps running as it was.
        Instances are matched by position and role; unchanged parts keep their links and
        streams.  Each instance changes all or nothing: one that cannot apply its new
        settings (a busy port, an unusable certificate) keeps running as it was, and says
        why.  Fires with True when the new settings were applied everywhere.
        """
        path = self.settings.path
        self.log.info("Reloading {path}", path=path)
        try:
            settings = load_settings(path)
        except ConfigError as e:
            self.log.error("Reload failed, keeping the running configuration: {error}",
                           error=str(e))
            return False
        self._log_warnings(settings, self.settings)
        current = {(child.config.index, child.config.role): child for child in self
                   if child.name not in AUXILIARY_SERVICES}
        if settings.status != self.settings.status:
            self.log.warn("<Status> changed: that takes effect at the next restart")
        failed: list[str] = []
        for instance in settings.instances:
            child = current.pop((instance.index, instance.role), None)
            name = f"{instance.index}:{instance.role}"
            try:
                if child is None:
                    self.log.info("[{name}] added", name=name)
                    self._add_instance(instance)
                elif not (yield defer.maybeDeferred(child.apply_config, instance)):
                    self.log.info("[{name}] link settings changed: restarting it", name=name)
                    yield defer.maybeDeferred(child.disownServiceParent)
                    child = None
                    self._add_instance(instance)
            except (StartupError, TlsSetupError) as e:
                state = "not changed" if child is not None else "could not be started"
                self.log.error("[{name}] {state}: {error}", name=name, state=state,
                               error=str(e))
                failed.append(name)
        for child in current.values():
            self.log.info("[{name}] removed", name=child.name)
            yield defer.maybeDeferred(child.disownServiceParent)
        self.settings = settings
        if failed:
            self.log.warn("Reloaded {path} except {names} (see above)", path=path,
                          names=", ".join(failed))
            return False
        self.log.info("Reloaded {path}", path=path)
        return True

    def _log_warnings(self, settings: Settings, previous: Settings | None = None) -> None:
        """What the settings reader accepted but warns about in the file itself ("file:line:
        ..."), one line each; at a reload, only what the running file did not have.  (Each
        instance's service logs the warnings about its own part, with its [N].)"""
        known = set(previous.warnings) if previous is not None else set()
        for warning in settings.warnings:
            if warning not in known:
                # Not a field named "warning": legacy observers (trial's) take an event
                # with one for a Python warning and fail on it.
                self.log.warn("{problem}", problem=warning)

    def setServiceParent(self, parent: Any) -> None:  # noqa: N802
        """Join twistd's application; when we own the log file (or twistd logs to stdout),
        our observer becomes the application's ILogObserver, which twistd then uses instead
        of its own (the same text format, without Twisted's port lines)."""
        super().setServiceParent(parent)
        stream: IO[Any] | None = None
        if self.log_file is not None:
            stream = cast(IO[Any], self.log_file)
        elif self.log_to_stdout:
            stream = sys.stdout  # before twistd redirects it into the log, as twistd does
        if stream is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, quiet_observer(textFileLogObserver(stream)))

    def _on_sighup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reload)

    def _on_sigusr1(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self._reopen_log)

    def _on_sigusr2(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.drain)

    def drain(self) -> None:
        """SIGUSR2 (issue 20): every Gateway instance drains (GatewayService.drain); proxies
        are not affected."""
        from tcptunnel.gateway import GatewayService

        gateways = [child for child in self if isinstance(child, GatewayService)]
        if not gateways:
            self.log.info("SIGUSR2: no Gateway instance to drain")
        for child in gateways:
            child.drain()

    def _reopen_log(self) -> None:
        if self.log_file is None:
            self.log.info("SIGUSR1: not logging to a file of ours, nothing to reopen")
            return
        self.log_file.reopen()
        self.log.info("SIGUSR1: reopened the log file {path}", path=self.log_file.path)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        # Twisted's own handler also records the signal for twistd, which then ends the
        # process with it; a stop on SIGTERM is our normal, graceful shutdown, and process
        # managers should see exit status 0.
        self.exit_signal = signum  # stopService logs "Stopping (SIGTERM)"
        self.reactor.callFromThread(self.reactor.stop)

    def _install_signal_handlers(self) -> None:
        """SIGHUP reloads, SIGUSR1 reopens the log file, SIGTERM stops with status 0; then
        "Started." says so.  Called once the reactor runs (after it installed its own SIGTERM
        handler).  Until then a SIGUSR1 would end the process (its default action): "Started."
        is logged only now, so that whoever waits for it may signal."""
        if not self.running:
            return
        if threading.current_thread() is threading.main_thread():
            for number, handler in ((signal.SIGHUP, self._on_sighup),
                                    (signal.SIGUSR1, self._on_sigusr1),
                                    (signal.SIGUSR2, self._on_sigusr2),
                                    (signal.SIGTERM, self._on_sigterm)):
                self._previous_handlers.setdefault(number, signal.signal(number, handler))
        self.log.info("Started. Send SIGHUP to reload, SIGUSR2 to drain a Gateway, SIGTERM or "
                      "Ctrl+C to stop.")

    def _restore_signal_handlers(self) -> None:
        for number, handler in self._previous_handlers.items():
            signal.signal(number, handler)
        self._previous_handlers.clear()

    def startService(self) -> None:  # noqa: N802
        """Start the instances in file order; if one fails, stop those already started."""
        self.log.info("Starting {n} instance(s) from {path}", n=len(self.settings.instances),
                      path=self.settings.path)
        self._log_warnings(self.settings)
        service.Service.startService(self)
        started: list[service.IService] = []
        for child in self:
            try:
                child.startService()
            except (StartupError, TlsSetupError) as e:
                for done in reversed(started):
                    done.stopService()
                self.running = False
                self.log.critical("Start-up failed: {error}", error=str(e))
                self._tell_stderr(f"tcptunnel: start-up failed: {e}\n")
                raise StartupFailed(str(e)) from None
            started.append(child)
            self.log.info("[{name}] started", name=child.name)
        self._tell_stderr(None)
        self.reactor.callWhenRunning(self._install_signal_handlers)

    def _tell_stderr(self, text: str | None) -> None:
        """Write ``text`` on the standard error twistd was started with, then let it go.

        Under twistd, ``sys.stderr`` is by now a file that writes into the log (the message
        would be logged twice and seen on no terminal), and a daemon's descriptor 2 is
        /dev/null: the copy :func:`makeService` took before twistd daemonised is the
        terminal or pipe that is waiting for the outcome.  The copy is closed once start-up
        is over (``text`` None): a daemon must not keep its starter's terminal open.
        """
        fd, self.stderr_fd = self.stderr_fd, None
        if fd is None:
            return  # not under twistd: the caller has the log and the exception
        try:
            if text is not None:
                os.write(fd, text.encode("utf-8", "backslashreplace"))
        except OSError:
            pass  # nobody is reading any more; the log has the message
        finally:
            os.close(fd)

    def stopService(self) -> Any:  # noqa: N802
        """Stop the instances in reverse order."""
        if self.exit_signal is not None:
            self.log.info("Stopping ({signal})", signal=signal.Signals(self.exit_signal).name)
        else:
            self.log.info("Stopping")
        self._restore_signal_handlers()
        return super().stopService()


def makeService(options: Options) -> service.IService:  # noqa: N802
    """The twistd entry point (called before twistd daemonises and starts logging)."""
    from twisted.internet import reactor

    try:
        tunnel = TunnelService(options.settings, reactor, twistd_log_file(options),
                               log_to_stdout=twistd_logs_to_stdout(options))
    except TlsSetupError as e:
        raise SystemExit(f"tcptunnel: {options.settings.path}: {e}") from None
    if options.parent is not None:  # twistd (or twist): keep its stderr for start-up errors
        tunnel.stderr_fd = os.dup(2)  # not inherited by children (PEP 446)
    return tunnel


class StartupFailed(SystemExit, Exception):  # noqa: N818 - a SystemExit; twistd prints it
    """Start-up failed once twistd ran (a port in use ...); the reason was logged and
    written on stderr already.

    Both kinds of exception on purpose.  An Exception, because twistd's ``postApplication``
    catches only those from ``startService``: it removes the pidfile and reports the failure
    through a daemon's status pipe, so that the process waiting in the shell prints it and
    exits 1.  A SystemExit was not caught: the daemon died without a word, and its starter,
    which also holds the pipe's write end, waited for ever.  And a SystemExit with status 1,
    because twistd re-raises it: the interpreter then exits 1 without a traceback.
    """

    def __init__(self, reason: str) -> None:
        # twistd's starter prints this (as b'tcptunnel.tap.StartupFailed: ...'), cut at
        # 100 bytes: the reason itself is on the line before it, whole.
        super().__init__("the reason is on the line above and in the log")
        self.code = 1
        self.reason = reason
