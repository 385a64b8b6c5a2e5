"""The socket server over real Unix sockets: subscribe/ack, fan-out of changes, rollback on nack,
abusive clients, slow readers, many connections, socket file safety. Views point at real ONNX
files with real Proof objects; clients are raw sockets (and socat) speaking the documented lines.
"""

from __future__ import annotations

import grp
import os
import resource
import shutil
import socket
import stat
import subprocess
import threading
import time

import pytest
from structlog.testing import capture_logs

from modeld.server import SocketInUseError, SocketPathError
from modeld.testing.onnx_models import matmul_mlp, tiny_cnn
from tests.support.serve import COREML, CPU, LineClient, ServerThread, serving, view, write_variant

CUDA = "CUDAExecutionProvider"


def subscribe(models, providers=(CPU,), prefer="fastest", node="test-node"):
    return {"op": "subscribe", "models": list(models), "providers": list(providers),
            "prefer": prefer, "node": node}


def is_state(model):
    return lambda e: e.get("model") == model and e.get("event") in ("variant", "unavailable",
                                                                     "removed")


@pytest.fixture
def sock_path(tmp_path):
    return tmp_path / "run" / "modeld.sock"


@pytest.fixture
def files(tmp_path):
    """fp32 proven on CPU/CoreML/CUDA; int8 1.5x on CPU and CUDA, refused on CoreML."""
    folder = tmp_path / "models" / "yolo"
    fp32 = write_variant(folder, "fp32", tiny_cnn(seed=0), providers={CPU: {}, COREML: {}, CUDA: {}})
    int8 = write_variant(folder, "int8", tiny_cnn(seed=1), providers={
        CPU: {"speedup": 1.5}, CUDA: {"speedup": 1.2},
        COREML: {"usable": False, "passed": False,
                 "reason": "ConvInteger is not implemented for CoreMLExecutionProvider (simulated)"}})
    mlp = write_variant(tmp_path / "models" / "head", "fp32", matmul_mlp())
    return {"fp32": fp32, "int8": int8, "mlp": mlp}


@pytest.fixture
def rejections():
    return []


@pytest.fixture
def server(sock_path, files, rejections):
    st = ServerThread(sock_path, on_rejection=lambda **kw: rejections.append(kw),
                      status_extra=lambda: {"daemon_state": "ready", "event": "not-this"})
    st.start()
    st.publish([view("yolo", files["fp32"], files["int8"]), view("head", files["mlp"])])
    yield st
    st.shutdown()


def connect(sock_path, models=("yolo",), **kw):
    client = LineClient(sock_path)
    hello = client.read()
    assert hello["event"] == "hello"
    client.send(subscribe(models, **kw))
    return client


def test_hello_subscribe_variant_ack_round_trip(server, sock_path, files):
    started_ms = time.time_ns() // 1_000_000 - 60_000
    client = LineClient(sock_path)
    hello = client.read()
    assert hello["protocol"] == 1 and hello["daemon"] == "mecha10-modeld" and "version" in hello
    client.send(subscribe(["yolo", "head"]))
    events = {e["model"]: e for e in (client.read(), client.read())}
    yolo = events["yolo"]
    assert yolo["event"] == "variant" and yolo["variant"] == "int8"
    assert yolo["path"] == files["int8"].path and yolo["sha256"] == files["int8"].sha256
    assert yolo["provider"] == CPU and "1.50x" in yolo["reason"]
    assert yolo["generation"] > started_ms  # seeded from the wall clock
    assert events["head"]["variant"] == "fp32"
    client.send({"op": "ack", "model": "yolo", "generation": yolo["generation"], "ok": True})
    status = client.request({"op": "status"}, "status")
    [sub] = status["subscribers"]
    assert sub["node"] == "test-node" and sub["pid"] == os.getpid()
    assert sub["models"]["yolo"]["acked_generation"] == yolo["generation"]
    assert status["models"]["yolo"]["subscribers"][0]["variant"] == "int8"
    assert status["daemon_state"] == "ready" and status["event"] == "status"
    assert status["models"]["yolo"]["variants"][1]["proof"]["providers"][0]["speedup"] == 1.5


