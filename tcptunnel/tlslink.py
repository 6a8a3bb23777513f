"""TLS for links: a thin memory-BIO TLS protocol, on the standard library's ``ssl`` by default
(:class:`StdlibLinkTLSProtocol`), or on pyOpenSSL's public API (:class:`LinkTLSProtocol`,
``TCPTUNNEL_PYOPENSSL_TLS=1``).

The standard library's ``SSLObject`` and ``MemoryBIO`` make each TLS operation one C call;
pyOpenSSL's make it three to five Python frames around a cffi call.  ``perf`` of the three
processes during 1-byte ping-pong put 94 of the 171 µs that TLS added per round trip on
pyOpenSSL in the interpreter (25 in OpenSSL, 11 in cffi); on the standard library's ``ssl`` an
interleaved A/B measured 0.83-0.95x the CPU per round trip and 0.92-0.95x the CPU per byte in
bulk (docs/benchmarks.md, the TLS record path).  The rest of this docstring describes the
pyOpenSSL protocol, which the standard library's follows call for call.

What Twisted's ``TLSMemoryBIOProtocol`` does for a link, in fewer calls per record.  Twisted's
read path calls ``recv`` until OpenSSL raises ``WantReadError`` and then ``bio_read`` on the
empty send BIO, which raises again: two raised and caught exceptions (pyOpenSSL's
``_raise_ssl_error``, about 2.5 µs each) after every record, and a ``recv`` that finds nothing.
This protocol counts the whole TLS records in the bytes it feeds OpenSSL (each record starts
with a 5-byte header: type, version, length; :class:`RecordCounter`) and calls ``recv`` once per
record, so a read of one record costs one ``bio_write`` and one ``recv``.  A record that carries
no application data (a TLS 1.3 session ticket or key update) still ends in ``WantReadError``;
only then is the send BIO read for what OpenSSL answered.  A write is one ``send`` of all the
bytes and one ``bio_read`` of all it produced, one ``write`` to the transport.  All the records
one transport read decrypts reach the link in one ``dataReceived``.

``bench/tls_records.py`` measured, per record (write and read, µs CPU): 1-byte records 17.1
with ``TLSMemoryBIOProtocol``, 11.4 counted; 16 KiB records 19.3 and 14.0.

Everything else is as Twisted's: the handshake and its listener (``handshakeCompleted``),
writes held until the handshake is done (pausing a registered producer), ``close_notify``
both ways, ``abortConnection``, writes after ``loseConnection`` dropped unless a producer is
registered, errors passed to ``connectionLost`` (an EOF that breaks TLS as ``ConnectionLost``),
``getPeerCertificate``, ``negotiatedProtocol`` (ALPN), ``getHandle`` (the ``SSL.Connection``).
Twisted's connection creators get this protocol where they expect a ``TLSMemoryBIOProtocol``
(``IOpenSSLClientConnectionCreator.clientConnectionForTLS``): ``ClientTLSOptions``' certificate
check calls its ``failVerification``, its ALPN offer reads ``factory.wrappedFactory``, an SNI
callback may call ``abortConnection`` on the connection's app data; all three are here, and
``test_tls.LinkTLSContractTests`` is the canary for them.

``TCPTUNNEL_TWISTED_TLS=1`` in the environment, or :func:`use_twisted_tls`, makes
:func:`tcptunnel.tls.tls_factory` use Twisted's ``TLSMemoryBIOProtocol`` instead;
``TCPTUNNEL_PYOPENSSL_TLS=1``, or :func:`use_pyopenssl_tls`, this module's protocol on pyOpenSSL.
"""

from __future__ import annotations

import hashlib
import os
import ssl
from dataclasses import dataclass
from typing import Any

from OpenSSL import crypto
from OpenSSL.SSL import Connection, Error, SysCallError, WantReadError, ZeroReturnError
from twisted.internet import error
from twisted.internet.interfaces import (
    IHandshakeListener,
    ILoggingContext,
    INegotiated,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IPushProducer,
    ISystemHandle,
    ITransport,
)
from twisted.internet.protocol import Protocol
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

_ENVIRONMENT = "TCPTUNNEL_TWISTED_TLS"
_PYOPENSSL_ENVIRONMENT = "TCPTUNNEL_PYOPENSSL_TLS"

