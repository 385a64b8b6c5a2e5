"""HotSession with real onnxruntime sessions on real ONNX files, fed by a real server: swaps under
a tight inference loop lose no call; a file whose sha256 differs from the event, or that does not
load, is nacked and the old session keeps serving."""

from __future__ import annotations

import threading
import time

import numpy as np
import onnxruntime as ort
import pytest

from modeld.client import HotSession, ModelNotReadyError, status, subscribe
from modeld.serving import VariantView
from modeld.testing.onnx_models import matmul_mlp, tiny_cnn, with_unknown_operator
from tests.support.serve import CPU, ServerThread, proof, serving, view, write_variant, yolo_files

IMAGES = np.random.default_rng(0).normal(size=(1, 3, 32, 32)).astype(np.float32)


@pytest.fixture
def sock_path(tmp_path):
    return tmp_path / "modeld.sock"


@pytest.fixture
def files(tmp_path):
    return yolo_files(tmp_path / "models", int8_speedup=1.5)


@pytest.fixture
def server(sock_path, files):
    with serving(sock_path, [view("yolo", files["fp32"])]) as st:
        yield st


def wait_for(predicate, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


def reference_output(path):
    return ort.InferenceSession(path, providers=[CPU]).run(None, {"images": IMAGES})[0]


def test_swaps_under_a_tight_inference_loop_lose_no_call(server, sock_path, files):
    swaps = []
    with HotSession(models="yolo", socket_path=sock_path, node="loop",
                    on_swap=swaps.append) as hot:
        assert hot.wait_ready(10)
        calls, failures, stop = [0], [], threading.Event()

        def infer():
            while not stop.is_set():
                try:
                    out = hot.run(None, {"images": IMAGES})
                    assert out[0].shape == (1, 4, 16, 16)
                    calls[0] += 1
                except Exception as e:  # counted: the test asserts there are none
                    failures.append(repr(e))

        loop = threading.Thread(target=infer)
        loop.start()
        try:
            for i in range(20):
                want = files["int8"] if i % 2 == 0 else files["fp32"]
                server.publish([view("yolo", files["fp32"], files["int8"]) if want is files["int8"]
                                else view("yolo", files["fp32"])])
                calls_before = calls[0]
                wait_for(lambda: hot.current.sha256 == want.sha256)
                wait_for(lambda: calls[0] > calls_before + 2)  # inference goes on after the swap
        finally:
            stop.set()
            loop.join(10)
        assert failures == []
        # on_swap is told after the swap, on the client's thread: the last one may be on its way
        wait_for(lambda: len(swaps) >= 21)
        assert calls[0] > 40 and hot.swaps == 21 and len(swaps) == 21
        assert [s.variant for s in swaps[:3]] == ["fp32", "int8", "fp32"]
        # The session serving now is the file the daemon named last.
        assert hot.current.variant == "fp32"
        np.testing.assert_allclose(hot.run(None, {"images": IMAGES})[0],
                                   reference_output(files["fp32"].path), rtol=1e-5)
        doc = status(socket_path=sock_path)
        assert doc["subscribers"][0]["models"]["yolo"]["acked_generation"] == \
            hot.current.generation


def test_a_file_whose_sha256_differs_is_nacked_and_the_old_session_kept(server, sock_path,
                                                                        files, tmp_path):
    with HotSession(models="yolo", socket_path=sock_path) as hot:
        assert hot.wait_ready(10) and hot.current.variant == "fp32"
        # The daemon announces an int8 file, but what lies on disk is something else.
        liar = VariantView(variant="int8", path=files["int8"].path, sha256="0" * 64,
                           size=files["int8"].size, proof=proof("int8", "0" * 64,
                                                                providers={CPU: {"speedup": 2.0}}))
        server.publish([view("yolo", files["fp32"], liar)])
        wait_for(lambda: status(socket_path=sock_path)["rejected"])
        [rejected] = status(socket_path=sock_path)["rejected"]
        assert rejected["sha256"] == "0" * 64 and "sha256" in rejected["error"]
        # Rolled back to fp32, which it already runs: acked without a reload.
        wait_for(lambda: status(socket_path=sock_path)["subscribers"][0]["models"]["yolo"]
                 ["acked_generation"] == hot.current.generation)
        assert hot.current.variant == "fp32" and hot.swaps == 1
        assert "sha256" in hot.last_error
        np.testing.assert_allclose(hot.run(None, {"images": IMAGES})[0],
                                   reference_output(files["fp32"].path), rtol=1e-5)


def test_a_file_that_does_not_load_is_nacked(server, sock_path, files, tmp_path):
    broken = write_variant(tmp_path / "models" / "yolo", "fp16", with_unknown_operator(),
                           providers={CPU: {"speedup": 3.0}})
    with HotSession(models="yolo", socket_path=sock_path, prefer="fp16") as hot:
        assert hot.wait_ready(10)
        server.publish([view("yolo", files["fp32"], broken)])
        wait_for(lambda: status(socket_path=sock_path)["rejected"])
        [rejected] = status(socket_path=sock_path)["rejected"]
        assert rejected["variant"] == "fp16" and "onnxruntime cannot load" in rejected["error"]
        assert hot.current.variant == "fp32" and hot.swaps == 1
        assert hot.run(None, {"images": IMAGES})[0].shape == (1, 4, 16, 16)


def test_run_before_any_variant_is_a_typed_error(sock_path, tmp_path):
    st = ServerThread(sock_path).start()
    st.publish([view("yolo", state="pending", reason="downloading")])
    try:
        with HotSession(models="yolo", socket_path=sock_path) as hot:
            wait_for(lambda: hot.last_event is not None)
            assert hot.last_event["event"] == "unavailable"
            with pytest.raises(ModelNotReadyError, match="no variant of yolo"):
                hot.run(None, {"images": IMAGES})
            st.publish([view("yolo", write_variant(tmp_path / "m", "fp32", tiny_cnn()))])
            assert hot.wait_ready(10)
            assert hot.run(None, {"images": IMAGES})[0].shape == (1, 4, 16, 16)
    finally:
        st.shutdown()


def test_follows_one_model_of_a_shared_subscription(server, sock_path, files, tmp_path):
    mlp = write_variant(tmp_path / "models" / "head", "fp32", matmul_mlp())
    server.publish([view("yolo", files["fp32"]), view("head", mlp)])
    sub = subscribe(["yolo", "head"], socket_path=sock_path)
    hot = HotSession(sub, "head")
    try:
        assert hot.wait_ready(10) and hot.current.model == "head"
        x = np.ones((3, 64), np.float32)
        assert hot.run(["logits"], {"input": x})[0].shape == (3, 16)
    finally:
        sub.close()
        hot.close()


def test_example_node_prints_one_line_per_swap(server, sock_path, files):
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).parents[2] / "examples" / "node.py"
    node = subprocess.Popen([sys.executable, str(example), "yolo", "--socket", str(sock_path),
                             "--seconds", "30"], stdout=subprocess.PIPE, text=True)
    try:
        lines = []

        def read_until_swaps(count):
            while sum(" swap " in line for line in lines) < count:
                lines.append(node.stdout.readline())
                assert lines[-1], f"the node exited early: {lines}"

        read_until_swaps(1)
        server.publish([view("yolo", files["fp32"], files["int8"])])
        read_until_swaps(2)
    finally:
        node.terminate()
        rest, _ = node.communicate(timeout=10)
    swaps = [line for line in lines if " swap " in line]
    assert "variant=fp32" in swaps[0] and "variant=int8" in swaps[1]
    assert "failures=0" in rest.splitlines()[-1]