def test_publish_change_sends_higher_generation_only_on_change(server, sock_path, files):
    client = connect(sock_path)
    first = client.read()
    # Quantization disabled: the reconciler stops offering int8.
    server.publish([view("yolo", files["fp32"],
                         detail={"quantize": {"enabled": False,
                                                 "method": "dynamic_int8"}}),
                    view("head", files["mlp"])])
    second = client.read()
    assert second["variant"] == "fp32" and second["generation"] > first["generation"]
    # A view change that leaves this node's choice alone sends nothing.
    server.publish([view("yolo", files["fp32"], detail={"progress": 0.5}),
                    view("head", files["mlp"])])
    assert client.nothing_pending()
    status = client.request({"op": "status"}, "status")
    assert status["models"]["yolo"]["generation"] > second["generation"]
    assert status["models"]["yolo"]["detail"] == {"progress": 0.5}


def test_prefer_int8_on_a_provider_where_it_failed_gets_fp32_with_reason(server, sock_path):
    client = connect(sock_path, providers=[COREML], prefer="int8")
    event = client.read()
    assert event["variant"] == "fp32" and event["provider"] == COREML
    assert "ConvInteger is not implemented" in event["reason"]


def test_nack_rolls_back_only_that_node(server, sock_path, files, rejections):
    """A nack is evidence, not a verdict (issue 11): the node that sent it (every connection of
    it) moves on; other nodes keep the file; the daemon is told and judges it itself."""
    a, b = connect(sock_path, node="a"), connect(sock_path, node="b")
    a2 = connect(sock_path, node="a")
    cuda = connect(sock_path, providers=[CUDA], node="c")
    got_a, got_b, got_a2, got_c = a.read(), b.read(), a2.read(), cuda.read()
    assert got_a["variant"] == got_b["variant"] == got_a2["variant"] == got_c["variant"] == "int8"
    a.send({"op": "ack", "model": "yolo", "generation": got_a["generation"], "ok": False,
            "error": "Load failed: kernel not found"})
    back_a, back_a2 = a.read(), a2.read()
    for back in (back_a, back_a2):
        assert back["variant"] == "fp32" and back["generation"] > got_a["generation"]
    assert b.nothing_pending() and cuda.nothing_pending()
    assert rejections == [{"model": "yolo", "variant": "int8", "sha256": files["int8"].sha256,
                           "provider": CPU, "node": "a", "revision": "",
                           "error": "Load failed: kernel not found"}]
    status = a.request({"op": "status"}, "status")
    [rejected] = status["rejected"]
    assert (rejected["sha256"], rejected["provider"], rejected["node"]) == (
        files["int8"].sha256, CPU, "a")
    assert status["models"]["yolo"]["variants"][1]["rejected_on"] == [CPU]
    # The same node arriving later is not offered the file again; another node is.
    late = connect(sock_path, prefer="int8", node="a")
    event = late.read()
    assert event["variant"] == "fp32" and "rejected by this node" in event["reason"]
    assert connect(sock_path, prefer="int8", node="d").read()["variant"] == "int8"
    # Nacking the last proven file leaves the model unavailable for that node only.
    a.send({"op": "ack", "model": "yolo", "generation": back_a["generation"], "ok": False,
            "error": "out of memory"})
    gone = a.read()
    assert gone["event"] == "unavailable" and "fp32 rejected by this node" in gone["reason"]
    fresh = connect(sock_path, node="e")
    assert fresh.read()["variant"] == "int8" and b.nothing_pending()


