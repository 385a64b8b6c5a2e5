"""What inference nodes import: subscribe to models, receive which file to load, hot-swap a session.

``subscribe()`` (blocking iterator) and ``async_subscribe()`` (asyncio) follow the daemon's socket,
reconnecting with capped exponential backoff when it restarts; ``HotSession`` wraps an
onnxruntime session and swaps it off the inference path. Standard library + ``modeld.protocol``
(and its ``modeld.errors``) only: onnxruntime is imported lazily, by ``HotSession`` alone.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import io
import logging
import random
import select
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from .errors import IntegrityError, ModeldError, TemporaryError
from .protocol import (CPU_PROVIDER, DEFAULT_PREFER, PROTOCOL_VERSION, STATE_EVENTS,
                       LineSplitter, ProtocolError, ack_request, decode, default_socket_path,
                       encode, pack_npz, parse_request, sample_header, subscribe_request)

log = logging.getLogger(__name__)

#: the daemon's answers (a ``status`` of many models) can be long; nodes accept far more than
#: the daemon does from them
CLIENT_MAX_LINE_BYTES = 64 * 1024 * 1024
SEND_TIMEOUT_S = 5.0
#: ``HotSession(contribute_samples=True)``: inputs kept (a uniform sample of the whole run), how
#: often a few are handed to the daemon, how many at a time
SAMPLE_RESERVOIR = 64
SAMPLE_INTERVAL_S = 10.0
SAMPLES_PER_SEND = 4
#: after the daemon refused samples for a reason that will not go away soon (the model does not
#: use them, the area is full): wait this much longer before offering again
SAMPLE_REFUSED_BACKOFF = 8


class DaemonUnavailableError(TemporaryError):
    """The daemon's socket does not answer (not running, wrong path, no permission)."""


class ModelNotReadyError(TemporaryError):
    """``HotSession.run`` was called before any variant of the model was loaded."""


class Backoff:
    """Capped exponential backoff with full jitter (delays in seconds)."""

    __slots__ = ("initial_s", "max_s", "_attempt")

    def __init__(self, initial_s: float = 0.05, max_s: float = 5.0) -> None:
        self.initial_s, self.max_s, self._attempt = initial_s, max_s, 0

    def next_delay_s(self) -> float:
        cap = min(self.max_s, self.initial_s * (2 ** min(self._attempt, 30)))
        self._attempt += 1
        # Full jitter (at least half the step) spreads a crowd of nodes after a daemon restart.
        return random.uniform(cap / 2, cap)

    def reset(self) -> None:
        self._attempt = 0


class _EventFilter:
    """What a subscription does with each line from the daemon; shared by both client kinds."""

    __slots__ = ("hello", "last_error")

    def __init__(self) -> None:
        self.hello: dict[str, Any] | None = None
        self.last_error: dict[str, Any] | None = None

    def __call__(self, line: bytes) -> dict[str, Any] | None:
        """The state event in ``line`` (variant/unavailable/removed), else None."""
        try:
            event = decode(line)
        except ProtocolError as e:
            log.warning("modeld: undecodable line from the daemon: %s", e)
            return None
        kind = event.get("event")
        if kind in STATE_EVENTS:
            return event
        if kind == "hello":
            self.hello = event
            if event.get("protocol") != PROTOCOL_VERSION:
                log.warning("modeld: daemon speaks protocol %s, this client %s",
                            event.get("protocol"), PROTOCOL_VERSION)
        elif kind == "error":
            self.last_error = event
            log.warning("modeld: daemon reported an error: %s", event.get("error"))
        return None


def _as_models(models: str | Iterable[str]) -> tuple[str, ...]:
    return (models,) if isinstance(models, str) else tuple(models)