# TLS records: a 5-byte header (content type, version, 2-byte length), then that many bytes.
_HEADER = 5
# The largest record OpenSSL accepts (TLS 1.2: 2^14 plaintext + 2048 expansion); a header
# announcing more is counted as a whole record at once, so recv() meets the error now.
MAX_RECORD_BODY = 2**14 + 2048
# TLS content types (RFC 8446 B.1 and RFC 6520: change_cipher_spec 20 ... heartbeat 24); a
# record's major version is 3 in every TLS version.
_FIRST_TYPE, _LAST_TYPE = 20, 24
# recv() size: more than a record's plaintext (2^14), so one call reads a whole record; a
# call that fills it is followed by another.
_RECV_SIZE = 2**15
# Room for what a write's records add beyond its bytes (TLS 1.3: 22 bytes a record; TLS 1.2
# CBC with SHA-384 up to 85), so that one bio_read takes all of it; more is read in a loop.
_SEND_SLACK = 1024


class RecordCounter:
    """How many whole TLS records the bytes fed so far complete (sans-IO).

    ``feed(data)`` returns the number of records whose last byte is in ``data``; a header or
    a body cut by the end of ``data`` is carried over to the next call.  A header no TLS
    record has (a length over :data:`MAX_RECORD_BODY`, a content type outside 20-24, a major
    version other than 3) counts as a whole record at once, so that ``recv`` meets
    OpenSSL's error without waiting for the body it announces.
    """

    __slots__ = ("_header", "_left")

    def __init__(self) -> None:
        self._header = b""  # the start of a header cut by the end of the bytes fed
        self._left = 0  # bytes of the current record's body still to come

    def feed(self, data: bytes) -> int:
        """The number of records that ``data`` completes."""
        records = 0
        position = 0
        end = len(data)
        left = self._left
        while True:
            if left:
                if end - position < left:
                    self._left = left - (end - position)
                    return records
                position += left
                records += 1
            if position == end:
                self._left = 0
                return records
            if self._header or end - position < _HEADER:
                cut = position + _HEADER - len(self._header)
                self._header += data[position:cut]
                if len(self._header) < _HEADER:
                    self._left = 0
                    return records
                position = cut
                header = self._header
                kind, major = header[0], header[1]
                left = int.from_bytes(header[3:], "big")
                self._header = b""
            else:
                kind, major = data[position], data[position + 1]
                left = (data[position + 3] << 8) | data[position + 4]
                position += _HEADER
            if left == 0:
                records += 1  # an empty record is whole at its header
            elif left > MAX_RECORD_BODY or not _FIRST_TYPE <= kind <= _LAST_TYPE or major != 3:
                # Not a record OpenSSL reads (too long; not a TLS content type or version:
                # "GET / ..." announces 0x202f = 8,239 bytes): let recv() say so at once.
                records += 1


class _Choice:
    """Whether :func:`tcptunnel.tls.tls_factory` uses :class:`LinkTLSFactory`, and on which
    engine."""

    forced: bool | None = None  # set by use_twisted_tls()
    pyopenssl: bool | None = None  # set by use_pyopenssl_tls()


