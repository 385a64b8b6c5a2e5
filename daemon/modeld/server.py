"""The asyncio Unix-socket server: nodes subscribe to models and are told which file to load.

The runner creates one ``Server``, calls ``start()`` (binding the socket, or adopting one from
systemd) and ``publish(views)`` whenever the model views change; the server computes each node's
choice (``serving.choose``), fans out only the changes and records nacks as rejections. It knows
nothing of reconciling: the runner hands it views and callbacks. Protocol: docs/protocol.md.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import errno
import grp
import itertools
import os
import socket
import stat
import struct
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import structlog

from . import __version__
from .atomic import TEMP_PREFIX
from .errors import ModeldError, PermanentError
from .protocol import (Ack, Admin, Ping, ProtocolError, Sample, Status, Subscribe, decode, encode,
                       error_event, hello_event, parse_request, pong_event, removed_event,
                       unavailable_event, variant_event, PROTOCOL_VERSION, DAEMON_NAME)
from .rejections import Rejection, Rejections
from .serving import Choice, ModelView, Unavailable, choose
from .unchanged import differs

log = structlog.get_logger(__name__)

#: the longest path a sockaddr_un holds (108 bytes with the terminating NUL)
MAX_SOCKET_PATH_BYTES = 107
#: consecutive bad lines after which a connection is closed as abusive
MAX_CONSECUTIVE_ERRORS = 16
#: models one connection may follow (names are kept per connection, so this bounds its memory)
MAX_SUBSCRIPTIONS_PER_CLIENT = 1024
#: generations of sent choices remembered per model and client, so a late ack still resolves
ACK_HISTORY = 8
#: bytes queued for one connection before it counts as not reading (its replies are dropped
#: for a snapshot of its states; again before a drain: disconnected)
MAX_CLIENT_OUTPUT_BYTES = 8 * 1024 * 1024
#: bytes queued for all connections together past which no connection's next request is read
#: until its own answers are written (pipelined `status` on many connections took 600 MB)
MAX_PENDING_OUTPUT_BYTES = 64 * 1024 * 1024
#: sample frames received at once over all connections (each up to MAX_SAMPLE_BYTES in memory);
#: the others wait with their bytes in the kernel's socket buffers
MAX_SAMPLES_IN_FLIGHT = 2
NOT_IN_CATALOG = "not in the catalog"
NOT_LOADED_YET = "daemon starting: catalog not loaded yet"


class SocketPathError(PermanentError):
    """The socket path cannot be used (too long, not a socket, not ours to replace)."""


class SocketInUseError(SocketPathError):
    """Another process is listening on the socket path (a second daemon?)."""


@dataclasses.dataclass(frozen=True)
class AdminPeer:
    """Who sent an admin request: the connection and its peer credentials (SO_PEERCRED)."""

    client: int
    pid: int | None
    uid: int | None
    gid: int | None


class Server:
    """Serves ``ModelView``s to subscribed nodes over a Unix socket (docs/protocol.md).

    ``on_rejection`` is called with keywords ``model, variant, sha256, provider, node, error``
    when a node nacks a file; ``status_extra()`` returns daemon-wide fields merged into every
    ``status`` answer. Both run on the event loop and must not block; their failures are logged.
    ``write_timeout_s`` bounds how long one client's write may wait before it is disconnected.
    ``rejections`` is the daemon's one record of nodes' rejections (``modeld.rejections``),
    shared with the reconciler: the server adds nacks to it and asks it per node.
    """

    def __init__(self, *, socket_path: Path, socket_mode: int = 0o660,
                 socket_group: str | None = None, max_clients: int = 1024,
                 max_line_bytes: int = 65536, queue_limit: int = 256,
                 on_rejection: Callable[..., None] | None = None,
                 rejections: Rejections | None = None,
                 status_extra: Callable[[], dict] | None = None,
                 on_admin: Callable[..., None] | None = None,
                 on_sample: Callable[[str, str, bytes], Mapping[str, Any]] | None = None,
                 write_timeout_s: float = 10.0,
                 max_client_output_bytes: int = MAX_CLIENT_OUTPUT_BYTES,
                 max_pending_output_bytes: int = MAX_PENDING_OUTPUT_BYTES) -> None:
        self.socket_path = Path(socket_path)
        self.socket_mode = socket_mode
        self.socket_group = socket_group
        self.max_clients = max_clients
        self.max_line_bytes = max_line_bytes
        self.queue_limit = queue_limit
        self.max_client_output_bytes = max_client_output_bytes
        self.max_pending_output_bytes = max_pending_output_bytes
        self.output = _OutputBudget()
        self.write_timeout_s = write_timeout_s
        self._on_rejection = on_rejection
        self._status_extra = status_extra
        #: ``on_admin(request, peer, send)``: operators' commands (the runner wires modeld.admin);
        #: ``peer`` is an ``AdminPeer``, ``send`` queues an event on that connection
        self._on_admin = on_admin
        #: ``on_sample(model, node, data) -> answer fields``: a node's field sample (the runner
        #: wires modeld.samples); called in a thread, its ``ModeldError`` is the node's answer
        self._on_sample = on_sample
        self._sample_slots: asyncio.Semaphore | None = None
        self._views: dict[str, ModelView] = {}
        self._published = False
        self._generations: dict[str, int] = {}
        # Seeded from the wall clock so generations keep increasing across daemon restarts.
        self._last_generation = _now_ms()
        #: (node, sha256, provider) -> the node's rejection; per node, never for every node
        self.rejections = rejections if rejections is not None else Rejections()
        self.rejections.watch(self._offer_again)
        self._clients: set[_Client] = set()
        self._ids = itertools.count(1)
        self._server: asyncio.AbstractServer | None = None
        self._bound_inode: int | None = None  # set when we bound (and so must unlink) the socket

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self, sock: socket.socket | None = None) -> None:
        """Listen on ``sock`` (adopted from systemd: left as it is) or bind ``socket_path``."""
        if sock is None:
            sock, self._bound_inode = _bind_socket(self.socket_path, self.socket_mode,
                                                   self.socket_group, self._backlog)
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, sock=sock, limit=self.max_line_bytes, backlog=self._backlog)
        except BaseException:
            if self._bound_inode is not None:
                sock.close()
                _unlink_if_ours(self.socket_path, self._bound_inode)
                self._bound_inode = None
            raise
        log.info("socket_listening", path=str(self.socket_path),
                 adopted=self._bound_inode is None, max_clients=self.max_clients)

    @property
    def _backlog(self) -> int:
        return max(128, min(self.max_clients, 4096))

    async def close(self) -> None:
        """Stop accepting, close every client, unlink the socket file if we bound it."""
        if self._server is not None:
            self._server.close()
        clients = list(self._clients)
        for client in clients:
            client.abort()
        # Aborted transports end each handler (EOF); cancelling them instead makes asyncio's
        # stream callback log the CancelledError as an error (Python 3.11).
        tasks = [c.task for c in clients if c.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        if self._bound_inode is not None:
            _unlink_if_ours(self.socket_path, self._bound_inode)
            self._bound_inode = None
        self._server = None
        log.info("socket_closed", path=str(self.socket_path))

    @property
    def subscriber_count(self) -> int:
        return sum(1 for c in self._clients if c.subscriptions)

    # --- views -------------------------------------------------------------------------------

    def publish(self, views: Mapping[str, ModelView]) -> None:
        """Take the full set of current views; tell each subscriber whose choice changed.

        Call it on the server's event loop (it is not thread-safe, and need not be)."""
        old, new = self._views, dict(views)
        self._views = new
        first = not self._published
        self._published = True
        # Unchanged views are the very objects of the last pass (modeld.unchanged): `is` first.
        touched = {name for name, view in new.items() if differs(old.get(name), view)}
        for name in touched:
            self._bump(name)
        gone = set(old) - set(new)
        for name in gone:
            self._generations.pop(name, None)
        if self.rejections and touched:
            self._drop_healed(touched)
        if first:
            touched |= {m for c in self._clients for m in c.subscriptions}
        for client in list(self._clients):
            for model in client.subscriptions:
                if model in touched or model in gone:
                    self._refresh(client, model)

    def _bump(self, model: str) -> int:
        self._last_generation = max(self._last_generation + 1, _now_ms())
        self._generations[model] = self._last_generation
        return self._last_generation

    def _refresh(self, client: "_Client", model: str, *, force: bool = False) -> None:
        """Compute ``client``'s state for ``model``; send it if it differs from what it has."""
        event, key, choice = self._state_for(client, model)
        if not force and client.sent_keys.get(model) == key:
            return
        client.sent_keys[model] = key
        client.sent_events[model] = event
        if choice is not None:
            history = client.history.setdefault(model, collections.OrderedDict())
            history[event["generation"]] = choice
            while len(history) > ACK_HISTORY:
                history.popitem(last=False)
        client.send(event)

    def _state_for(self, client: "_Client", model: str
                   ) -> tuple[dict[str, Any], tuple, Choice | None]:
        view = self._views.get(model)
        if view is None:
            # "removed" takes back a model the node had; a name never seen is "unavailable".
            if client.sent_keys.get(model, ("",))[0] in ("variant", "unavailable"):
                return removed_event(model=model), ("removed",), None
            reason = NOT_IN_CATALOG if self._published else NOT_LOADED_YET
            return (unavailable_event(model=model, reason=reason, generation=0),
                    ("unknown", reason), None)
        providers, prefer = client.subscriptions[model]
        result = choose(view, providers, prefer,
                        self.rejections.of_node(client.node_key))
        generation = self._generations[model]
        if isinstance(result, Unavailable):
            return (unavailable_event(model=model, reason=result.reason, generation=generation),
                    ("unavailable", result.reason), None)
        event = variant_event(model=model, variant=result.variant, path=result.path,
                              sha256=result.sha256, generation=generation,
                              provider=result.provider, reason=result.reason)
        return event, ("variant", result.sha256, result.provider, result.path), result

    # --- requests ----------------------------------------------------------------------------

    def _handle_line(self, client: "_Client", line: bytes) -> Sample | None:
        """Answer one request line; a ``Sample`` header is returned, for its frame to be read."""
        if not line.strip():
            return None  # a bare newline (someone typing into socat) is not an error
        try:
            request = parse_request(decode(line))
        except ProtocolError as e:
            client.consecutive_errors += 1
            log.info("bad_request", client=client.id, node=client.node, error=str(e))
            client.send(error_event(str(e)))
            return None
        if isinstance(request, Sample):
            return request
        client.consecutive_errors = 0
        if isinstance(request, Subscribe):
            self._subscribe(client, request)
        elif isinstance(request, Ack):
            self._ack(client, request)
        elif isinstance(request, Status):
            client.send(self.status())
        elif isinstance(request, Ping):
            client.send(pong_event())
        elif isinstance(request, Admin):
            if self._on_admin is None:
                client.send(error_event("admin: not available on this daemon", id=request.id))
                return
            peer = AdminPeer(client=client.id, pid=client.pid, uid=client.uid, gid=client.gid)
            try:
                self._on_admin(request, peer, client.send)
            except Exception as e:  # a faulty handler must not break the socket server
                log.error("on_admin_failed", command=request.command, error=repr(e))
                client.send(error_event(f"admin: internal error: {type(e).__name__}",
                                        id=request.id))
        return None

    async def _receive_sample(self, client: "_Client", request: Sample,
                              reader: asyncio.StreamReader) -> str | None:
        """Read a sample's frame and hand it to ``on_sample`` off the loop; None, or why the
        connection must close (a frame that never came whole cannot be skipped)."""
        if self._sample_slots is None:
            self._sample_slots = asyncio.Semaphore(MAX_SAMPLES_IN_FLIGHT)
        async with self._sample_slots:
            try:
                data = await asyncio.wait_for(reader.readexactly(request.size),
                                              self.write_timeout_s)
            except asyncio.TimeoutError:
                return (f"sample: {request.size} bytes announced, not received within "
                        f"{self.write_timeout_s:g} s; closing")
            except (asyncio.IncompleteReadError, ConnectionError, OSError):
                return "connection closed inside a sample frame"
            node = request.node or client.node or f"uid {client.uid}"
            if self._on_sample is None:
                answer: Mapping[str, Any] | None = None
                error, code = "sample: field samples are not accepted by this daemon", "unavailable"
            else:
                try:
                    answer = await asyncio.to_thread(self._on_sample, request.model, node, data)
                    error, code = "", ""
                except ModeldError as e:
                    answer, error, code = None, f"sample for {request.model}: {e}", \
                        str(getattr(e, "code", type(e).__name__))
                except Exception as e:  # a faulty hook must not break the socket server
                    log.error("on_sample_failed", model=request.model, error=repr(e))
                    answer, error, code = None, f"sample: internal error: {type(e).__name__}", \
                        "internal"
        if answer is None:
            client.consecutive_errors += 1
            log.info("sample_refused", client=client.id, node=node, model=request.model,
                     code=code, error=error)
            client.send(error_event(error, code=code, model=request.model))
        else:
            client.consecutive_errors = 0
            client.send({"event": "sample", **answer})
        return None

    def _subscribe(self, client: "_Client", request: Subscribe) -> None:
        total = len(set(client.subscriptions) | set(request.models))
        if total > MAX_SUBSCRIPTIONS_PER_CLIENT:
            client.consecutive_errors += 1
            client.send(error_event(f"subscribe: at most {MAX_SUBSCRIPTIONS_PER_CLIENT} models "
                                    f"per connection"))
            return
        client.node = request.node or client.node
        if client.node:
            client.node_key = client.node
        log.info("subscribed", client=client.id, node=client.node, models=list(request.models),
                 providers=list(request.providers), prefer=request.prefer)
        for model in request.models:
            client.subscriptions[model] = (request.providers, request.prefer)
            self._refresh(client, model, force=True)

    def _ack(self, client: "_Client", ack: Ack) -> None:
        choice = client.history.get(ack.model, {}).get(ack.generation)
        if choice is None:
            client.send(error_event(f"ack: no variant of {ack.model!r} was sent to this "
                                    f"connection with generation {ack.generation}",
                                    model=ack.model, generation=ack.generation))
            return
        if ack.ok:
            client.acked[ack.model] = (ack.generation, choice)
            log.info("variant_loaded", client=client.id, node=client.node, model=ack.model,
                     variant=choice.variant, provider=choice.provider, generation=ack.generation)
            return
        self._reject(client, ack, choice)

    def _reject(self, client: "_Client", ack: Ack, choice: Choice) -> None:
        """A node's nack: that node (all its connections) is moved to its next choice; nobody
        else is. The daemon is told (``on_rejection``) and decides about the file itself."""
        node = client.node_key
        key = (node, choice.sha256, choice.provider)
        if key not in self.rejections:
            view = self._views.get(ack.model)
            served = next((v for v in view.variants if v.sha256 == choice.sha256), None) \
                if view is not None else None
            rejection = Rejection(model=ack.model, variant=choice.variant, sha256=choice.sha256,
                                  provider=choice.provider, node=node,
                                  error=(ack.error or "rejected by the node")[:500],
                                  generation=ack.generation, at_unix_s=time.time(),
                                  revision=served.revision if served is not None else "")
            self.rejections.add([rejection])
            log.warning("variant_rejected", client=client.id, node=node, model=ack.model,
                        variant=choice.variant, sha256=choice.sha256, provider=choice.provider,
                        error=rejection.error, scope="this node")
            if self._on_rejection is not None:
                try:
                    self._on_rejection(model=ack.model, variant=choice.variant,
                                       sha256=choice.sha256, provider=choice.provider,
                                       node=node if client.node else "", error=rejection.error,
                                       revision=rejection.revision)
                except Exception as e:  # a faulty callback must not break the socket server
                    log.error("on_rejection_failed", error=repr(e))
            if ack.model in self._views:
                self._bump(ack.model)
        for other in list(self._clients):
            if other.node_key == node and ack.model in other.subscriptions:
                self._refresh(other, ack.model)

    def _drop_healed(self, models: set[str]) -> None:
        """A rejected file that was published again (a new copy: the daemon healed it) is
        offered again: the node may have been right about the old copy."""
        def healed(rejection: Rejection) -> bool:
            view = self._views.get(rejection.model)
            if rejection.model not in models or view is None or not rejection.revision:
                return False
            current = next((v for v in view.variants if v.sha256 == rejection.sha256), None)
            return bool(current is not None and current.revision
                        and current.revision != rejection.revision)

        for rejection in self.rejections.forget(healed, tell=False):
            log.info("rejection_dropped", model=rejection.model, node=rejection.node,
                     sha256=rejection.sha256[:12], why="the file was published again")

    def restore_rejections(self, rejections: Iterable[Rejection]) -> None:
        """Rejections recorded before a restart: those nodes are not offered those files again."""
        self.rejections.add(rejections)

    def forget_rejections(self) -> int:
        """An operator's retry (SIGHUP): every file is offered again; returns how many."""
        count = len(self.rejections.forget(tell=False))
        self._offer_again(set(self._views), every_client=True)
        return count

    def _offer_again(self, models: set[str], *, every_client: bool = False) -> None:
        """Rejections of ``models`` were forgotten: choose for their subscribers again."""
        for name in models:
            if name in self._views:
                self._bump(name)
        for client in list(self._clients):
            for model in client.subscriptions:
                if every_client or model in models:
                    self._refresh(client, model)

    # --- status ------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The ``status`` event: every model, its variants and proofs, subscribers, rejections."""
        by_model: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
        subscribers = []
        for client in sorted(self._clients, key=lambda c: c.id):
            if not client.subscriptions:
                continue
            models = {}
            for model in client.subscriptions:
                sent = client.sent_events.get(model, {})
                acked = client.acked.get(model)
                entry = {"event": sent.get("event"), "variant": sent.get("variant"),
                         "provider": sent.get("provider"), "generation": sent.get("generation"),
                         "acked_generation": acked[0] if acked else None}
                models[model] = entry
                by_model[model].append({"client": client.id, "node": client.node,
                                        "pid": client.pid, **entry})
            subscribers.append({"client": client.id, "node": client.node, "pid": client.pid,
                                "uid": client.uid, "gid": client.gid, "models": models})
        models_out = {}
        for name, view in sorted(self._views.items()):
            models_out[name] = {
                "state": view.state, "reason": view.reason,
                "generation": self._generations.get(name), "detail": dict(view.detail),
                "variants": [{"variant": v.variant, "path": v.path, "sha256": v.sha256,
                              "size": v.size, "proof": v.proof.to_dict() if v.proof else None,
                              "rejected_on": self.rejections.providers_of(v.sha256)}
                             for v in view.variants],
                "subscribers": by_model.get(name, [])}
        core = {"event": "status", "protocol": PROTOCOL_VERSION, "daemon": DAEMON_NAME,
                "version": __version__, "clients": len(self._clients),
                "models": models_out, "subscribers": subscribers,
                "rejected": [dataclasses.asdict(r) for r in self.rejections]}
        extra: dict[str, Any] = {}
        if self._status_extra is not None:
            try:
                extra = dict(self._status_extra())
            except Exception as e:  # status must answer even if the runner's part fails
                log.error("status_extra_failed", error=repr(e))
                extra = {"status_extra_error": repr(e)}
        return {**extra, **core}

    # --- connections -------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pid, uid, gid = _peer_credentials(writer.get_extra_info("socket"))
        if len(self._clients) >= self.max_clients:
            log.warning("client_refused", pid=pid, uid=uid, clients=len(self._clients),
                        max_clients=self.max_clients)
            await _refuse(writer, f"too many clients ({self.max_clients}); try again later")
            return
        client = _Client(next(self._ids), writer, pid, uid, gid, self.queue_limit,
                         self.write_timeout_s, self.output, self.max_client_output_bytes)
        client.task = asyncio.current_task()
        self._clients.add(client)
        log.debug("client_connected", client=client.id, pid=pid, uid=uid, gid=gid)
        client.send(hello_event(__version__, max_line_bytes=self.max_line_bytes,
                                pid=os.getpid()))
        writer_task = asyncio.create_task(client.write_loop())
        closing_error = None
        try:
            while closing_error is None:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError:
                    # EOF; a partial last line without its newline is dropped. The peer may
                    # only have half-closed (`echo '{"op":"status"}' | socat - UNIX:...`):
                    # it still gets the answers to the lines it sent before.
                    await client.flush(timeout_s=min(self.write_timeout_s, 2.0))
                    break
                except asyncio.LimitOverrunError:
                    closing_error = f"line longer than {self.max_line_bytes} bytes; closing"
                    break
                except (ConnectionError, OSError):
                    break
                sample = self._handle_line(client, line)
                if sample is not None:
                    closing_error = await self._receive_sample(client, sample, reader)
                    if closing_error is not None:
                        break
                if client.consecutive_errors >= MAX_CONSECUTIVE_ERRORS:
                    closing_error = f"{client.consecutive_errors} bad lines in a row; closing"
                elif (client.backlog >= self.queue_limit // 2
                      or client.queued_bytes >= self.max_client_output_bytes // 2
                      or (client.queued_bytes and self.output.total >= self.max_pending_output_bytes)):
                    # Pipelined requests: answer what is queued before reading more, so a
                    # burst of requests is slowed down rather than taken for a slow reader.
                    await client.flush(timeout_s=self.write_timeout_s)
            if closing_error is not None:
                log.warning("client_abusive", client=client.id, pid=pid, error=closing_error)
                client.send(error_event(closing_error))
                await client.flush(timeout_s=min(self.write_timeout_s, 2.0))
        finally:
            self._clients.discard(client)
            client.abort()
            writer_task.cancel()
            await asyncio.gather(writer_task, return_exceptions=True)
            log.debug("client_disconnected", client=client.id, node=client.node, pid=pid)