class _SubscriptionBase:
    """What both subscription kinds hold: the request they (re-)send and how they back off."""

    def __init__(self, models: str | Iterable[str], *, socket_path: str | Path | None = None,
                 providers: Sequence[str] = (CPU_PROVIDER,), prefer: str = DEFAULT_PREFER,
                 node: str | None = None, reconnect: bool = True,
                 backoff_initial_s: float = 0.05, backoff_max_s: float = 5.0) -> None:
        self.models = _as_models(models)
        self.node = node or ""
        self.socket_path = str(socket_path or default_socket_path())
        self.providers = tuple(providers)
        self.reconnect = reconnect
        self.connects = 0
        request = subscribe_request(self.models, providers=self.providers, prefer=prefer,
                                    node=node)
        parse_request(request)  # a bad option is the caller's ProtocolError now, not a silent stall
        self._request = encode(request)
        self._filter = _EventFilter()
        self._backoff = Backoff(backoff_initial_s, backoff_max_s)
        # A connection that delivered state makes the next attempt immediate; one that did not
        # (refused, closed at once) backs off, so a crowd of nodes never spins on the daemon.
        self._healthy = True
        self._next_attempt_at = 0.0  # time.monotonic() of the next connection attempt

    def _retry_later(self) -> None:
        self._next_attempt_at = time.monotonic() + self._backoff.next_delay_s()

    def _connected(self) -> None:
        self._healthy = False
        self.connects += 1

    def _connection_lost(self) -> None:
        if self._healthy:
            self._next_attempt_at = 0.0
        else:
            self._retry_later()

    def _state_received(self, event: dict[str, Any]) -> dict[str, Any]:
        self._healthy = True
        self._backoff.reset()
        return event

    @property
    def hello(self) -> dict[str, Any] | None:
        return self._filter.hello

    @property
    def last_error(self) -> dict[str, Any] | None:
        return self._filter.last_error


