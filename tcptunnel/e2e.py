"""End-to-end encryption in the proxies: the Twisted side of :mod:`tcptunnel._e2e`.

docs/protocol.md §9 is the design.  Three pieces, each a thin adapter over the pure core:

* :class:`SealedStream`, a :class:`tcptunnel.mux.MuxStream` that seals what the local socket
  writes into records and opens what arrives before the local side sees it.  The
  multiplexer below it moves record bytes, so its windows, BLOCKED flags and fair shares
  count what is on the wire with no change to ``_mux``; credit for received bytes is given
  per whole record, once the local socket took its plaintext (§9.7).  Its direction ends
  with an END record before FIN; a record that does not authenticate, bytes after END, or a
  FIN without END reset the stream ``INTEGRITY`` (the local side sees a reset, never an EOF).
* :class:`ServerEndToEnd`, one per Proxy-Server instance, keeps one
  :class:`tcptunnel._e2e.ServerPairing` (and its handshake budget) across reconnects: it
  opens the ``pake`` stream when the partner is present, drives the handshake and its
  deadline, and seals the OPEN of every stream of its Bindings (refusing them while there
  are no keys).
* :class:`ClientEndToEnd`, one per Proxy-Client instance, answers ``pake`` OPENs (one
  :class:`tcptunnel._e2e.ClientPairings` per link, one budget per instance), opens sealed
  OPENs into the clear request that the allow-list then checks, and refuses every clear
  stream when it has a password (``E2E_REQUIRED``) and every sealed one when it has none
  (``E2E_UNAVAILABLE``).

The proxy's link (:class:`tcptunnel.proxy.ProxyLink`) calls in through four seams only:
``open_stream``, ``attach_stream``, the link's login/partner/loss (``link_ready``,
``partner_changed``, ``link_lost``), and the Proxy-Client's ``filter_open``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet import interfaces
from twisted.logger import Logger

from tcptunnel import _e2e, _mux
from tcptunnel import _frames as fr
from tcptunnel._e2e import (
    DatagramCipher,
    DatagramRejectedError,
    E2EError,
    HandshakeRefusedError,
    IntegrityError,
    PasswordMismatchError,
    ServerState,
    StreamCipher,
    UnsupportedSuiteError,
)
from tcptunnel._frames import OpenRequest, Reason, StreamError
from tcptunnel._link import LinkState
from tcptunnel.mux import _ENDED, MuxProtocol, MuxStream, StreamEndpoint
from tcptunnel.udp import DatagramEndpoint

if TYPE_CHECKING:
    from tcptunnel.proxy import ProxyLink, ProxyService

log = Logger()

#: Bytes a sealed stream's local socket reads at a time: four full records, whose 65,536
#: bytes of record are exactly two 32 KiB DATA frames, each of two whole records.  With
#: Twisted's 65,536 a full read sealed to 65,631 bytes: two full frames and one of 95 bytes
#: (50 % more frames at all three processes, the Gateway included), and every later record
#: cut by a frame boundary, to be joined by the receiver.
SEALED_READ_SIZE = 4 * _e2e.MAX_PLAINTEXT  # 65,460

#: Seconds between two log lines about the same kind of refused stream (a Proxy-Server
#: without a password opening streams to a Proxy-Client that requires one sends many).
REFUSAL_LOG_INTERVAL = 60.0
#: Local connections a Proxy-Server holds unread while its handshake runs (at most 10 s);
#: more are refused at once.  Each is one accepted socket, already bounded by the kernel's
#: backlog and our descriptors; this keeps the list itself bounded.
MAX_HELD = 1024


class SealedStream(MuxStream, StreamEndpoint):
    """A stream whose bytes travel as end-to-end records (docs/protocol.md §9.5).

    It is its own endpoint towards the multiplexer and passes the local side (``app``) only
    what authenticated: plaintext of DATA records, the far end's FIN once END came before
    it, resets.  ``bytes_in`` / ``bytes_out`` count plaintext, as the local side sees it.
    """

    __slots__ = ("app", "cipher", "failed")

    def __init__(self, mux: MuxProtocol, stream_id: int, app: StreamEndpoint,
                 cipher: StreamCipher) -> None:
        super().__init__(mux, stream_id, self)
        self.app = app
        self.cipher = cipher
        self.failed = False  # an integrity failure ended it (the local side was told)

    @property
    def _live(self) -> bool:
        """Still ours to deliver to: not failed, not reset by the local side.  (Not
        :attr:`finished`: a FIN that closed the stream in the same read as its last DATA
        frames makes it CLOSED before those frames are delivered.)"""
        return not self.failed and self.mux.streams.get(self.stream_id) is self

    # -- sending: seal, then let the multiplexer count the record bytes -----------------

    def registerProducer(self, producer: Any, streaming: bool) -> None:  # noqa: N802
        """Take the local socket as producer, reading :data:`SEALED_READ_SIZE` at a time
        (a Twisted TCP transport's ``bufferSize``; other producers are left as they are)."""
        super().registerProducer(producer, streaming)
        if isinstance(getattr(producer, "bufferSize", None), int):
            producer.bufferSize = SEALED_READ_SIZE

    def write(self, data: bytes) -> None:
        """Seal ``data`` into DATA records and send them (after the window allows).

        A read of more than one record leaves as frames of whole records, each queued as
        its own piece (:meth:`tcptunnel._e2e.RecordSealer.seal_data_frames`): the
        multiplexer sends a piece of one frame's size as it is, so the records are not
        copied again to be cut into frames, and the far end opens whole records in place."""
        sealer = self.cipher.sealer
        if self.record.state in _ENDED or not data or sealer.ended:
            return
        if len(data) <= _e2e.MAX_PLAINTEXT:
            sealed = sealer.seal_one(data)
            # MuxStream.write counts the record bytes; bytes_out counts plaintext.
            self.bytes_out -= len(sealed) - len(data)
            MuxStream.write(self, sealed)
            return
        core = self.mux.core
        frames = sealer.seal_data_frames(data, core.chunk_size // _e2e.MAX_RECORD)
        last = frames.pop()
        stream_id = self.stream_id
        for frame in frames:
            core.send_data(stream_id, frame)
        # MuxStream.write sends the last piece (then flushes and pauses the local reader as
        # for a clear write) and counts its bytes.
        self.bytes_out += len(data) - len(last)
        MuxStream.write(self, last)

    def loseWriteConnection(self) -> None:  # noqa: N802
        """Half-close: the END record, then FIN (a FIN alone would read as truncation)."""
        if self.finished or self.cipher.sealer.ended:
            return
        # END and FIN queued together, then one flush: one write to the link, not two.
        core = self.mux.core
        core.send_data(self.stream_id, self.cipher.sealer.seal_end())
        core.end_stream(self.stream_id)
        self.mux.flush()

    # -- receiving: open records, credit whole records once their plaintext is taken ----

    def deliver(self, data: bytes) -> None:
        """Record bytes from the far end: the plaintext of each whole record goes to the
        local side; its wire size is reported consumed as MuxStream does for clear bytes.

        The records one DATA frame completes (two, of a full 32 KiB frame) reach the local
        side in one call when it takes several (``stream_data_sequence``, a splice's
        ``writeSequence``: Twisted queues them as they are and joins them in the send it
        makes anyway), so a sealed frame costs the local socket one write, as a clear one
        does."""
        # _live inlined (here and below): this runs for every sealed frame a proxy receives.
        streams = self.mux.streams
        if self.failed or streams.get(self.stream_id) is not self:
            return
        try:
            plaintexts, consumed = self.cipher.decoder.feed_data(data)
        except IntegrityError as e:
            self.integrity_failure(e.message)
            return
        if plaintexts:
            app = self.app
            if len(plaintexts) == 1:
                plaintext = plaintexts[0]
                self.bytes_in += len(plaintext)
                app.stream_data(plaintext)
            else:
                self.bytes_in += sum(map(len, plaintexts))
                write_sequence = getattr(app, "stream_data_sequence", None)
                if write_sequence is not None:
                    write_sequence(plaintexts)
                else:
                    for plaintext in plaintexts:
                        app.stream_data(plaintext)
                        if not self._live:
                            return
            if self.failed or streams.get(self.stream_id) is not self:
                return
        if not consumed:
            return
        if self._consumer_paused:
            self._unacknowledged += consumed
        elif self.record.state not in _ENDED:
            self.mux.core.data_consumed(self.stream_id, consumed, self.mux.clock.seconds())

    def integrity_failure(self, message: str) -> None:
        """Reset the stream in both directions with INTEGRITY; the local side sees a reset
        (also when both FINs already closed it at the multiplexer: never a clean EOF)."""
        if self.failed:
            return
        self.failed = True
        log.warn("[{index}] Stream {stream} reset: {why}", index=self.mux.instance_index,
                 stream=self.stream_id, why=message)
        if self.finished:
            self.mux.forget(self.stream_id)  # its StreamClosed must not reach the local side
        else:
            self.abortConnection(Reason.INTEGRITY, message)
        self.app.stream_reset(Reason.INTEGRITY, message, False)

    # -- StreamEndpoint (from the multiplexer) -----------------------------------------

    def stream_data(self, data: bytes) -> None:
        """Not used: :meth:`deliver` opens the records."""
        raise AssertionError("SealedStream.deliver handles data")

    def stream_opened(self) -> None:
        """The far end accepted the stream."""
        self.app.stream_opened()

    def stream_ended(self) -> None:
        """The far end's FIN: a clean end only after its END record (else truncation)."""
        if self.failed:
            return
        try:
            self.cipher.decoder.finish()
        except IntegrityError as e:
            self.integrity_failure(e.message)
            return
        self.app.stream_ended()

    def stream_reset(self, reason: Reason, message: str, remote: bool) -> None:
        """Reset (not authenticated: the Gateway can always end a stream, never as EOF)."""
        self.app.stream_reset(reason, message, remote)

    def stream_closed(self) -> None:
        """Both directions ended cleanly (each with its END record)."""
        if not self.failed:
            self.app.stream_closed()


class SealedDatagramStream(MuxStream, StreamEndpoint):
    """A ``udp`` stream whose datagrams travel sealed (docs/protocol.md §9.5): each one a
    DATAGRAM record in one DATA frame, at both proxies.

    The outer kind is ``sealed``, so the multiplexer would frame it as a byte stream: this
    sets the stream's datagram flag (whole frames, lossy sends, the datagram window cap) at
    both ends.  A frame that does not open (changed, forged, replayed, older than the last
    one delivered) is dropped and counted through ``app.datagram_dropped``, its bytes
    credited as if delivered, and the flow goes on: UDP is lossy, and a Gateway able to
    change a datagram could drop it or reset the stream anyway.  Only when forgeries reach
    the key's integrity limit (2^36) is the flow reset ``INTEGRITY``.  FIN ends a direction
    with no END record: a flow has no "complete transfer" to protect, and a forged FIN does
    nothing a Gateway's RESET could not.  ``bytes_in`` / ``bytes_out`` count plaintext.
    """

    __slots__ = ("_dropped", "app", "cipher")

    def __init__(self, mux: MuxProtocol, stream_id: int, app: DatagramEndpoint,
                 cipher: DatagramCipher) -> None:
        super().__init__(mux, stream_id, self)
        self.record.datagram = True  # set before any DATA: the framing of a udp stream
        self.app = app
        self.cipher = cipher
        self._dropped = 0  # datagrams dropped here for end-to-end reasons (logged once)

    def write(self, data: bytes) -> None:
        """Not for datagrams (it would frame bytes in clear): use :meth:`send_datagram`."""
        raise RuntimeError("a sealed udp stream sends with send_datagram")

    def send_datagram(self, data: bytes) -> str | None:
        """Seal one datagram and send it whole, or drop it (``tcptunnel._mux.DROP_*``).

        A sealed record that is dropped here (no credit, full queues) leaves a gap in the
        sequence numbers, which the far end accepts; it never left this process."""
        if len(data) > _e2e.MAX_SEALED_DATAGRAM:
            return _mux.DROP_TOO_LARGE
        if self.record.state in _ENDED or self.record.send.fin:
            return _mux.DROP_NOT_OPEN
        sealed = self.cipher.sealer.seal(data)
        why = super().send_datagram(sealed)
        if why is None:
            self.bytes_out -= len(sealed) - len(data)
        return why

    def deliver(self, data: bytes) -> None:
        """One DATA frame: its datagram to the local side, or dropped and counted; the
        frame's wire size is consumed either way (a dropped frame must not shrink the
        window)."""
        try:
            datagram = self.cipher.opener.open(data)
        except IntegrityError as e:
            # The key's integrity limit: the flow ends (its next datagram opens a new one).
            log.warn("[{index}] UDP flow {flow} reset: {why}", index=self.mux.instance_index,
                     flow=self.app.describe(), why=e.message)
            self.abortConnection(Reason.INTEGRITY, e.message)
            self.app.stream_reset(Reason.INTEGRITY, e.message, False)
            return
        except DatagramRejectedError as e:
            self._dropped += 1
            if self._dropped == 1:
                log.warn("[{index}] UDP flow {flow}: {why}; the flow goes on (each further "
                         "drop is only counted)", index=self.mux.instance_index,
                         flow=self.app.describe(), why=e.message)
            self.app.datagram_dropped(e.why)
        else:
            self.bytes_in += len(datagram)
            self.app.stream_data(datagram)
        if self._consumer_paused:
            self._unacknowledged += len(data)
        elif self.record.state not in _ENDED:
            self.mux.core.data_consumed(self.stream_id, len(data), self.mux.clock.seconds())

    # -- StreamEndpoint (from the multiplexer): passed on ---------------------------------

    def stream_data(self, data: bytes) -> None:
        """Not used: :meth:`deliver` opens the datagrams."""
        raise AssertionError("SealedDatagramStream.deliver handles data")

    def stream_opened(self) -> None:
        """The far end accepted the flow."""
        self.app.stream_opened()

    def stream_ended(self) -> None:
        """The far end ended the flow (FIN)."""
        self.app.stream_ended()

    def stream_reset(self, reason: Reason, message: str, remote: bool) -> None:
        """Reset, refused, or the link was lost."""
        self.app.stream_reset(reason, message, remote)

    def stream_closed(self) -> None:
        """FIN both ways."""
        self.app.stream_closed()


class EndToEnd:
    """What a proxy's link asks of its end-to-end state (no-ops: streams in clear)."""

    def link_ready(self, link: ProxyLink) -> None:
        """A link logged in."""

    def partner_changed(self, link: ProxyLink, count: int) -> None:
        """PARTNER said how many partners the link has."""

    def link_lost(self, link: ProxyLink) -> None:
        """A link is gone (its streams were reset already)."""

    def link_draining(self, link: ProxyLink) -> None:
        """The Gateway drains the link: it keeps the streams it has (and their keys), new
        ones go to a new link (issue 20); :meth:`link_lost` follows when it closes."""

    def open_stream(self, link: ProxyLink, host: str, port: int, endpoint: StreamEndpoint,
                    kind: int, fields: tuple[tuple[int, bytes], ...]) -> MuxStream | None:
        """The stream for a local connection, or None to open it in clear."""
        return None

    def attach_stream(self, link: ProxyLink, stream_id: int,
                      endpoint: StreamEndpoint) -> MuxStream | None:
        """The stream for an OPEN the far end made, or None for a clear one."""
        return None

    def filter_open(self, link: ProxyLink, stream_id: int,
                    request: OpenRequest) -> OpenRequest | None:
        """The request to check and dial, or None when it was handled (answered) here."""
        return request

    def stop(self) -> None:
        """The proxy stops: cancel timers."""

    def status(self) -> dict[str, Any]:
        """The ``end_to_end`` part of the proxy's /status (no secrets, no keys)."""
        return {"enabled": False}

    def hold(self, connection: Any, retry: Callable[[], None]) -> bool:
        """Whether a new local connection must wait (unread) for the handshake in progress;
        then ``retry`` is called once it ends (at most :data:`tcptunnel._e2e.PAKE_DEADLINE`
        later), unless ``connection`` is done by then."""
        return False

    def ready(self, link: ProxyLink) -> bool:
        """Whether a new stream on ``link`` opens now (sealed where required): a UDP flow of
        a draining link moves to ``link`` only then (tcptunnel.udp)."""
        return True


def _datagram_endpoint(endpoint: StreamEndpoint) -> DatagramEndpoint:
    """The local side of a ``udp`` stream: it counts the datagrams dropped for it."""
    if not isinstance(endpoint, DatagramEndpoint):
        raise TypeError(f"a udp stream needs a DatagramEndpoint, not {endpoint!r}")
    return endpoint


def _open_raw(link: MuxProtocol, kind: int, fields: tuple[tuple[int, bytes], ...],
              make: Any) -> MuxStream:
    """Open a stream of an envelope kind (no target in clear), as MuxProtocol.open_stream
    does, with ``make(stream_id)`` building the MuxStream."""
    try:
        stream_id = link.core.open_stream("", 0, kind, fields)
    except _mux.StreamIdsExhaustedError:
        # Ids never repeat on a link: start a new one (the proxy reconnects).
        link.fail(fr.GoAway.NORMAL, "stream ids of this link are used up; reconnecting")
        raise
    stream: MuxStream = make(stream_id)
    link.streams[stream_id] = stream
    link.flush()
    return stream


# -- Proxy-Server ---------------------------------------------------------------------


class _ServerPake(StreamEndpoint):
    """The Proxy-Server's end of its ``pake`` stream."""

    def __init__(self, owner: ServerEndToEnd) -> None:
        self.owner = owner
        self.stream: MuxStream | None = None

    def stream_data(self, data: bytes) -> None:
        """The Proxy-Client's answer (Yb | Tb), in any split."""
        self.owner.pake_data(self, data)

    def stream_ended(self) -> None:
        """The Proxy-Client ended the pake stream: the pairing ends."""
        self.owner.pake_ended(self, Reason.CANCELLED, "the partner ended the pairing", True)

    def stream_reset(self, reason: Reason, message: str, remote: bool) -> None:
        """Refused (OPEN_RESULT) or reset: the pairing ends."""
        self.owner.pake_ended(self, reason, message, remote)

    def stream_closed(self) -> None:
        """Closed both ways: the pairing ends."""
        self.owner.pake_ended(self, Reason.CANCELLED, "the pairing stream closed", True)


class ServerEndToEnd(EndToEnd):
    """The end-to-end state of a Proxy-Server instance (docs/protocol.md §9.3, §9.8).

    One :class:`tcptunnel._e2e.ServerPairing`, kept across links so that a Gateway that
    closes links gains no fresh handshake budget; one timer (handshake deadline or next
    attempt).
    """

    def __init__(self, service: ProxyService, password: str) -> None:
        self.service = service
        self.clock: interfaces.IReactorTime = service.reactor
        self.pairing = _e2e.ServerPairing(password, service.config.session_id)
        self.link: ProxyLink | None = None
        self.pake: _ServerPake | None = None
        self._timer: interfaces.IDelayedCall | None = None
        self._logged_failure: str | None = None
        # Local connections waiting for the handshake in progress: (connection, retry).
        self._held: list[tuple[Any, Callable[[], None]]] = []

    @property
    def index(self) -> int:
        """The instance's index, for log lines."""
        return self.service.config.index

    # -- link events ------------------------------------------------------------------

    def link_ready(self, link: ProxyLink) -> None:
        """A new link: it pairs once PARTNER reports a Proxy-Client."""
        self.link = link

    def partner_changed(self, link: ProxyLink, count: int) -> None:
        """Start a handshake when a Proxy-Client appears."""
        if link is self.link:
            self.pairing.set_partner(count > 0, self.clock.seconds())
            self._step()

    def link_lost(self, link: ProxyLink) -> None:
        """The pairing dies with its link (its pake stream was reset already)."""
        if link is not self.link:
            return
        now = self.clock.seconds()
        self.link = None
        if self.pairing.state is not ServerState.IDLE:
            self.pairing.ended("the link to the Gateway was lost", now)
        self.pake = None
        self.pairing.set_partner(False, now)
        self._step()

    def link_draining(self, link: ProxyLink) -> None:
        """The pairing ends with its link's draining: the new link pairs afresh, with new
        keys.  Its pake stream is reset, so that it does not keep the draining link open;
        the streams it sealed hold their own keys and finish on the draining link."""
        if link is not self.link:
            return
        pake = self.pake
        self.link_lost(link)
        if pake is not None and pake.stream is not None and not pake.stream.finished:
            pake.stream.abortConnection(Reason.CANCELLED, "the link is draining: the "
                                        "pairing starts again on the new link")

    def stop(self) -> None:
        """Cancel the timer."""
        self._cancel_timer()

    def status(self) -> dict[str, Any]:
        """Where the pairing stands: state, its public id, why there is none."""
        pairing = self.pairing.pairing
        return {"enabled": True, "state": self.pairing.state.value,
                "pairing": pairing.pairing_id.hex() if pairing is not None else None,
                "failure": self.pairing.failure, "held_connections": len(self._held)}

    def hold(self, connection: Any, retry: Callable[[], None]) -> bool:
        """Hold a local connection while the handshake runs (bounded: past MAX_HELD the
        connection is refused at once instead)."""
        if (self.pairing.state is not ServerState.HANDSHAKING or self.link is None
                or len(self._held) >= MAX_HELD):
            return False
        self._held.append((connection, retry))
        return True

    def ready(self, link: ProxyLink) -> bool:
        """Whether ``link`` has its pairing: its new streams are sealed now."""
        return link is self.link and self.pairing.state is ServerState.PAIRED

    def _release(self) -> None:
        """The handshake ended (keys, or a failure): the held connections open or are
        refused now."""
        held, self._held = self._held, []
        for connection, retry in held:
            transport = getattr(connection, "transport", None)
            if not getattr(connection, "done", False) and transport is not None and getattr(
                    transport, "connected", True):
                retry()

    # -- the handshake -----------------------------------------------------------------

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _tick(self) -> None:
        self._timer = None
        self._step()

    def _step(self) -> None:
        """Expire a late handshake, start one when allowed, set the one timer."""
        now = self.clock.seconds()
        pake = self.pake
        if self.pairing.expire(now):
            self.pake = None
            self._log_failure()
            if pake is not None and pake.stream is not None:
                pake.stream.abortConnection(Reason.TIMEOUT, "end-to-end handshake deadline")
        link = self.link
        if (link is not None and link.core.state is LinkState.READY and not link._closing
                and self.pairing.state is ServerState.IDLE):
            message = self.pairing.start(now)
            if message is not None:
                self._open_pake(link, message, now)
        self._cancel_timer()
        due = self.pairing.next_timer(now)
        if due is not None and due != float("inf"):
            self._timer = self.clock.callLater(max(0.0, due - now), self._tick)
        if self._held and self.pairing.state is not ServerState.HANDSHAKING:
            self._release()

    def _open_pake(self, link: ProxyLink, message: bytes, now: float) -> None:
        pake = _ServerPake(self)
        try:
            stream = _open_raw(link, fr.KIND_PAKE, ((_e2e.FIELD_PAKE, message),),
                               lambda stream_id: MuxStream(link, stream_id, pake))
        except StreamError as e:
            self.pairing.ended(f"cannot open the end-to-end handshake stream: {e.message}",
                               now)
            self._log_failure()
            return
        pake.stream = stream
        self.pake = pake
        self.pairing.opened(stream.stream_id)
        log.info("[{index}] Starting the end-to-end handshake with the Proxy-Client",
                 index=self.index)

    def pake_data(self, pake: _ServerPake, data: bytes) -> None:
        """The answer of the handshake in progress: confirm it (or not), reply Ta."""
        stream = pake.stream
        if pake is not self.pake or stream is None:
            return
        now = self.clock.seconds()
        try:
            reply = self.pairing.receive(data, now)
        except PasswordMismatchError as e:
            # Ta still goes out (then FIN): the Proxy-Client decides by its own check.
            self.pake = None
            stream.write(e.reply)
            stream.loseWriteConnection()
            self._log_failure()
            self._step()
            return
        except IntegrityError as e:
            self.pake = None
            stream.abortConnection(Reason.INTEGRITY, e.message)
            self._log_failure()
            self._step()
            return
        if reply:
            stream.write(reply)
        if self.pairing.state is ServerState.PAIRED and self.pairing.pairing is not None:
            self._logged_failure = None
            log.info("[{index}] End-to-end pairing established (pairing {pairing}): streams "
                     "are sealed", index=self.index,
                     pairing=self.pairing.pairing.pairing_id.hex())
            self._step()

    def pake_ended(self, pake: _ServerPake, reason: Reason, message: str, remote: bool) -> None:
        """The pake stream was refused, reset or ended: the pairing is gone."""
        if pake is not self.pake:
            return
        self.pake = None
        now = self.clock.seconds()
        if pake.stream is not None and not pake.stream.finished:
            pake.stream.abortConnection(Reason.CANCELLED, "the pairing ended")
        if reason is Reason.E2E_UNAVAILABLE:
            self.pairing.refused(False, now)
        elif reason is Reason.UNSUPPORTED:
            self.pairing.refused(True, now)
        elif reason is Reason.E2E_MISMATCH:
            self.pairing.ended(_e2e.MESSAGE_MISMATCH, now)
        else:
            by = "the partner" if remote else "this end"
            self.pairing.ended(f"{reason.name} from {by}{': ' + message if message else ''}",
                               now)
        self._log_failure()
        self._step()

    def _log_failure(self) -> None:
        """Log why there are no keys, once per reason (a retry that fails alike is quiet)."""
        failure = self.pairing.failure
        if failure and failure != self._logged_failure:
            self._logged_failure = failure
            advice = (_e2e.ADVICE_MISMATCH if failure.startswith(_e2e.MESSAGE_MISMATCH)
                      else _e2e.ADVICE_NO_PASSWORD
                      if failure.startswith(_e2e.MESSAGE_NO_PASSWORD) else "")
            emit = log.error if advice else log.warn
            emit("[{index}] Session {session}: no end-to-end pairing with the Proxy-Client: "
                 "{why}; {advice}local connections are refused until one is made",
                 index=self.index, session=self.service.config.session_id, why=failure,
                 advice=f"{advice}; " if advice else "")

    # -- streams -----------------------------------------------------------------------

    def open_stream(self, link: ProxyLink, host: str, port: int, endpoint: StreamEndpoint,
                    kind: int, fields: tuple[tuple[int, bytes], ...]) -> MuxStream | None:
        """Seal the OPEN of a new stream under the pairing, or raise StreamError: never a
        stream in clear.  A ``udp`` stream (``endpoint`` a DatagramEndpoint) becomes a
        SealedDatagramStream."""
        if kind not in (fr.KIND_TCP, fr.KIND_UDP):
            raise StreamError(Reason.UNSUPPORTED, f"{fr.KIND_NAMES.get(kind, kind)} streams are "
                              "not sealed by this release")
        admission = self.pairing.admission() if link is self.link else _e2e.Admission(
            "refuse", "no end-to-end pairing on this link")
        if admission.action != "open":
            message = admission.message or "the end-to-end handshake is in progress"
            reason = (Reason.E2E_MISMATCH if message.startswith(_e2e.MESSAGE_MISMATCH)
                      else Reason.NO_PARTNER if not self.pairing.partner
                      else Reason.E2E_UNAVAILABLE)
            raise StreamError(reason, f"end-to-end: {message}")
        fr.validate_target(host, port)
        stream_id = link.core.next_stream_id
        inner = _e2e.inner_open(kind, fr.target_fields(host, port) + list(fields))
        value, cipher = self.pairing.open_stream(stream_id, inner)
        datagrams = (self.pairing.datagram_cipher(stream_id) if kind == fr.KIND_UDP
                     else None)

        def make(opened: int) -> MuxStream:
            assert opened == stream_id, (opened, stream_id)
            if datagrams is not None:
                return SealedDatagramStream(link, opened, _datagram_endpoint(endpoint),
                                            datagrams)
            return SealedStream(link, opened, endpoint, cipher)

        return _open_raw(link, fr.KIND_SEALED, ((_e2e.FIELD_SEALED, value),), make)


# -- Proxy-Client ---------------------------------------------------------------------


class _ClientPake(StreamEndpoint):
    """The Proxy-Client's end of one ``pake`` stream (one per Proxy-Server link)."""

    def __init__(self, owner: ClientEndToEnd, link: ProxyLink, stream_id: int,
                 origin: int) -> None:
        self.owner = owner
        self.link = link
        self.stream_id = stream_id
        self.origin = origin
        self.stream: MuxStream | None = None

    def stream_data(self, data: bytes) -> None:
        """The Proxy-Server's confirmation Ta."""
        self.owner.pake_data(self, data)

    def stream_ended(self) -> None:
        """FIN from the Proxy-Server (after a mismatch it sends Ta, then FIN)."""
        self.owner.pake_ended(self)

    def stream_reset(self, reason: Reason, message: str, remote: bool) -> None:
        """The pairing ends."""
        self.owner.pake_ended(self)

    def stream_closed(self) -> None:
        """The pairing ends."""
        self.owner.pake_ended(self)


class ClientEndToEnd(EndToEnd):
    """The end-to-end state of a Proxy-Client instance: one budget, pairings per link.

    Without a password it only refuses the new kinds (``E2E_UNAVAILABLE``), saying so in
    its log; with one it refuses every clear stream (``E2E_REQUIRED``).
    """

    def __init__(self, service: ProxyService, password: str | None) -> None:
        self.service = service
        self.clock: interfaces.IReactorTime = service.reactor
        self.password = password
        self.budget = _e2e.HandshakeBudget(now=self.clock.seconds())
        self.pairings: weakref.WeakKeyDictionary[ProxyLink, _e2e.ClientPairings] = (
            weakref.WeakKeyDictionary())
        self.ciphers: weakref.WeakKeyDictionary[
            ProxyLink, dict[int, StreamCipher | DatagramCipher]] = weakref.WeakKeyDictionary()
        self._timers: weakref.WeakKeyDictionary[ProxyLink, interfaces.IDelayedCall] = (
            weakref.WeakKeyDictionary())
        self._logged: dict[str, float] = {}

    @property
    def index(self) -> int:
        """The instance's index, for log lines."""
        return self.service.config.index

    def _pairings(self, link: ProxyLink) -> _e2e.ClientPairings:
        pairings = self.pairings.get(link)
        if pairings is None:
            assert self.password is not None
            pairings = _e2e.ClientPairings(self.password, self.service.config.session_id,
                                           self.budget)
            self.pairings[link] = pairings
        return pairings

    def status(self) -> dict[str, Any]:
        """Whether end-to-end encryption is required, and the pairings of the link."""
        link = self.service.link
        pairings = self.pairings.get(link) if link is not None else None
        return {"enabled": self.password is not None,
                "pairings": len(pairings) if pairings is not None else 0}

    def link_lost(self, link: ProxyLink) -> None:
        """Every pairing of the link is gone with it."""
        self.pairings.pop(link, None)
        self.ciphers.pop(link, None)
        timer = self._timers.pop(link, None)
        if timer is not None and timer.active():
            timer.cancel()

    def stop(self) -> None:
        """Cancel the deadline timers."""
        for timer in list(self._timers.values()):
            if timer.active():
                timer.cancel()
        self._timers.clear()

    def _refuse(self, link: ProxyLink, stream_id: int, reason: Reason, message: str,
                log_key: str, log_text: str, **fields: Any) -> None:
        now = self.clock.seconds()
        if now - self._logged.get(log_key, -REFUSAL_LOG_INTERVAL) >= REFUSAL_LOG_INTERVAL:
            self._logged[log_key] = now
            log.warn("[{index}] " + log_text, index=self.index, **fields)
        link.reject_stream(stream_id, reason, message)

    def filter_open(self, link: ProxyLink, stream_id: int,
                    request: OpenRequest) -> OpenRequest | None:
        """Answer pake OPENs here, open sealed ones, refuse what the policy forbids."""
        kind = request.kind
        if self.password is None:
            if kind in fr.ENVELOPE_FIELDS:
                self._refuse(link, stream_id, Reason.E2E_UNAVAILABLE,
                             _e2e.MESSAGE_NO_PASSWORD, "unavailable",
                             "Session {session}: Proxy-Server #{origin} requires end-to-end "
                             "encryption, but this Proxy-Client has no end-to-end password: "
                             "its streams are refused; set endToEndPassword on this proxy "
                             "(the same as the Proxy-Server's)", origin=request.origin,
                             session=self.service.config.session_id)
                return None
            return request
        origin = request.origin
        if kind == fr.KIND_PAKE:
            self._handshake(link, stream_id, request)
            return None
        if kind != fr.KIND_SEALED:
            self._refuse(link, stream_id, Reason.E2E_REQUIRED, _e2e.MESSAGE_REQUIRED,
                         "required", "Session {session}: refused a stream in clear from "
                         "Proxy-Server #{origin}, which has no end-to-end password (this "
                         "Proxy-Client requires end-to-end encryption): set endToEndPassword "
                         "on the Proxy-Server too (the same as this proxy's)", origin=origin,
                         session=self.service.config.session_id)
            return None
        outer = fr.open_payload(request.window, request.origin, kind, list(request.fields))
        try:
            details, cipher = self._pairings(link).accept(outer, self.clock.seconds())
            clear = fr.parse_open(_e2e.clear_open_payload(outer, details))
        except IntegrityError as e:
            self._refuse(link, stream_id, Reason.INTEGRITY, e.message, "integrity",
                         "Sealed stream from Proxy-Server #{origin} refused: {why}",
                         origin=origin, why=e.message)
            return None
        except StreamError as e:
            link.reject_stream(stream_id, e.reason, e.message)
            return None
        if clear.kind == fr.KIND_UDP:
            # The OPEN authenticated just now: its datagram keys, for attach_stream.
            self.ciphers.setdefault(link, {})[stream_id] = (
                self._pairings(link).datagram_cipher(outer))
            return clear
        if clear.kind != fr.KIND_TCP:
            link.reject_stream(stream_id, Reason.UNSUPPORTED,
                               f"sealed {fr.KIND_NAMES.get(clear.kind, clear.kind)} streams are "
                               "not supported by this release")
            return None
        self.ciphers.setdefault(link, {})[stream_id] = cipher
        return clear

    def attach_stream(self, link: ProxyLink, stream_id: int,
                      endpoint: StreamEndpoint) -> MuxStream | None:
        """A SealedStream (SealedDatagramStream for ``udp``) for a sealed OPEN that
        :meth:`filter_open` let through."""
        cipher = self.ciphers.get(link, {}).pop(stream_id, None)
        if cipher is None:
            return None
        stream: MuxStream
        if isinstance(cipher, DatagramCipher):
            stream = SealedDatagramStream(link, stream_id, _datagram_endpoint(endpoint), cipher)
        else:
            stream = SealedStream(link, stream_id, endpoint, cipher)
        link.streams[stream_id] = stream
        return stream

    # -- handshakes --------------------------------------------------------------------

    def _handshake(self, link: ProxyLink, stream_id: int, request: OpenRequest) -> None:
        now = self.clock.seconds()
        payload = fr.open_payload(request.window, request.origin, request.kind,
                                  list(request.fields))
        pairings = self._pairings(link)
        try:
            answer = pairings.handshake_requested(stream_id, payload, now)
        except HandshakeRefusedError as e:
            self._refuse(link, stream_id, Reason.LIMIT, e.message, "limit",
                         "End-to-end handshake from Proxy-Server #{origin} refused: {why}",
                         origin=request.origin, why=e.message)
            return
        except UnsupportedSuiteError as e:
            link.reject_stream(stream_id, Reason.UNSUPPORTED, e.message)
            return
        except E2EError as e:
            link.reject_stream(stream_id, Reason.INTEGRITY, e.message)
            return
        pake = _ClientPake(self, link, stream_id, request.origin)
        pake.stream = MuxProtocol.attach_stream(link, stream_id, pake)
        link.accept_stream(stream_id)
        pake.stream.write(answer)
        self._schedule(link)

    def _schedule(self, link: ProxyLink) -> None:
        timer = self._timers.pop(link, None)
        if timer is not None and timer.active():
            timer.cancel()
        pairings = self.pairings.get(link)
        due = pairings.next_timer() if pairings is not None else None
        if due is not None:
            now = self.clock.seconds()
            self._timers[link] = self.clock.callLater(max(0.0, due - now), self._expire, link)

    def _expire(self, link: ProxyLink) -> None:
        self._timers.pop(link, None)
        pairings = self.pairings.get(link)
        if pairings is None:
            return
        for stream_id in pairings.expire(self.clock.seconds()):
            stream = link.streams.get(stream_id)
            log.warn("[{index}] End-to-end handshake (stream {stream}) not confirmed within "
                     "{deadline:g} s", index=self.index, stream=stream_id,
                     deadline=_e2e.PAKE_DEADLINE)
            if stream is not None:
                stream.abortConnection(Reason.TIMEOUT, "end-to-end handshake deadline")
        self._schedule(link)

    def pake_data(self, pake: _ClientPake, data: bytes) -> None:
        """The Proxy-Server's confirmation: the pairing is confirmed, or it is gone."""
        pairings = self.pairings.get(pake.link)
        stream = pake.stream
        if pairings is None or stream is None:
            return
        was_confirmed = pairings.confirmed(pake.stream_id)
        try:
            pairings.handshake_data(pake.stream_id, data, self.clock.seconds())
        except PasswordMismatchError as e:
            log.error("[{index}] Session {session}: end-to-end handshake with Proxy-Server "
                      "#{origin} failed: {why}; {advice}; its streams are refused until then",
                      index=self.index, session=self.service.config.session_id,
                      origin=pake.origin, why=e.message, advice=_e2e.ADVICE_MISMATCH)
            stream.abortConnection(Reason.E2E_MISMATCH, e.message)
        except IntegrityError as e:
            stream.abortConnection(Reason.INTEGRITY, e.message)
        else:
            if not was_confirmed and pairings.confirmed(pake.stream_id):
                log.info("[{index}] End-to-end pairing with Proxy-Server #{origin} confirmed",
                         index=self.index, origin=pake.origin)
        self._schedule(pake.link)

    def pake_ended(self, pake: _ClientPake) -> None:
        """The pake stream ended: forget its pairing's keys."""
        pairings = self.pairings.get(pake.link)
        if pairings is not None:
            pairings.handshake_ended(pake.stream_id)
        if pake.stream is not None and not pake.stream.finished:
            pake.stream.abortConnection(Reason.CANCELLED, "the pairing ended")


def end_to_end(service: ProxyService) -> EndToEnd | None:
    """The end-to-end state for a proxy instance: a Proxy-Server with a password pairs and
    seals; a Proxy-Client always gets one (without a password it refuses sealed streams
    with a clear reason); a Proxy-Server without one sends in clear (None)."""
    secret = service.config.e2e_password
    password = secret.cleartext if secret is not None else None
    if service.config.role == "proxy-client":
        return ClientEndToEnd(service, password)
    if password is None:
        return None
    return ServerEndToEnd(service, password)