def _environment_says(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def use_twisted_tls(enabled: bool = True) -> None:
    """From now on, new TLS links use Twisted's ``TLSMemoryBIOProtocol`` (``enabled``), or
    this module's protocol again (False: the environment decides again).  Links already made
    keep theirs.  ``TCPTUNNEL_TWISTED_TLS=1`` does the same for a whole process."""
    _Choice.forced = None if not enabled else True


def use_pyopenssl_tls(enabled: bool = True) -> None:
    """From now on, new TLS links run this module's protocol on pyOpenSSL
    (:class:`LinkTLSProtocol`, ``enabled``) instead of the standard library's ``ssl``
    (:class:`StdlibLinkTLSProtocol`), or the environment decides again (False).
    ``TCPTUNNEL_PYOPENSSL_TLS=1`` does the same for a whole process."""
    _Choice.pyopenssl = None if not enabled else True


def using_own_tls() -> bool:
    """Whether new TLS links use this module's protocols (not Twisted's)."""
    if _Choice.forced is not None:
        return not _Choice.forced
    return not _environment_says(_ENVIRONMENT)


def using_stdlib_tls() -> bool:
    """Whether new TLS links of this module run on the standard library's ``ssl``."""
    if _Choice.pyopenssl is not None:
        return not _Choice.pyopenssl
    return not _environment_says(_PYOPENSSL_ENVIRONMENT)


def represents_eof(value: BaseException) -> bool:
    """Whether a pyOpenSSL or ``ssl`` error is an EOF that came before TLS closed (the peer
    or the network dropped the connection), which Twisted reports as ``ConnectionLost``."""
    if isinstance(value, ssl.SSLEOFError):
        return True
    if isinstance(value, SysCallError):
        reason = value.args[1] if len(value.args) > 1 else ""
    elif isinstance(value, Error):
        queue = value.args[0] if value.args else []
        if not queue:
            return True  # OpenSSL 4 reports an EOF with an empty error queue
        reason = queue[-1][-1]
    else:
        return False
    return str(reason).casefold().startswith("unexpected eof")


@implementer(IPushProducer)
class _ProducerGate:
    """What the transport below sees as the producer: it passes pause and resume on once
    each, whichever of the transport and this TLS layer (holding writes until the handshake
    is done) asks."""

    def __init__(self, producer: Any) -> None:
        self.producer = producer
        self.paused = False

    def pauseProducing(self) -> None:  # noqa: N802
        """Pause the producer, unless paused already."""
        if not self.paused:
            self.paused = True
            self.producer.pauseProducing()

    def resumeProducing(self) -> None:  # noqa: N802
        """Resume the producer, if paused."""
        if self.paused:
            self.paused = False
            self.producer.resumeProducing()

    def stopProducing(self) -> None:  # noqa: N802
        """Stop the producer."""
        self.producer.stopProducing()


@implementer(ISystemHandle, INegotiated, ITransport)
class LinkTLSProtocol(ProtocolWrapper):
    """TLS between a transport and the protocol it wraps (see the module docstring).

    Attribute names the transport does not have are looked up on the transport below
    (``ProtocolWrapper``), as with Twisted's TLS protocol: a link reaches the TCP socket's
    ``pauseProducing`` or ``setTcpNoDelay`` that way.
    """

    factory: LinkTLSFactory
    transport: Any  # the transport below (TCP, a PROXY header reader)
    _tls: Any = None  # an OpenSSL.SSL.Connection here, an ssl.SSLObject in the subclass
    _handshake_done = False
    _lost_tls = False  # TLS is over (closed, failed): nothing more is read or written
    _aborted = False
    _reason: Failure | None = None  # what connectionLost reports, when known before
    _producer: Any = None  # a _ProducerGate, or a pull producer as registered
    _held: list[bytes] | None = None  # writes waiting for the handshake

    def __init__(self, factory: LinkTLSFactory, wrapped: Any) -> None:
        ProtocolWrapper.__init__(self, factory, wrapped)
        self._records = RecordCounter()
        self._unread = 0  # whole records fed to OpenSSL and not known to be read

    # -- the connection -------------------------------------------------------------------

    def makeConnection(self, transport: Any) -> None:  # noqa: N802
        """Make the TLS connection, connect the wrapped protocol, start the handshake."""
        self._tls = self.factory.tls_connection(self)
        # As Twisted's TLS protocol does (each call replaces the last: the transport's
        # last interface stays, besides the ones this class declares).
        for interface in providedBy(transport):
            directlyProvides(self, interface)
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        self.wrappedProtocol.makeConnection(self)
        self._handshake()

    def getHandle(self) -> Connection | None:  # noqa: N802
        """The ``OpenSSL.SSL.Connection`` (None once the connection is lost)."""
        return self._tls

    def getPeerCertificate(self) -> Any:  # noqa: N802
        """The peer's certificate (``OpenSSL.crypto.X509``), or None."""
        assert self._tls is not None
        return self._tls.get_peer_certificate()

    @property
    def negotiatedProtocol(self) -> bytes | None:  # noqa: N802
        """The ALPN protocol the handshake chose, or None."""
        if self._tls is None:
            return None
        return self._tls.get_alpn_proto_negotiated() or None

    def _handshake(self) -> None:
        """Advance the handshake; on completion tell an ``IHandshakeListener``."""
        if self._aborted:
            return
        assert self._tls is not None
        try:
            self._tls.do_handshake()
        except WantReadError:
            self._flush()
            return
        except Error:
            self._tls_finished(Failure())
            return
        self._handshake_done = True
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()

    # -- reading --------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        """Feed the bytes to OpenSSL; deliver what they complete."""
        tls = self._tls
        if tls is None or self._lost_tls:
            return
        tls.bio_write(data)
        self._unread += self._records.feed(data)
        if not self._handshake_done:
            self._handshake()
            if not self._handshake_done:
                return
            self._unread = -1  # how many records the handshake read is unknown: read all
        if self._held is not None:
            self._release_held()
        self._receive()

    def _receive(self) -> None:
        """``recv`` once per whole record fed (until WantReadError when ``_unread`` < 0),
        deliver the application data in one call, then act on a close or an error."""
        tls = self._tls
        assert tls is not None
        chunks: list[bytes] = []
        unread = self._unread
        answered = False  # a record without application data: OpenSSL may have answered it
        ending: Failure | None = None
        closed = False
        while unread:
            try:
                chunk = tls.recv(_RECV_SIZE)
            except WantReadError:
                answered = True
                break
            except ZeroReturnError:
                closed = True
                break
            except Error:
                ending = Failure()
                break
            chunks.append(chunk)
            if len(chunk) < _RECV_SIZE:
                unread -= 1  # a whole record read (a full buffer may leave some of it)
        self._unread = 0
        self._deliver(chunks, closed, ending, answered)

    def _deliver(self, chunks: list[bytes], closed: bool, ending: Failure | None,
                 answered: bool) -> None:
        """The end of a read, for both engines: the application data in one call, then
        the peer's close_notify answered, an error passed on, or what OpenSSL answered
        (``answered``: a session ticket or key update) sent."""
        if chunks and not self._aborted:
            self.wrappedProtocol.dataReceived(chunks[0] if len(chunks) == 1
                                              else b"".join(chunks))
        if closed:
            self._shutdown_tls()  # answer the peer's close_notify
            self._tls_finished(None)
        elif ending is not None:
            self._tls_finished(ending)
        elif answered and self._tls is not None:
            self._flush()

    # -- writing --------------------------------------------------------------------------

    def write(self, data: Any) -> None:
        """Encrypt and send ``data``; dropped after ``loseConnection`` unless a producer is
        registered (as Twisted's)."""
        if self.disconnecting and self._producer is None:
            return
        self._write(data)

    def writeSequence(self, data: Any) -> None:  # noqa: N802
        """``write`` of the joined bytes."""
        self.write(b"".join(data))

    def _write(self, data: Any) -> None:
        if self._lost_tls or not data:
            return
        if self._held is not None or not self._handshake_done:
            self._hold(bytes(data))
            return
        tls = self._tls
        assert tls is not None
        total = len(data)
        sent = 0
        try:
            sent = tls.send(data)
            while sent < total:  # a memory BIO takes all at once; this is in case not
                sent += tls.send(memoryview(data)[sent:])
        except WantReadError:  # renegotiating (TLS 1.2): wait for the peer
            self._hold(bytes(memoryview(data)[sent:]))
        except Error:
            self._tls_finished(Failure())
            return
        self._flush(total)

    def _hold(self, data: bytes) -> None:
        if self._held is None:
            self._held = []
        self._held.append(data)
        if isinstance(self._producer, _ProducerGate):
            self._producer.pauseProducing()

    def _release_held(self) -> None:
        held, self._held = self._held or [], None
        for data in held:
            self._write(data)
        if self._held is not None:
            return  # held again
        if isinstance(self._producer, _ProducerGate):
            self._producer.resumeProducing()
        elif self.disconnecting and self._producer is None:
            self._shutdown_tls()  # loseConnection() came while the writes were held

    def _flush(self, expected: int = 0) -> None:
        """Write to the transport all that OpenSSL has to send (``expected``: about as many
        bytes as a write just gave it)."""
        tls = self._tls
        assert tls is not None
        size = expected + (expected >> 7) + _SEND_SLACK
        chunks = []
        while True:
            try:
                chunk = tls.bio_read(size)
            except WantReadError:
                break
            chunks.append(chunk)
            if len(chunk) < size:
                break
        if chunks:
            self.transport.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    # -- closing --------------------------------------------------------------------------

    def loseConnection(self) -> None:  # noqa: N802
        """Send close_notify (after the held writes) and close the transport once the peer
        answers; before the handshake, abort (OpenSSL would wait for it)."""
        if self.disconnecting or not self.connected:
            return
        if not self._handshake_done and self._held is None:
            self.abortConnection()
        self.disconnecting = True
        if self._held is None and self._producer is None:
            self._shutdown_tls()

    def abortConnection(self) -> None:  # noqa: N802
        """Close at once: nothing more is delivered or sent."""
        self._aborted = True
        self.disconnecting = True
        self.transport.abortConnection()

    def failVerification(self, reason: Failure) -> None:  # noqa: N802
        """The peer's certificate was refused (Twisted's ``ClientTLSOptions`` calls this):
        abort, with ``reason`` for ``connectionLost``."""
        self._reason = reason
        self.abortConnection()

    def _shutdown_tls(self) -> None:
        """Send close_notify, or answer the peer's; close the transport when both were."""
        tls = self._tls
        if tls is None:
            return
        try:
            done = tls.shutdown()
        except Error:  # mid-handshake: OpenSSL cannot shut down yet
            done = False
        self._flush()
        if done:
            self.transport.loseConnection()

    def _tls_finished(self, reason: Failure | None) -> None:
        """TLS is over (``reason``: why, or None when it closed cleanly): send what OpenSSL
        has for the peer (an alert), close the transport."""
        if reason is not None and reason.value is not None and represents_eof(reason.value):
            reason = Failure(error.ConnectionLost())
        if self._reason is None:
            self._reason = reason
        self._lost_tls = True
        if self._tls is not None:
            self._flush()
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = Failure(error.ConnectionDone())) -> None:  # noqa: B008, N802
        """The transport is gone: deliver what OpenSSL still holds, then tell the wrapped
        protocol, with the TLS error if there was one."""
        if not self._lost_tls and self._tls is not None:
            self._receive_at_eof()
            self._lost_tls = True
        reason = self._reason or reason
        self._reason = None
        self.connected = False
        ProtocolWrapper.connectionLost(self, reason)
        self._tls = None  # the connection's app data is this protocol: break the cycle

    def _receive_at_eof(self) -> None:
        """Tell OpenSSL the bytes ended; deliver what it still holds."""
        assert self._tls is not None
        self._tls.bio_shutdown()
        self._unread = -1
        self._receive()

    # -- producer -------------------------------------------------------------------------

    def registerProducer(self, producer: Any, streaming: bool) -> None:  # noqa: N802
        """Register on the transport below, through a gate that this layer can pause too."""
        if self._lost_tls:
            producer.stopProducing()
            return
        registered = _ProducerGate(producer) if streaming else producer
        self.transport.registerProducer(registered, streaming)
        self._producer = registered

    def unregisterProducer(self) -> None:  # noqa: N802
        """Unregister; a ``loseConnection`` waiting for it goes on."""
        if self._producer is None:
            return
        self._producer = None
        self.transport.unregisterProducer()
        if self.disconnecting and self._held is None:
            self._shutdown_tls()