class Subscription(_SubscriptionBase):
    """A blocking iterator of state events for ``models``; reconnects and re-subscribes.

    Iterate it from one thread; ``ack`` and ``close`` may be called from any thread.
    """

    def __init__(self, models: str | Iterable[str], **options: Any) -> None:
        super().__init__(models, **options)
        self._pending: collections.deque[dict[str, Any]] = collections.deque()
        self._splitter = LineSplitter(CLIENT_MAX_LINE_BYTES)
        self._sock: socket.socket | None = None
        self._send_lock = threading.Lock()
        self._closed = threading.Event()

    def __iter__(self) -> "Subscription":
        return self

    def __next__(self) -> dict[str, Any]:
        event = self.next_event()
        if event is None:
            raise StopIteration
        return event

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def next_event(self, timeout_s: float | None = None) -> dict[str, Any] | None:
        """The next state event; None on timeout or once closed."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            if self._pending:
                return self._pending.popleft()
            if self._closed.is_set():
                return None
            if self._sock is None:
                if not self._connect(deadline):
                    return None
                continue
            if not self._receive(deadline):
                return None

    def _receive(self, deadline: float | None) -> bool:
        """Read what the socket has; False on timeout."""
        sock = self._sock
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return False
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        if not poller.poll(None if remaining is None else remaining * 1000):
            return False
        try:
            data = sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError, socket.timeout):
            return True
        except OSError:
            data = b""
        if not data:
            self._disconnected("the daemon closed the connection")
            return True
        try:
            lines = self._splitter.feed(data)
        except ProtocolError as e:
            self._disconnected(str(e))
            return True
        for line in lines:
            event = self._filter(line)
            if event is not None:
                self._pending.append(self._state_received(event))
        return True

    def _connect(self, deadline: float | None) -> bool:
        """Connect and subscribe, waiting out failures with backoff; False on deadline/close."""
        while not self._closed.is_set():
            wait_s = self._next_attempt_at - time.monotonic()
            if deadline is not None and wait_s > deadline - time.monotonic():
                self._closed.wait(max(0.0, deadline - time.monotonic()))
                return False
            if wait_s > 0 and self._closed.wait(wait_s):
                return False
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(SEND_TIMEOUT_S)
            try:
                sock.connect(self.socket_path)
                sock.sendall(self._request)
            except OSError as e:
                sock.close()
                if not self.reconnect and self.connects == 0:
                    raise DaemonUnavailableError(
                        f"cannot connect to {self.socket_path}: {e.strerror or e}",
                        hint="is mecha10-modeld running? set MODELD_SOCKET") from e
                if not self.reconnect:
                    self._closed.set()
                    return False
                self._retry_later()
                continue
            with self._send_lock:
                self._sock = sock
            self._splitter.clear()
            self._connected()
            return True
        return False

    def _disconnected(self, why: str) -> None:
        with self._send_lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
            self._connection_lost()
        if not self._closed.is_set():
            log.info("modeld: disconnected (%s)%s", why,
                     "; reconnecting" if self.reconnect else "")
        if not self.reconnect:
            self._closed.set()

    def ack(self, model: str, generation: int, ok: bool = True,
            error: str | None = None) -> bool:
        """Tell the daemon the variant of ``generation`` loaded (or not). False if not connected:
        the next connection re-delivers the current state, so nothing is lost."""
        line = encode(ack_request(model, generation, ok=ok, error=error))
        with self._send_lock:
            if self._sock is None:
                return False
            try:
                self._sock.sendall(line)
                return True
            except OSError:
                return False

    def close(self) -> None:
        self._closed.set()
        with self._send_lock:
            sock = self._sock
            if sock is not None:
                try:  # wakes a reader blocked in poll() on another thread
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def subscribe(models: str | Iterable[str], *, socket_path: str | Path | None = None,
              providers: Sequence[str] = (CPU_PROVIDER,), prefer: str = DEFAULT_PREFER,
              node: str | None = None, **options: Any) -> Subscription:
    """Follow ``models``: ``for event in subscribe(["yolov8n"]): ...`` (see docs/protocol.md)."""
    return Subscription(models, socket_path=socket_path, providers=providers, prefer=prefer,
                        node=node, **options)


class AsyncSubscription(_SubscriptionBase):
    """The asyncio twin of ``Subscription``: ``async for event in sub``; ``await sub.ack(...)``."""

    def __init__(self, models: str | Iterable[str], **options: Any) -> None:
        super().__init__(models, **options)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._closed = False

    def __aiter__(self) -> "AsyncSubscription":
        return self

    async def __anext__(self) -> dict[str, Any]:
        event = await self.next_event()
        if event is None:
            raise StopAsyncIteration
        return event

    async def __aenter__(self) -> "AsyncSubscription":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def next_event(self, timeout_s: float | None = None) -> dict[str, Any] | None:
        """The next state event; None on timeout or once closed."""
        try:
            return await asyncio.wait_for(self._next_event(), timeout_s)
        except asyncio.TimeoutError:
            return None

    async def _next_event(self) -> dict[str, Any] | None:
        while not self._closed:
            if self._reader is None:
                if not await self._connect():
                    return None
                continue
            try:
                line = await self._reader.readuntil(b"\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError,
                    OSError):
                await self._disconnected()
                continue
            event = self._filter(line)
            if event is not None:
                return self._state_received(event)
        return None

    async def _connect(self) -> bool:
        while not self._closed:
            wait_s = self._next_attempt_at - time.monotonic()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            try:
                self._reader, self._writer = await asyncio.open_unix_connection(
                    self.socket_path, limit=CLIENT_MAX_LINE_BYTES)
                self._writer.write(self._request)
                await asyncio.wait_for(self._writer.drain(), SEND_TIMEOUT_S)
            except (OSError, asyncio.TimeoutError) as e:
                self._drop_streams()
                if not self.reconnect and self.connects == 0:
                    raise DaemonUnavailableError(
                        f"cannot connect to {self.socket_path}: {e}",
                        hint="is mecha10-modeld running? set MODELD_SOCKET") from e
                if not self.reconnect:
                    return False
                self._retry_later()
                continue
            self._connected()
            return True
        return False

    async def _disconnected(self) -> None:
        if self._drop_streams():
            self._connection_lost()
        if not self.reconnect and self.connects:
            self._closed = True

    def _drop_streams(self) -> bool:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
        return writer is not None

    async def ack(self, model: str, generation: int, ok: bool = True,
                  error: str | None = None) -> bool:
        if self._writer is None:
            return False
        try:
            self._writer.write(encode(ack_request(model, generation, ok=ok, error=error)))
            await asyncio.wait_for(self._writer.drain(), SEND_TIMEOUT_S)
            return True
        except (OSError, asyncio.TimeoutError):
            return False

    async def close(self) -> None:
        self._closed = True
        await self._disconnected()


def async_subscribe(models: str | Iterable[str], **options: Any) -> AsyncSubscription:
    """``async for event in async_subscribe(["yolov8n"]): ...``; same options as ``subscribe``."""
    return AsyncSubscription(models, **options)


def request(message: dict[str, Any], *, socket_path: str | Path | None = None,
            timeout_s: float = 5.0) -> dict[str, Any]:
    """Send one request (``{"op": "status"}``, ``{"op": "ping"}``) and return the daemon's answer."""
    path = str(socket_path or default_socket_path())
    deadline = time.monotonic() + timeout_s
    splitter = LineSplitter(CLIENT_MAX_LINE_BYTES)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            sock.connect(path)
            sock.sendall(encode(message))
            while time.monotonic() < deadline:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                data = sock.recv(1 << 16)
                if not data:
                    break
                for line in splitter.feed(data):
                    answer = decode(line)
                    if answer.get("event") != "hello":
                        return answer
    except OSError as e:
        raise DaemonUnavailableError(f"no answer from {path}: {e.strerror or e}",
                                     hint="is mecha10-modeld running? set MODELD_SOCKET") from e
    raise DaemonUnavailableError(f"no answer from {path} within {timeout_s} s",
                                 hint="is mecha10-modeld running? set MODELD_SOCKET")