def test_socat_speaks_the_protocol(server, sock_path, files):
    socat = shutil.which("socat")
    if socat is None:
        pytest.skip("socat is not installed")
    proc = subprocess.Popen([socat, "-", f"UNIX-CONNECT:{sock_path}"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    try:
        proc.stdin.write(b'{"op": "subscribe", "models": ["yolo"]}\n')
        proc.stdin.flush()
        hello = proc.stdout.readline()
        variant = proc.stdout.readline()
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)
    assert b'"event":"hello"' in hello
    assert b'"event":"variant"' in variant and files["int8"].sha256.encode() in variant


def test_unknown_model_then_removed(server, sock_path, files):
    hostile = ("../../../etc/passwd", files["fp32"].path, "yolo/../head")
    client = connect(sock_path, models=("nope", "yolo", *hostile))
    events = {e["model"]: e for e in (client.read() for _ in range(5))}
    assert events["nope"] == {"event": "unavailable", "model": "nope",
                              "reason": "not in the catalog", "generation": 0}
    # Names are only looked up among the views: a path is just another unknown name.
    assert all(events[name]["reason"] == "not in the catalog" for name in hostile)
    server.publish([view("head", files["mlp"])])
    assert client.read() == {"event": "removed", "model": "yolo"}
    assert client.nothing_pending()  # nothing for "nope" and the others: they never existed
    server.publish([view("yolo", files["fp32"]), view("head", files["mlp"])])
    assert client.read()["variant"] == "fp32"


def test_pending_model_is_unavailable_until_proven(server, sock_path, files):
    server.publish([view("yolo", state="pending", reason="downloading 40%")])
    client = connect(sock_path)
    event = client.read()
    assert event["event"] == "unavailable" and "downloading 40%" in event["reason"]
    server.publish([view("yolo", files["fp32"])])
    assert client.read()["variant"] == "fp32"


def test_subscribe_before_first_publish(sock_path, files):
    st = ServerThread(sock_path).start()
    try:
        client = connect(sock_path)
        assert "not loaded yet" in client.read()["reason"]
        st.publish([view("yolo", files["fp32"])])
        assert client.read()["variant"] == "fp32"
    finally:
        st.shutdown()


def test_garbage_and_partial_lines_keep_the_connection_usable(server, sock_path):
    client = LineClient(sock_path)
    client.read()
    for garbage, message in [(b"hello\n", "not JSON"), (b"\xff\xfe\xfd\n", "not UTF-8"),
                             (b"[1]\n", "JSON object"), (b'{"op": "explode"}\n', "unknown op"),
                             (b'{"op": "subscribe", "models": "yolo", "prefer": "int4"}\n',
                              "prefer"),
                             (b'{"op": "ack", "model": "yolo", "generation": 1}\n',
                              "generation 1")]:
        client.send(garbage)
        event = client.read()
        assert event["event"] == "error" and message in event["error"], event
    client.send(b"\n\r\n")  # empty lines are ignored
    client.send(b'{"op":')
    time.sleep(0.05)  # the rest arrives in a second segment
    client.send(b' "ping"}\r\n')
    assert client.read() == {"event": "pong"}


def test_error_flood_closes_with_an_error_first(server, sock_path):
    client = LineClient(sock_path)
    client.read()
    client.send(b"x\n" * 40)
    errors = []
    while (event := client.read()) is not None:
        errors.append(event)
    assert errors[-1]["event"] == "error" and "closing" in errors[-1]["error"]
    assert 1 < len(errors) <= 20
    assert LineClient(sock_path).read()["event"] == "hello"  # the server is fine


def test_ten_megabyte_line_is_cut_off(server, sock_path):
    client = LineClient(sock_path)
    client.read()
    bystander = connect(sock_path)
    bystander.read()

    def flood():
        try:
            client.sock.sendall(b"a" * (10 * 1024 * 1024))
        except OSError:
            pass  # the daemon hung up mid-line, as it should

    sender = threading.Thread(target=flood)
    sender.start()
    event = client.read(timeout_s=10)
    assert event["event"] == "error" and "longer than 65536" in event["error"]
    assert client.read(timeout_s=10) is None
    sender.join(10)
    assert bystander.request({"op": "ping"}, "pong")


def test_thousand_connections(server, sock_path, files):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2500:
        if hard != resource.RLIM_INFINITY and hard < 2500:
            pytest.skip(f"fd limit {hard} too low for 1000 connections")
        resource.setrlimit(resource.RLIMIT_NOFILE, (2500, hard))
    clients = []
    try:
        for i in range(1000):
            clients.append(connect(sock_path, node=f"n{i}"))
        assert all(c.read()["variant"] == "int8" for c in clients)
        assert server.call(lambda: server.server.subscriber_count) == 1000
        server.publish([view("yolo", files["fp32"]), view("head", files["mlp"])])
        assert all(c.read()["variant"] == "fp32" for c in clients)
    finally:
        for c in clients:
            c.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_client_limit_refuses_with_an_error(sock_path, files):
    st = ServerThread(sock_path, max_clients=3).start()
    try:
        held = [LineClient(sock_path) for _ in range(3)]
        assert all(c.read()["event"] == "hello" for c in held)
        refused = LineClient(sock_path)
        event = refused.read()
        assert event["event"] == "error" and "too many clients" in event["error"]
        assert refused.read() is None
        held[0].close()
        time.sleep(0.1)  # let the server notice the hang-up
        assert LineClient(sock_path).read()["event"] == "hello"
    finally:
        st.shutdown()


def test_a_client_that_never_reads_does_not_stall_the_others(sock_path, files):
    st = ServerThread(sock_path, queue_limit=8, write_timeout_s=2.0).start()
    # Long reasons make each event ~4 KiB, so 300 of them overflow the socket buffers.
    views = [[view("yolo", state="pending", reason=f"step {i} " + "x" * 4000)]
             for i in range(300)]
    st.publish(views[0])
    try:
        stalled = connect(sock_path)
        readers = [connect(sock_path, node=f"r{i}") for i in range(3)]
        last_seen = [None] * 3

        def follow(i):
            while True:
                event = readers[i].read(timeout_s=20)
                last_seen[i] = event
                if event is None or event["reason"].startswith("step 299 "):
                    return

        threads = [threading.Thread(target=follow, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        with capture_logs() as logs:
            for v in views[1:]:
                st.publish(v)
            for t in threads:
                t.join(30)
        assert all(e is not None and e["reason"].startswith("step 299 ") for e in last_seen)
        assert any(r["event"] in ("client_queue_collapsed", "client_too_slow",
                                  "client_write_timeout") for r in logs)
        # The stalled client, reading at last, reaches the latest state or was disconnected.
        while (event := stalled.read(timeout_s=10)) is not None:
            if event["reason"].startswith("step 299 "):
                break
        if event is None:
            assert any(r["event"] in ("client_too_slow", "client_write_timeout") for r in logs)
        assert LineClient(sock_path).request({"op": "ping"}, "pong")
    finally:
        st.shutdown()


def test_socket_mode_group_and_close_unlinks(sock_path, files):
    group = next((g for g in ("daemon", "nogroup", "users") if _group_exists(g)), None)
    st = ServerThread(sock_path, socket_group=group).start()
    try:
        st_ = os.stat(sock_path)
        assert stat.S_ISSOCK(st_.st_mode) and stat.S_IMODE(st_.st_mode) == 0o660
        if group is not None:
            assert st_.st_gid == grp.getgrnam(group).gr_gid
        assert [p.name for p in sock_path.parent.iterdir()] == ["modeld.sock"]  # no temp left
    finally:
        st.shutdown()
    assert not sock_path.exists()


def test_stale_socket_is_replaced(sock_path, files):
    sock_path.parent.mkdir(parents=True)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(sock_path))
    dead.close()  # a crashed daemon: the file stays, nobody listens
    with capture_logs() as logs:
        st = ServerThread(sock_path).start()
    try:
        assert any(r["event"] == "stale_socket_removed" for r in logs)
        assert LineClient(sock_path).read()["event"] == "hello"
    finally:
        st.shutdown()


def test_live_socket_is_not_stolen(server, sock_path):
    inode = os.stat(sock_path).st_ino
    second = ServerThread(sock_path)
    try:
        with pytest.raises(SocketInUseError, match="another process is listening"):
            second.start()
    finally:
        second.shutdown()
    assert os.stat(sock_path).st_ino == inode
    assert LineClient(sock_path).request({"op": "ping"}, "pong")


def test_a_regular_file_at_the_socket_path_is_left_alone(sock_path):
    sock_path.parent.mkdir(parents=True)
    sock_path.write_text("not a socket")
    st = ServerThread(sock_path)
    try:
        with pytest.raises(SocketPathError, match="not a socket"):
            st.start()
    finally:
        st.shutdown()
    assert sock_path.read_text() == "not a socket"


def test_adopted_socket_is_left_in_place(sock_path, files):
    sock_path.parent.mkdir(parents=True)
    inherited = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    inherited.bind(str(sock_path))
    os.chmod(sock_path, 0o666)
    inherited.listen(16)
    st = ServerThread(sock_path).start(sock=inherited)
    try:
        st.publish([view("yolo", files["fp32"])])
        client = connect(sock_path)
        assert client.read()["variant"] == "fp32"
    finally:
        st.shutdown()
    assert sock_path.exists() and stat.S_IMODE(os.stat(sock_path).st_mode) == 0o666


def test_generations_keep_increasing_across_restarts(sock_path, files):
    seen = []
    for _ in range(2):
        st = ServerThread(sock_path).start()
        try:
            st.publish([view("yolo", files["fp32"])])
            seen.append(connect(sock_path).read()["generation"])
        finally:
            st.shutdown()
    assert seen[1] > seen[0]


def test_connect_logs_peer_credentials(server, sock_path):
    with capture_logs() as logs:
        LineClient(sock_path).read()
    [connected] = [r for r in logs if r["event"] == "client_connected"]
    assert (connected["pid"], connected["uid"], connected["gid"]) == (
        os.getpid(), os.getuid(), os.getgid())


def test_faulty_callbacks_do_not_break_the_server(sock_path, files):
    def boom(**kw):
        raise RuntimeError("runner bug")

    st = ServerThread(sock_path, on_rejection=boom, status_extra=lambda: 1 / 0).start()
    try:
        st.publish([view("yolo", files["fp32"], files["int8"])])
        client = connect(sock_path)
        event = client.read()
        client.send({"op": "ack", "model": "yolo", "generation": event["generation"],
                     "ok": False, "error": "bad"})
        assert client.read()["variant"] == "fp32"
        status = client.request({"op": "status"}, "status")
        assert "ZeroDivisionError" in status["status_extra_error"]
        assert len(status["rejected"]) == 1
    finally:
        st.shutdown()


def test_socket_path_too_long(tmp_path):
    st = ServerThread(tmp_path / ("x" * 120) / "modeld.sock")
    try:
        with pytest.raises(SocketPathError, match="longer than"):
            st.start()
    finally:
        st.shutdown()


def _group_exists(name):
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def test_subscriptions_per_connection_are_bounded(server, sock_path):
    client = LineClient(sock_path)
    client.read()
    for batch in range(4):
        client.send(subscribe([f"m{batch}-{i}" for i in range(256)]))
        for _ in range(256):
            assert client.read()["reason"] == "not in the catalog"
    client.send(subscribe(["one-too-many"]))
    event = client.read()
    assert event["event"] == "error" and "at most 1024 models" in event["error"]
    client.send(subscribe(["m0-0"]))  # names it already follows are fine
    assert client.read()["model"] == "m0-0"


def test_a_late_nack_still_names_the_file_it_was_sent(server, sock_path, files):
    client = connect(sock_path)
    old = client.read()
    assert old["variant"] == "int8"
    server.publish([view("yolo", files["fp32"]), view("head", files["mlp"])])
    assert client.read()["variant"] == "fp32"
    server.publish([view("yolo", files["fp32"], files["int8"]), view("head", files["mlp"])])
    assert client.read()["variant"] == "int8"
    client.send({"op": "ack", "model": "yolo", "generation": old["generation"], "ok": False,
                 "error": "late verdict on the first int8"})
    moved = client.read()
    assert moved["variant"] == "fp32"
    [rejected] = client.request({"op": "status"}, "status")["rejected"]
    assert rejected["sha256"] == files["int8"].sha256
    assert rejected["generation"] == old["generation"]


def test_every_client_ends_on_the_latest_choice_after_random_changes(server, sock_path, files,
                                                                      tmp_path):
    """Random publishes and nacks; whatever happened, each node's last event is what
    ``choose`` says now for its providers and preference (read back from ``status``)."""
    import random

    from modeld.serving import choose

    rng = random.Random(7)
    fp16 = write_variant(tmp_path / "models" / "yolo", "fp16", tiny_cnn(seed=2),
                         providers={CPU: {"speedup": 1.1}, COREML: {"speedup": 1.4}})
    options = [dict(providers=[CPU], prefer="fastest"), dict(providers=[COREML, CPU], prefer="int8"),
               dict(providers=[CUDA, COREML], prefer="fp16"), dict(providers=[CPU], prefer="fp32")]
    clients = [(connect(sock_path, node=f"n{i}", **o), o) for i, o in enumerate(options * 2)]
    last = {id(c): c.read() for c, _ in clients}
    pool = [files["fp32"], files["int8"], fp16]
    current = None
    for step in range(60):
        if step % 7 == 6:
            c, _ = rng.choice(clients)
            event = last[id(c)]
            if event["event"] == "variant":
                c.send({"op": "ack", "model": "yolo", "generation": event["generation"],
                        "ok": False, "error": f"random nack {step}"})
        else:
            variants = [v for v in pool if rng.random() < 0.7]
            current = view("yolo", *variants, reason=f"step {step}")
            server.publish([current, view("head", files["mlp"])])
        for c, _ in clients:  # drain what arrived, keeping the last state event
            c.send({"op": "ping"})
            while (event := c.read())["event"] != "pong":
                if event["event"] in ("variant", "unavailable"):
                    last[id(c)] = event
    status = clients[0][0].request({"op": "status"}, "status")
    for i, (c, o) in enumerate(clients):
        # rejections are per node: each client's own
        rejected = frozenset((r["sha256"], r["provider"]) for r in status["rejected"]
                             if r["node"] == f"n{i}")
        want = choose(current, o["providers"], o["prefer"], rejected)
        got = last[id(c)]
        if hasattr(want, "variant"):
            assert (got["event"], got["sha256"], got["provider"]) == (
                "variant", want.sha256, want.provider), (o, got, want)
        else:
            assert got["event"] == "unavailable" and got["reason"] == want.reason


def test_one_large_subscribe_is_answered_in_full_with_a_small_queue(sock_path, files):
    with serving(sock_path, [view("yolo", files["fp32"])], queue_limit=4):
        client = LineClient(sock_path)
        client.read()
        client.send(subscribe(["yolo"] + [f"m{i}" for i in range(200)]))
        models = {client.read()["model"] for _ in range(201)}
        assert len(models) == 201
        assert client.request({"op": "ping"}, "pong")


def test_a_burst_of_pipelined_requests_is_answered_in_full(server, sock_path):
    client = LineClient(sock_path)
    client.read()
    client.send(b'{"op": "ping"}\n' * 2000)
    assert all(client.read() == {"event": "pong"} for _ in range(2000))
    assert client.request({"op": "status"}, "status")["clients"] == 1