def test_a_daemon_restart_with_the_same_file_reloads_nothing(sock_path, files):
    def broken_callback(loaded):
        raise RuntimeError("node bug in on_swap")

    with serving(sock_path, [view("yolo", files["fp32"])]):
        hot = HotSession(models="yolo", socket_path=sock_path, on_swap=broken_callback)
        assert hot.wait_ready(10)
        generation = hot.current.generation
    try:
        with serving(sock_path, [view("yolo", files["fp32"])]):
            wait_for(lambda: hot.current.generation > generation)
            assert hot.swaps == 1 and hot.current.sha256 == files["fp32"].sha256
            assert hot.run(None, {"images": IMAGES})[0].shape == (1, 4, 16, 16)
            wait_for(lambda: status(socket_path=sock_path)["subscribers"][0]["models"]["yolo"]
                     ["acked_generation"] == hot.current.generation)
    finally:
        hot.close()


def test_a_swapped_out_session_is_released(server, sock_path, files):
    import gc
    import weakref

    with HotSession(models="yolo", socket_path=sock_path) as hot:
        assert hot.wait_ready(10)
        old = weakref.ref(hot.session)
        hot.run(None, {"images": IMAGES})
        server.publish([view("yolo", files["fp32"], files["int8"])])
        wait_for(lambda: hot.current.variant == "int8")
        gc.collect()
        assert old() is None  # no reference kept: swaps do not pile up sessions in memory
        assert hot.run(None, {"images": IMAGES})[0].shape == (1, 4, 16, 16)