class _OutputBudget:
    """Bytes queued for every connection together (one per server)."""

    __slots__ = ("total",)

    def __init__(self) -> None:
        self.total = 0


class _Client:
    """One connection: its subscriptions, what it was last sent, and a bounded outgoing queue
    (bounded in events and in bytes)."""

    def __init__(self, client_id: int, writer: asyncio.StreamWriter, pid: int | None,
                 uid: int | None, gid: int | None, queue_limit: int,
                 write_timeout_s: float, budget: _OutputBudget | None = None,
                 max_output_bytes: int = MAX_CLIENT_OUTPUT_BYTES) -> None:
        self.id = client_id
        self.writer = writer
        self.pid, self.uid, self.gid = pid, uid, gid
        self.node = ""
        #: whom a nack speaks for: the node's name, or this one connection when it gave none
        self.node_key = f"connection {client_id}"
        self.task: asyncio.Task | None = None
        self.subscriptions: dict[str, tuple[tuple[str, ...], str]] = {}
        self.sent_keys: dict[str, tuple] = {}
        self.sent_events: dict[str, dict[str, Any]] = {}
        self.history: dict[str, collections.OrderedDict[int, Choice]] = {}
        self.acked: dict[str, tuple[int, Choice]] = {}
        self.consecutive_errors = 0
        self._queue: collections.deque[bytes] = collections.deque()
        self._queue_limit = queue_limit
        self._budget = budget or _OutputBudget()
        self._max_output_bytes = max_output_bytes
        self.queued_bytes = 0
        self._write_timeout_s = write_timeout_s
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        # Set when the queue was collapsed to a snapshot; cleared when a write drains. Falling
        # behind again before any drain means the client does not read at all: disconnect it.
        self._collapsed = False
        self._closed = False

    def send(self, event: Mapping[str, Any]) -> None:
        """Queue one event without ever blocking the caller (fan-out must not stall)."""
        if self._closed:
            return
        # Room for one state per followed model on top of the limit: a large subscribe answers
        # all its models in one go, before the writer gets to run.
        data = encode(event)
        if (len(self._queue) >= self._queue_limit + len(self.sent_events)
                or (self._queue and self.queued_bytes + len(data) > self._max_output_bytes)):
            if self._collapsed:
                log.warning("client_too_slow", client=self.id, node=self.node, pid=self.pid,
                            queued=len(self._queue), queued_bytes=self.queued_bytes)
                self.abort()
                return
            self._collapsed = True
            self._drop_queue()
            # The snapshot holds every current state; a state event is already part of it.
            for snapshot in self.sent_events.values():
                self._push(encode(snapshot))
            log.info("client_queue_collapsed", client=self.id, node=self.node,
                     snapshot=len(self._queue))
            if event.get("event") in ("variant", "unavailable", "removed"):
                self._kick()
                return
        self._push(data)
        self._kick()

    def _push(self, data: bytes) -> None:
        self._queue.append(data)
        self.queued_bytes += len(data)
        self._budget.total += len(data)

    def _pop(self) -> bytes:
        data = self._queue.popleft()
        self.queued_bytes -= len(data)
        self._budget.total -= len(data)
        return data

    def _drop_queue(self) -> None:
        self._budget.total -= self.queued_bytes
        self.queued_bytes = 0
        self._queue.clear()

    def _kick(self) -> None:
        self._idle.clear()
        self._wakeup.set()

    async def write_loop(self) -> None:
        try:
            while not self._closed:
                if not self._queue:
                    self._idle.set()
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                chunk = []
                while self._queue and len(chunk) < 64:
                    chunk.append(self._pop())
                self.writer.write(b"".join(chunk))
                await asyncio.wait_for(self.writer.drain(), self._write_timeout_s)
                self._collapsed = False
        except asyncio.TimeoutError:
            log.warning("client_write_timeout", client=self.id, node=self.node, pid=self.pid,
                        timeout_s=self._write_timeout_s)
            self.abort()
        except (ConnectionError, OSError):
            self.abort()
        finally:
            self._idle.set()

    @property
    def backlog(self) -> int:
        return len(self._queue)

    async def flush(self, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except asyncio.TimeoutError:
            pass

    def abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._drop_queue()
        self._wakeup.set()
        if self.writer.transport is not None:
            self.writer.transport.abort()


async def _refuse(writer: asyncio.StreamWriter, message: str) -> None:
    try:
        writer.write(encode(error_event(message)))
        await asyncio.wait_for(writer.drain(), 1.0)
    except (asyncio.TimeoutError, ConnectionError, OSError):
        pass
    finally:
        writer.close()


def _peer_credentials(sock: Any) -> tuple[int | None, int | None, int | None]:
    """(pid, uid, gid) of the connecting process (SO_PEERCRED), or Nones where unsupported."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", raw)
    except (OSError, AttributeError):
        return None, None, None


def _bind_socket(path: Path, mode: int, group: str | None, backlog: int
                 ) -> tuple[socket.socket, int]:
    """Bind a listening socket at ``path`` with ``mode``/``group`` set before anyone can see it.

    Bound under a temp name, chmod/chown-ed, then hard-linked to the final name: ``link`` fails
    if a socket appeared there meanwhile, so a live daemon's socket is never replaced.
    """
    if len(os.fsencode(str(path))) > MAX_SOCKET_PATH_BYTES:
        raise SocketPathError(f"socket path is longer than {MAX_SOCKET_PATH_BYTES} bytes: {path}",
                              hint="choose a shorter --socket path")
    gid = _group_id(group)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SocketPathError(f"cannot create the socket folder {path.parent}: {e.strerror}",
                              hint="create it or choose another --socket path") from e
    _remove_stale(path)
    temp = path.with_name(f"{TEMP_PREFIX}{uuid.uuid4().hex[:8]}.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(temp))
        os.chmod(temp, mode)
        if gid is not None:
            os.chown(temp, -1, gid)
        sock.listen(backlog)
        try:
            os.link(temp, path)
        except FileExistsError as e:
            raise SocketInUseError(f"{path} appeared while binding: another daemon is starting",
                                   hint="stop it first, or choose another --socket") from e
        inode = os.lstat(path).st_ino
    except OSError as e:
        sock.close()
        raise SocketPathError(f"cannot bind {path}: {e.strerror or e}",
                              hint="check the folder's permissions") from e
    except BaseException:
        sock.close()
        raise
    finally:
        _unlink_quietly(temp)
    sock.setblocking(False)
    return sock, inode


def _remove_stale(path: Path) -> None:
    """Remove a socket file left by a crash; refuse to touch a live one or a non-socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketPathError(f"{path} exists and is not a socket",
                              hint="remove it or choose another --socket path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        _unlink_quietly(path)
        log.info("stale_socket_removed", path=str(path))
        return
    except FileNotFoundError:
        return
    except socket.timeout:
        pass  # a full backlog: somebody is listening
    except OSError as e:
        raise SocketPathError(f"cannot probe the existing socket {path}: {e.strerror}",
                              hint="remove it or choose another --socket path") from e
    finally:
        probe.close()
    raise SocketInUseError(f"another process is listening on {path}",
                           hint="stop the other daemon first, or choose another --socket path")


def _group_id(group: str | None) -> int | None:
    if not group:
        return None
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError as e:
        raise SocketPathError(f"socket group {group!r} does not exist",
                              hint="create the group or change socket_group") from e


def _unlink_if_ours(path: Path, inode: int) -> None:
    try:
        if os.lstat(path).st_ino == inode:
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("socket_unlink_failed", path=str(path), error=e.strerror,
                    errno=errno.errorcode.get(e.errno or 0))


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