def status(*, socket_path: str | Path | None = None, timeout_s: float = 5.0) -> dict[str, Any]:
    return request({"op": "status"}, socket_path=socket_path, timeout_s=timeout_s)


def ping(*, socket_path: str | Path | None = None, timeout_s: float = 5.0) -> bool:
    return request({"op": "ping"}, socket_path=socket_path,
                   timeout_s=timeout_s).get("event") == "pong"


def send_samples(model: str, samples: Sequence[bytes], *, node: str | None = None,
                 socket_path: str | Path | None = None, timeout_s: float = 10.0
                 ) -> list[dict[str, Any]]:
    """Offer ``samples`` (inputs the node ran: ``.npy`` bytes for a model of one input, an
    ``.npz`` of all of a call's inputs for one of several, see ``sample_bytes``) for ``model``
    on one connection;
    the daemon's answer to each, in order: a ``sample`` event, or an ``error`` with a ``code``
    (docs/protocol.md, "Field samples"). Stops at the first answer that closes the connection."""
    path = str(socket_path or default_socket_path())
    answers: list[dict[str, Any]] = []
    splitter = LineSplitter(CLIENT_MAX_LINE_BYTES)
    lines: collections.deque[bytes] = collections.deque()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            sock.connect(path)
            for data in samples:
                sock.sendall(encode(sample_header(model, len(data), node=node)) + data)
                while True:
                    while not lines:
                        chunk = sock.recv(1 << 16)
                        if not chunk:
                            return answers
                        lines.extend(splitter.feed(chunk))
                    answer = decode(lines.popleft())
                    if answer.get("event") in ("sample", "error"):
                        answers.append(answer)
                        break
    except OSError as e:
        if not answers:
            raise DaemonUnavailableError(f"no answer from {path}: {e.strerror or e}",
                                         hint="is mecha10-modeld running? set MODELD_SOCKET") from e
    return answers


def sample_bytes(feed: Mapping[str, Any]) -> bytes:
    """One call's inputs as one field sample: the ``.npy`` of its one array, or an ``.npz``
    (``protocol.pack_npz``) of one ``<input>.npy`` per input when there are several. Needs
    numpy (a node running onnxruntime has it)."""
    import numpy

    arrays = {}
    for name, value in feed.items():
        out = io.BytesIO()
        numpy.save(out, numpy.ascontiguousarray(value), allow_pickle=False)
        arrays[name] = out.getvalue()
    if len(arrays) == 1:
        return next(iter(arrays.values()))
    return pack_npz(arrays)


class Reservoir:
    """A uniform random sample of at most ``size`` items from a stream of unknown length
    (Algorithm R, Vitter 1985): item ``i`` (counting from 1) is kept with probability
    ``size / i``, in a random slot. ``offer()`` is all a caller pays per item (a lock, a counter,
    one random number); it says which slot to ``put`` the item in, or None to drop it, so an
    item is copied only when it is kept. Thread-safe."""

    __slots__ = ("size", "seen", "_items", "_fresh", "_rng", "_lock")

    def __init__(self, size: int, *, rng: random.Random | None = None) -> None:
        if size < 1:
            raise ValueError("a reservoir holds at least one item")
        self.size = size
        self.seen = 0
        self._items: list[Any] = [None] * size
        self._fresh: set[int] = set()       # slots filled since they were last taken
        self._rng = rng or random.Random()
        self._lock = threading.Lock()

    def offer(self) -> int | None:
        with self._lock:
            self.seen += 1
            if self.seen <= self.size:
                return self.seen - 1
            slot = self._rng.randrange(self.seen)
            return slot if slot < self.size else None

    def put(self, slot: int, item: Any) -> None:
        with self._lock:
            self._items[slot] = item
            self._fresh.add(slot)

    def items(self) -> list[Any]:
        with self._lock:
            return [i for i in self._items if i is not None]

    def take_fresh(self, count: int) -> list[Any]:
        """Up to ``count`` items put since they were last taken (each is handed out once)."""
        with self._lock:
            slots = self._rng.sample(sorted(self._fresh), min(count, len(self._fresh)))
            self._fresh.difference_update(slots)
            return [self._items[s] for s in slots]


