"""The node-side client against a real server on a real socket: subscribe, ack, reconnect after
a daemon restart (blocking and asyncio), one-shot status/ping, and closing from another thread."""

from __future__ import annotations

import asyncio
import threading

import pytest

from modeld import client as modeld_client
from modeld.client import (AsyncSubscription, Backoff, DaemonUnavailableError, async_subscribe,
                           ping, status, subscribe)
from modeld.protocol import ProtocolError
from tests.support.serve import ServerThread, serving, view, yolo_files


@pytest.fixture
def sock_path(tmp_path):
    return tmp_path / "modeld.sock"


@pytest.fixture
def files(tmp_path):
    return yolo_files(tmp_path / "models", int8_speedup=1.3)


@pytest.fixture
def server(sock_path, files):
    with serving(sock_path, [view("yolo", files["fp32"], files["int8"])]) as st:
        yield st


def test_subscribe_yields_variant_and_acks(server, sock_path, files):
    with subscribe(["yolo"], socket_path=sock_path, node="det", prefer="fp32") as sub:
        event = next(sub)
        assert event["event"] == "variant" and event["variant"] == "fp32"
        assert event["sha256"] == files["fp32"].sha256
        assert sub.hello["protocol"] == 1
        assert sub.ack("yolo", event["generation"])
        doc = status(socket_path=sock_path)
        [node] = doc["subscribers"]
        assert node["node"] == "det"
        assert node["models"]["yolo"]["acked_generation"] == event["generation"]


def test_reconnects_and_resubscribes_after_a_daemon_restart(sock_path, files):
    st = ServerThread(sock_path).start()
    st.publish([view("yolo", files["fp32"])])
    sub = subscribe("yolo", socket_path=sock_path, backoff_max_s=0.2)
    try:
        first = sub.next_event(timeout_s=5)
        assert first["variant"] == "fp32"
        st.shutdown()
        assert sub.next_event(timeout_s=0.3) is None  # nobody there: keeps trying
        st = ServerThread(sock_path).start()
        st.publish([view("yolo", files["fp32"], files["int8"])])
        again = sub.next_event(timeout_s=10)
        assert again["variant"] == "int8" and again["generation"] > first["generation"]
        assert sub.connects == 2
    finally:
        sub.close()
        st.shutdown()


def test_waits_for_a_daemon_that_is_not_up_yet(sock_path, files):
    sub = subscribe("yolo", socket_path=sock_path, backoff_max_s=0.1)
    try:
        assert sub.next_event(timeout_s=0.2) is None
        st = ServerThread(sock_path).start()
        try:
            st.publish([view("yolo", files["fp32"])])
            assert sub.next_event(timeout_s=10)["variant"] == "fp32"
        finally:
            st.shutdown()
    finally:
        sub.close()


def test_without_reconnect_a_missing_daemon_is_an_error(sock_path):
    sub = subscribe("yolo", socket_path=sock_path, reconnect=False)
    with pytest.raises(DaemonUnavailableError, match="cannot connect"):
        sub.next_event(timeout_s=1)
    with pytest.raises(DaemonUnavailableError, match="no answer"):
        status(socket_path=sock_path, timeout_s=1)


def test_bad_options_fail_at_once():
    with pytest.raises(ProtocolError, match="prefer"):
        subscribe("yolo", prefer="int4")
    with pytest.raises(ProtocolError, match="at least one model"):
        async_subscribe([])


def test_close_from_another_thread_ends_the_iteration(server, sock_path):
    sub = subscribe("yolo", socket_path=sock_path)
    events = []
    reader = threading.Thread(target=lambda: events.extend(sub))
    reader.start()
    while not events:
        reader.join(0.01)
    sub.close()
    reader.join(5)
    assert not reader.is_alive() and events[0]["variant"] == "int8"


def test_socket_path_from_the_environment(server, sock_path, monkeypatch):
    monkeypatch.setenv("MODELD_SOCKET", str(sock_path))
    assert ping()
    with subscribe("yolo") as sub:
        assert sub.next_event(timeout_s=5)["event"] == "variant"


def test_async_subscription_follows_changes_and_restarts(sock_path, files):
    st = ServerThread(sock_path).start()
    st.publish([view("yolo", files["fp32"])])

    async def scenario():
        nonlocal st
        async with async_subscribe("yolo", socket_path=sock_path, node="async-node",
                                   backoff_max_s=0.2) as sub:
            assert isinstance(sub, AsyncSubscription)
            async for first in sub:
                break
            assert first["variant"] == "fp32"
            assert await sub.ack("yolo", first["generation"], ok=True)
            await asyncio.to_thread(st.publish, [view("yolo", files["fp32"], files["int8"])])
            second = await sub.next_event(timeout_s=5)
            assert second["variant"] == "int8" and second["generation"] > first["generation"]
            await asyncio.to_thread(st.shutdown)
            st = await asyncio.to_thread(lambda: ServerThread(sock_path).start())
            await asyncio.to_thread(st.publish, [view("yolo", files["fp32"])])
            third = await sub.next_event(timeout_s=10)
            assert third["variant"] == "fp32" and sub.connects == 2
            return third["generation"] > second["generation"]

    try:
        assert asyncio.run(scenario())
    finally:
        st.shutdown()


def test_backoff_grows_with_jitter_and_is_capped():
    backoff = Backoff(initial_s=0.1, max_s=1.0)
    delays = [backoff.next_delay_s() for _ in range(10)]
    assert 0.05 <= delays[0] <= 0.1
    assert all(0.5 <= d <= 1.0 for d in delays[5:])
    backoff.reset()
    assert backoff.next_delay_s() <= 0.1


def test_the_client_module_needs_no_onnxruntime():
    import subprocess
    import sys
    code = ("import sys, modeld.client; "
            "bad = [m for m in ('onnxruntime', 'onnx', 'numpy', 'structlog', 'huggingface_hub') "
            "if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
    assert modeld_client.HotSession.__module__ == "modeld.client"


def test_a_refusing_daemon_is_retried_with_backoff_not_in_a_loop(sock_path, files):
    from tests.support.serve import LineClient

    with serving(sock_path, [view("yolo", files["fp32"])], max_clients=1) as st:
        holder = LineClient(sock_path)
        holder.read()
        sub = subscribe("yolo", socket_path=sock_path, backoff_initial_s=0.05,
                        backoff_max_s=0.4)
        try:
            assert sub.next_event(timeout_s=1.5) is None
            # Accepted then closed at once, each time: without backoff this would be hundreds.
            assert 2 <= sub.connects <= 15
            assert "too many clients" in sub.last_error["error"]
            holder.close()
            assert sub.next_event(timeout_s=5)["variant"] == "fp32"
            assert st.call(lambda: st.server.subscriber_count) == 1
        finally:
            sub.close()