# What a TLS failure raises, on either engine (pyOpenSSL's, the standard library's).
TLS_ERRORS: tuple[type[BaseException], ...] = (Error, ssl.SSLError)
# OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH: a valid
# certificate that names another host (ssl.SSLCertVerificationError.verify_code).
_NAME_MISMATCH_CODES = frozenset((62, 64))


def is_name_mismatch(value: BaseException | None) -> bool:
    """Whether the standard library's TLS refused a certificate for naming another host (on
    pyOpenSSL, service_identity raises its own ``VerificationError``)."""
    return (isinstance(value, ssl.SSLCertVerificationError)
            and getattr(value, "verify_code", None) in _NAME_MISMATCH_CODES)


@dataclass(frozen=True)
class StdlibTLS:
    """What :class:`StdlibLinkTLSProtocol` needs of a connection creator (its
    ``stdlib_tls()``): the context, the server's name (SNI; verified by the context when it
    checks host names), and a SHA-256 pin of the server's certificate, checked once the
    handshake is done (the context then verifies nothing: the pin is the verification)."""

    context: ssl.SSLContext
    server_hostname: str | None = None
    pin: bytes | None = None


class _StdlibHandle:
    """``getHandle()`` of a :class:`StdlibLinkTLSProtocol`: the ``ssl.SSLObject``, with the
    two pyOpenSSL ``Connection`` methods links call (``tcptunnel.mux`` logs the version and
    cipher)."""

    __slots__ = ("ssl_object",)

    def __init__(self, ssl_object: ssl.SSLObject) -> None:
        self.ssl_object = ssl_object

    def get_protocol_version_name(self) -> str | None:
        """The TLS version, as pyOpenSSL names it (``TLSv1.3``)."""
        return self.ssl_object.version()

    def get_cipher_name(self) -> str | None:
        """The cipher suite's OpenSSL name."""
        cipher = self.ssl_object.cipher()
        return cipher[0] if cipher else None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ssl_object, name)