# --- hot swap ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Loaded:
    """What a ``HotSession`` is running now."""

    model: str
    variant: str
    path: str
    sha256: str
    generation: int
    provider: str


class HotSession:
    """An onnxruntime session that follows the daemon: new variants load off the inference path.

    ``HotSession(models="yolov8n")`` subscribes itself; ``HotSession(subscription, "yolov8n")``
    follows a subscription of yours (it then iterates it: give it one of its own). On a variant
    event a background thread reads the file, checks its sha256 against the event, builds the new
    session from exactly those bytes and swaps one reference under a lock; a run in flight keeps
    the reference it took, so it finishes on the old session. A file that fails is nacked and the
    old session kept. ``unavailable``/``removed`` keep the current session running.

    ``contribute_samples=True`` (off by default: the frames are the node's) keeps a uniform
    sample of the inputs ``run`` was given over the whole run (``Reservoir``: a copy of the
    input only when the reservoir picks it) and every ``sample_interval_s`` a background thread
    offers a few new ones to the daemon as field samples: one sample per call, holding every
    input of the call (an ``.npz`` for a model of several inputs, ``sample_bytes``).
    """

    def __init__(self, subscription: Subscription | None = None, model: str | None = None, *,
                 models: str | Sequence[str] | None = None,
                 socket_path: str | Path | None = None,
                 providers: Sequence[str] = (CPU_PROVIDER,), prefer: str = DEFAULT_PREFER,
                 node: str | None = None, session_options: Any = None,
                 on_swap: Callable[[Loaded], None] | None = None,
                 on_event: Callable[[dict[str, Any]], None] | None = None,
                 contribute_samples: bool = False, sample_reservoir: int = SAMPLE_RESERVOIR,
                 sample_interval_s: float = SAMPLE_INTERVAL_S) -> None:
        if subscription is None:
            if models is None:
                raise ValueError("HotSession needs a subscription or models=")
            subscription = Subscription(models, socket_path=socket_path, providers=providers,
                                        prefer=prefer, node=node)
            self._owns_subscription = True
        else:
            self._owns_subscription = False
        if model is None:
            if len(subscription.models) != 1:
                raise ValueError("HotSession follows one model: name it with model=")
            model = subscription.models[0]
        self.model = model
        self.subscription = subscription
        self.last_event: dict[str, Any] | None = None
        self.last_error: str | None = None
        self.swaps = 0
        self._session_options = session_options
        self._on_swap = on_swap
        self._on_event = on_event
        self._lock = threading.Lock()
        self._session: Any = None
        self._current: Loaded | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._follow, name=f"modeld-hot-{model}",
                                        daemon=True)
        self._thread.start()
        #: what the daemon answered to the samples offered (``sample`` events and ``error``s)
        self.samples_sent = 0
        self.samples_refused = 0
        self.last_sample_answer: dict[str, Any] | None = None
        self._reservoir = Reservoir(sample_reservoir) if contribute_samples else None
        self._sample_interval_s = sample_interval_s
        self._stop_samples = threading.Event()
        self._sampler: threading.Thread | None = None
        if self._reservoir is not None:
            self._sampler = threading.Thread(target=self._contribute, daemon=True,
                                             name=f"modeld-samples-{model}")
            self._sampler.start()

    @property
    def current(self) -> Loaded | None:
        return self._current

    @property
    def session(self) -> Any:
        """The current ``onnxruntime.InferenceSession`` (for inputs/outputs metadata)."""
        with self._lock:
            return self._session

    def wait_ready(self, timeout_s: float | None = None) -> bool:
        """Block until a first variant is loaded."""
        return self._ready.wait(timeout_s)

    def run(self, output_names: Sequence[str] | None, input_feed: dict[str, Any],
            run_options: Any = None) -> list[Any]:
        """``InferenceSession.run`` on the current session."""
        with self._lock:
            session = self._session
        if session is None:
            raise ModelNotReadyError(f"no variant of {self.model} is loaded yet",
                                     entry=self.model, hint="wait_ready() first")
        reservoir = self._reservoir
        if reservoir is not None:
            slot = reservoir.offer()
            if slot is not None:
                self._keep(reservoir, slot, input_feed)
        # The local reference keeps the old session alive until this run returns, even if a
        # swap happens meanwhile: no run is cut short, none fails because of a swap.
        return session.run(output_names, input_feed, run_options)

    def _keep(self, reservoir: Reservoir, slot: int, input_feed: dict[str, Any]) -> None:
        # the whole call, every input of it: a multi-input model's sample is all of them
        if not input_feed or not all(hasattr(v, "copy") for v in input_feed.values()):
            log.info("modeld: %s: field samples are for inputs fed as arrays; not "
                     "contributing", self.model)
            self._reservoir = None
            return
        reservoir.put(slot, {str(name): value.copy() for name, value in input_feed.items()})

    @property
    def samples_seen(self) -> int:
        """``run`` calls the reservoir has seen (0 when not contributing)."""
        return self._reservoir.seen if self._reservoir is not None else 0

    def _contribute(self) -> None:
        """The sampler thread: every interval, offer a few inputs the reservoir took since."""
        wait_s = self._sample_interval_s
        while not self._stop_samples.wait(wait_s):
            reservoir = self._reservoir
            if reservoir is None:
                return
            feeds = reservoir.take_fresh(SAMPLES_PER_SEND)
            if not feeds:
                continue
            frames = [sample_bytes(feed) for feed in feeds]
            try:
                answers = send_samples(self.model, frames, node=self.subscription.node or None,
                                       socket_path=self.subscription.socket_path)
            except (ModeldError, OSError) as e:
                log.debug("modeld: samples not sent: %s", e)
                continue
            refused = [a for a in answers if a.get("event") != "sample"]
            self.samples_sent += len(answers) - len(refused)
            self.samples_refused += len(refused)
            if answers:
                self.last_sample_answer = answers[-1]
            if refused:
                log.info("modeld: daemon refused samples of %s: %s", self.model,
                         refused[0].get("error"))
            # a refusal that will not go away soon (the model does not use samples, the area
            # is full) waits longer; the next accepted sample brings the normal pace back
            wait_s = self._sample_interval_s * (SAMPLE_REFUSED_BACKOFF if refused and len(
                refused) == len(answers) else 1)

    def close(self) -> None:
        self._stop_samples.set()
        if self._sampler is not None:
            self._sampler.join(timeout=10)
        if self._owns_subscription:
            self.subscription.close()
            self._thread.join(timeout=10)

    def __enter__(self) -> "HotSession":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _follow(self) -> None:
        for event in self.subscription:
            if event.get("model") != self.model:
                continue
            self.last_event = event
            if event["event"] == "variant":
                self._switch_to(event)
            _call_quietly(self._on_event, event)

    def _switch_to(self, event: dict[str, Any]) -> None:
        generation = event["generation"]
        current = self._current
        if current is not None and current.sha256 == event["sha256"]:
            # Same file (a reconnect, or the daemon restarted): nothing to load.
            with self._lock:
                self._current = Loaded(self.model, event["variant"], event["path"],
                                       event["sha256"], generation, event["provider"])
            self.subscription.ack(self.model, generation, ok=True)
            return
        try:
            session = self._build(event)
        except Exception as e:  # any load failure is the node's verdict on this file: nack it
            self.last_error = str(e)
            log.warning("modeld: %s %s not loaded (%s); keeping %s", self.model,
                        event.get("variant"), e, current.variant if current else "nothing")
            self.subscription.ack(self.model, generation, ok=False, error=str(e))
            return
        loaded = Loaded(self.model, event["variant"], event["path"], event["sha256"], generation,
                        event["provider"])
        with self._lock:
            self._session, self._current = session, loaded
        self.swaps += 1
        self._ready.set()
        self.subscription.ack(self.model, generation, ok=True)
        _call_quietly(self._on_swap, loaded)

    def _build(self, event: dict[str, Any]) -> Any:
        data = Path(event["path"]).read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != event["sha256"]:
            raise IntegrityError(f"sha256 of {event['path']} is {digest[:12]}..., the daemon "
                                 f"announced {str(event['sha256'])[:12]}...", entry=self.model,
                                 hint="the file changed after it was proven")
        import onnxruntime  # only the hot-swap helper needs it

        try:  # from the bytes just checked: the file may be replaced between hash and load
            return onnxruntime.InferenceSession(data, sess_options=self._session_options,
                                                providers=[event["provider"]])
        except Exception as e:
            raise ModeldError(f"onnxruntime cannot load {event['variant']}: {e}",
                              entry=self.model) from e


def _call_quietly(callback: Callable[[Any], None] | None, arg: Any) -> None:
    """Run a node's callback; its failure is logged, never allowed to stop the follow thread."""
    if callback is None:
        return
    try:
        callback(arg)
    except Exception:
        log.exception("modeld: HotSession callback %r failed", callback)