class StdlibLinkTLSProtocol(LinkTLSProtocol):
    """:class:`LinkTLSProtocol` on the standard library's ``ssl.SSLObject`` and
    ``ssl.MemoryBIO`` (public API, C all the way to OpenSSL) instead of pyOpenSSL.

    The same behaviour (held writes, producers, ``close_notify``, abort, errors to
    ``connectionLost``), in fewer Python frames: a pyOpenSSL ``recv``/``send``/``bio_read``
    is three to five Python calls around a cffi call each, here each is one C call.  A read
    calls ``read`` while the receive BIO holds bytes (OpenSSL takes whole records from it, and
    leaves a cut record's rest there, so ``pending`` says whether a whole record may be
    waiting: no ``SSLWantReadError`` after a whole record); the send BIO is read only when
    ``pending`` says it holds something.  ``perf`` of the three processes (1-byte ping-pong,
    TLS minus plain links, µs per round trip) put 94 of TLS's 171 µs in the interpreter,
    25 in OpenSSL, 11 in cffi.

    Errors are ``ssl.SSLError`` (``TLS_ERRORS``, :func:`is_name_mismatch`); a pin that does
    not match is an ``ssl.SSLCertVerificationError`` raised here after the handshake, before
    any byte is written or delivered.
    """

    _in: ssl.MemoryBIO
    _out: ssl.MemoryBIO
    _handle: _StdlibHandle | None = None

    def makeConnection(self, transport: Any) -> None:  # noqa: N802
        """Make the ``SSLObject`` on two memory BIOs, then as :class:`LinkTLSProtocol`."""
        spec = self.factory.stdlib_tls()
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._spec = spec
        self._tls = spec.context.wrap_bio(
            self._in, self._out, server_side=not self.factory.is_client,
            server_hostname=spec.server_hostname if self.factory.is_client else None)
        for interface in providedBy(transport):
            directlyProvides(self, interface)
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        self.wrappedProtocol.makeConnection(self)
        self._handshake()

    def getHandle(self) -> Any:  # noqa: N802
        """The ``ssl.SSLObject`` (``.ssl_object``) behind pyOpenSSL's version and cipher
        getters; None once the connection is lost."""
        if self._tls is None:
            return None
        if self._handle is None:
            self._handle = _StdlibHandle(self._tls)
        return self._handle

    def getPeerCertificate(self) -> Any:  # noqa: N802
        """The peer's certificate as an ``OpenSSL.crypto.X509`` (as on pyOpenSSL), or None."""
        assert self._tls is not None
        der = self._tls.getpeercert(binary_form=True)
        return crypto.load_certificate(crypto.FILETYPE_ASN1, der) if der else None

    @property
    def negotiatedProtocol(self) -> bytes | None:  # noqa: N802
        """The ALPN protocol the handshake chose, or None."""
        if self._tls is None:
            return None
        selected = self._tls.selected_alpn_protocol()
        return selected.encode("ascii") if selected else None

    def _handshake(self) -> None:
        if self._aborted:
            return
        tls = self._tls
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except ssl.SSLError:
            self._tls_finished(Failure())
            return
        pin = self._spec.pin
        if pin is not None:
            der = tls.getpeercert(binary_form=True) or b""
            if hashlib.sha256(der).digest() != pin:
                # Nothing was written or delivered yet; the client's Finished stays unsent.
                self.failVerification(Failure(ssl.SSLCertVerificationError(
                    1, "certificate verify failed: the server's certificate does not match "
                       "the certificate pin")))
                return
        self._handshake_done = True
        self._flush()  # a client's Finished
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        """Feed the bytes to OpenSSL; deliver what they complete."""
        if self._tls is None or self._lost_tls:
            return
        self._in.write(data)
        if not self._handshake_done:
            self._handshake()
            if not self._handshake_done:
                return
        if self._held is not None:
            self._release_held()
        self._receive()

    def _receive(self, at_eof: bool = False) -> None:
        """``read`` while the receive BIO holds bytes (once more ``at_eof``), deliver the
        application data in one call, then act on a close or an error."""
        tls = self._tls
        incoming = self._in
        chunks: list[bytes] = []
        ending: Failure | None = None
        closed = False
        while incoming.pending or at_eof:
            at_eof = False
            try:
                chunk = tls.read(_RECV_SIZE)
            except ssl.SSLWantReadError:
                break  # a cut record, or one without application data (a ticket)
            except ssl.SSLZeroReturnError:
                closed = True  # the peer's close_notify, after ours
                break
            except ssl.SSLError:
                ending = Failure()
                break
            if not chunk:
                closed = True  # the peer's close_notify
                break
            chunks.append(chunk)
        # _flush sends only what the outgoing BIO holds (a key update OpenSSL answered).
        self._deliver(chunks, closed, ending, answered=True)

    def _write(self, data: Any) -> None:
        if self._lost_tls or not data:
            return
        if self._held is not None or not self._handshake_done:
            self._hold(bytes(data))
            return
        try:
            self._tls.write(data)  # a memory BIO takes it all (no partial writes)
        except ssl.SSLWantReadError:
            self._hold(bytes(data))
            return
        except ssl.SSLError:
            self._tls_finished(Failure())
            return
        self.transport.write(self._out.read())

    def _flush(self, expected: int = 0) -> None:
        if self._out.pending:
            self.transport.write(self._out.read())

    def _shutdown_tls(self) -> None:
        tls = self._tls
        if tls is None:
            return
        try:
            tls.unwrap()
            done = True
        except ssl.SSLError:  # SSLWantReadError: close_notify sent, the peer's to come
            done = False
        self._flush()
        if done:
            self.transport.loseConnection()

    def _receive_at_eof(self) -> None:
        self._in.write_eof()
        self._receive(at_eof=True)


class LinkTLSFactory(WrappingFactory[LinkTLSProtocol]):
    """Wraps the protocols of ``wrapped`` in :class:`LinkTLSProtocol`; ``creator`` is an
    ``IOpenSSLClientConnectionCreator`` (``is_client``) or an
    ``IOpenSSLServerConnectionCreator``."""

    protocol = LinkTLSProtocol
    noisy = False  # as Twisted's: the wrapped factory says (or not) that it starts

    def __init__(self, creator: Any, is_client: bool, wrapped: IProtocolFactory,
                 stdlib: bool | None = None) -> None:
        interface = (IOpenSSLClientConnectionCreator if is_client
                     else IOpenSSLServerConnectionCreator)
        if not interface.providedBy(creator):
            raise TypeError(f"{creator!r} does not provide {interface.__name__}")
        super().__init__(wrapped)
        self._creator: Any = creator
        self._is_client = is_client
        # The standard library's engine (stdlib None: unless switched off) for a creator
        # that can describe itself to it (tcptunnel.tls's do: stdlib_tls()).
        if stdlib is None:
            stdlib = using_stdlib_tls()
        if stdlib and hasattr(creator, "stdlib_tls"):
            self.protocol = StdlibLinkTLSProtocol

    def stdlib_tls(self) -> StdlibTLS:
        """The creator's current standard library context (a reload may have replaced it
        since the last connection)."""
        spec: StdlibTLS = self._creator.stdlib_tls()
        return spec

    @property
    def is_client(self) -> bool:
        """Whether the connections are TLS clients."""
        return self._is_client

    def tls_connection(self, protocol: LinkTLSProtocol) -> Connection:
        """A new ``SSL.Connection`` for ``protocol``, set up as Twisted's factory does: the
        creator's connection, in connect or accept state, ``protocol`` as its app data."""
        if self._is_client:
            connection = self._creator.clientConnectionForTLS(protocol)
            connection.set_connect_state()
        else:
            connection = self._creator.serverConnectionForTLS(protocol)
            connection.set_accept_state()
        connection.set_app_data(protocol)
        return connection

    def logPrefix(self) -> str:  # noqa: N802
        """The wrapped factory's prefix, marked as TLS (as Twisted's)."""
        wrapped = self.wrappedFactory
        prefix = (wrapped.logPrefix() if ILoggingContext.providedBy(wrapped)
                  else wrapped.__class__.__name__)
        return f"{prefix} (TLS)"
