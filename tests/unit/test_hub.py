"""The loopback Hub server, seen from a raw ``http.client`` and from huggingface_hub itself."""

from __future__ import annotations

import hashlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from huggingface_hub import errors as hf_errors
from huggingface_hub import get_hf_file_metadata, hf_hub_url

from modeld.testing.hub import HubStore, HubStoreError, LocalHub, _parse_range

REPO = "acme/files"
BODY = bytes(range(256)) * 40          # 10240 bytes, every offset distinguishable
SHA = hashlib.sha256(BODY).hexdigest()


def request(hub: LocalHub, method: str, path: str, *, headers: dict | None = None,
            timeout: float = 5.0) -> tuple[http.client.HTTPResponse, bytes, http.client.HTTPConnection]:
    conn = http.client.HTTPConnection("127.0.0.1", hub.port, timeout=timeout)
    conn.request(method, path, headers=headers or {})
    response = conn.getresponse()
    body = response.read() if method == "GET" else b""
    return response, body, conn


@pytest.fixture
def served(hub):
    commit = hub.store.commit(REPO, {"dir/blob.bin": BODY, "README.md": b"hello\n"})
    return hub, commit


def test_head_sends_commit_etag_and_linked_headers(served):
    hub, commit = served
    response, _, conn = request(hub, "HEAD", f"/{REPO}/resolve/main/dir/blob.bin")
    conn.close()
    assert response.status == 200
    assert response.getheader("X-Repo-Commit") == commit
    assert len(commit) == 40 and int(commit, 16) >= 0
    assert response.getheader("ETag") == f'"{SHA}"'
    assert response.getheader("X-Linked-Etag") == f'"{SHA}"'
    assert response.getheader("X-Linked-Size") == str(len(BODY))
    assert response.getheader("Content-Length") == str(len(BODY))
    assert response.getheader("Accept-Ranges") == "bytes"


def test_get_serves_the_content_at_every_kind_of_revision(served):
    hub, commit = served
    hub.store.tag(REPO, "v1", commit)
    hub.store.set_branch(REPO, "refs/pr/1", commit)
    for revision in ("main", "v1", commit, "refs%2Fpr%2F1"):
        response, body, conn = request(hub, "GET", f"/{REPO}/resolve/{revision}/dir/blob.bin")
        conn.close()
        assert (response.status, body) == (200, BODY), revision
        assert response.getheader("X-Repo-Commit") == commit


def test_repo_ids_with_one_segment_or_named_resolve(hub):
    hub.store.commit("acme/resolve", {"f.bin": b"two segments"})
    hub.store.commit("gpt2", {"f.bin": b"one segment"})
    for path, expected in [("/acme/resolve/resolve/main/f.bin", b"two segments"),
                           ("/gpt2/resolve/main/f.bin", b"one segment")]:
        response, body, conn = request(hub, "GET", path)
        conn.close()
        assert (response.status, body) == (200, expected)


def test_commits_are_snapshots_and_keep_untouched_files(served):
    hub, first = served
    second = hub.store.commit(REPO, {"README.md": b"changed\n"})
    third = hub.store.commit(REPO, {"dir/blob.bin": None})
    assert len({first, second, third}) == 3
    assert hub.store.files(REPO, second)["dir/blob.bin"] == SHA      # kept from the parent
    assert "dir/blob.bin" not in hub.store.files(REPO, third)       # deleted in this commit
    _, old_readme, conn = request(hub, "GET", f"/{REPO}/resolve/{first}/README.md")
    conn.close()
    _, new_readme, conn = request(hub, "GET", f"/{REPO}/resolve/main/README.md")
    conn.close()
    assert (old_readme, new_readme) == (b"hello\n", b"changed\n")
    response, _, conn = request(hub, "HEAD", f"/{REPO}/resolve/main/dir/blob.bin")
    conn.close()
    assert response.status == 404 and response.getheader("X-Error-Code") == "EntryNotFound"


def test_commit_streams_from_a_path(hub, tmp_path):
    source = tmp_path / "big.bin"
    source.write_bytes(BODY * 3)
    commit = hub.store.commit("acme/big", {"big.bin": source})
    info = hub.store.blob("acme/big", commit, "big.bin")
    assert info.size == len(BODY) * 3
    assert info.sha256 == hashlib.sha256(BODY * 3).hexdigest()


@pytest.mark.parametrize("header,status,content_range,expected", [
    ("bytes=10-19", 206, f"bytes 10-19/{len(BODY)}", BODY[10:20]),
    ("bytes=10000-", 206, f"bytes 10000-{len(BODY) - 1}/{len(BODY)}", BODY[10000:]),
    ("bytes=-5", 206, f"bytes {len(BODY) - 5}-{len(BODY) - 1}/{len(BODY)}", BODY[-5:]),
    ("bytes=10000-99999", 206, f"bytes 10000-{len(BODY) - 1}/{len(BODY)}", BODY[10000:]),
    (f"bytes={len(BODY)}-", 416, f"bytes */{len(BODY)}", b""),
    ("bytes=20-10", 416, f"bytes */{len(BODY)}", b""),
])
def test_range_requests(served, header, status, content_range, expected):
    hub, _ = served
    response, body, conn = request(hub, "GET", f"/{REPO}/resolve/main/dir/blob.bin",
                                   headers={"Range": header})
    conn.close()
    assert response.status == status
    assert response.getheader("Content-Range") == content_range
    assert body == expected
    assert hub.log.records("GET")[-1].range == header


@pytest.mark.parametrize("path,code", [
    ("/acme/nothing/resolve/main/x", "RepoNotFound"),
    (f"/{REPO}/resolve/no-such-branch/dir/blob.bin", "RevisionNotFound"),
    (f"/{REPO}/resolve/{'0' * 40}/dir/blob.bin", "RevisionNotFound"),
    (f"/{REPO}/resolve/main/dir/missing.bin", "EntryNotFound"),
])
def test_not_found_carries_the_hub_error_code(served, path, code):
    hub, _ = served
    for method in ("HEAD", "GET"):
        response, _, conn = request(hub, method, path)
        conn.close()
        assert response.status == 404
        assert response.getheader("X-Error-Code") == code
    assert [r.status for r in hub.log.records()] == [404, 404]


def test_huggingface_hub_raises_its_typed_errors(served):
    hub, _ = served
    cases = [("acme/nothing", "main", "x", hf_errors.RepositoryNotFoundError),
             (REPO, "nope", "dir/blob.bin", hf_errors.RevisionNotFoundError),
             (REPO, "main", "dir/missing.bin", hf_errors.RemoteEntryNotFoundError)]
    for repo, revision, filename, error in cases:
        url = hf_hub_url(repo, filename, revision=revision, endpoint=hub.endpoint)
        with pytest.raises(error):
            get_hf_file_metadata(url, endpoint=hub.endpoint, token=False)
    meta = get_hf_file_metadata(hf_hub_url(REPO, "dir/blob.bin", endpoint=hub.endpoint),
                                endpoint=hub.endpoint, token=False)
    assert (meta.etag, meta.size) == (SHA, len(BODY))


def test_private_repo_needs_the_right_bearer_token(served):
    hub, _ = served
    hub.store.create_repo(REPO, private=True, tokens=["hf_good"])
    path = f"/{REPO}/resolve/main/dir/blob.bin"
    response, _, conn = request(hub, "HEAD", path)
    conn.close()
    assert response.status == 401 and response.getheader("X-Error-Code") == "RepoNotFound"
    response, _, conn = request(hub, "HEAD", path, headers={"Authorization": "Bearer hf_bad"})
    conn.close()
    assert response.status == 401
    assert response.getheader("X-Error-Message") == "Invalid credentials in Authorization header"
    response, body, conn = request(hub, "GET", path, headers={"Authorization": "Bearer hf_good"})
    conn.close()
    assert (response.status, body) == (200, BODY)


def test_gated_repo_answers_403_gated_to_a_token_without_access(served):
    hub, _ = served
    hub.store.create_repo(REPO, gated=True, tokens=["hf_granted"])
    url = hf_hub_url(REPO, "dir/blob.bin", endpoint=hub.endpoint)
    with pytest.raises(hf_errors.GatedRepoError):
        get_hf_file_metadata(url, endpoint=hub.endpoint, token="hf_other")
    assert hub.log.records()[-1].status == 403
    assert get_hf_file_metadata(url, endpoint=hub.endpoint, token="hf_granted").etag == SHA


def test_cdn_redirect_carries_the_metadata_and_serves_without_auth(served):
    hub, commit = served
    hub.store.create_repo(REPO, private=True, tokens=["hf_good"])
    hub.cdn_redirects = True
    response, _, conn = request(hub, "HEAD", PATH, headers={"Authorization": "Bearer hf_good"})
    conn.close()
    assert response.status == 302
    assert response.getheader("X-Repo-Commit") == commit
    assert response.getheader("X-Linked-Etag") == f'"{SHA}"'
    location = response.getheader("Location")
    assert location.startswith(f"http://localhost:{hub.port}/_cdn/")
    cdn_path = location.split(str(hub.port), 1)[1]
    response, body, conn = request(hub, "GET", cdn_path, headers={"Range": "bytes=0-9"})
    conn.close()
    assert (response.status, body) == (206, BODY[:10])
    assert response.getheader("X-Repo-Commit") is None
    assert [(r.status, r.auth) for r in hub.log.records()] == [(302, True), (206, False)]
    response, _, conn = request(hub, "GET", cdn_path.replace(SHA, "0" * 64))
    conn.close()
    assert response.status == 404
    hub.faults.add("wrong_size", method="HEAD", extra_bytes=5)
    response, _, conn = request(hub, "HEAD", PATH, headers={"Authorization": "Bearer hf_good"})
    conn.close()
    assert response.getheader("X-Linked-Size") == str(len(BODY) + 5)


# ---- faults ------------------------------------------------------------------------------------

PATH = f"/{REPO}/resolve/main/dir/blob.bin"


@pytest.mark.parametrize("kind,status", [("status_500", 500), ("status_503", 503),
                                         ("not_found", 404)])
def test_status_faults_are_consumed_then_the_file_is_served(served, kind, status):
    hub, _ = served
    hub.faults.add(kind, "*blob.bin", times=2)
    statuses = []
    for _ in range(3):
        response, body, conn = request(hub, "GET", PATH)
        conn.close()
        statuses.append(response.status)
    assert statuses == [status, status, 200]
    assert body == BODY
    assert [r.fault for r in hub.log.records()] == [kind, kind, None]
    assert hub.faults.pending == []


def test_faults_match_glob_and_method_and_apply_in_order(served):
    hub, _ = served
    hub.faults.add("status_500", "*README.md")
    hub.faults.add("status_503", "*", method="HEAD")
    hub.faults.add("status_500", "*")
    seen = []
    for method, path in [("GET", PATH), ("HEAD", PATH), ("GET", f"/{REPO}/resolve/main/README.md"),
                         ("GET", PATH), ("HEAD", PATH)]:
        response, _, conn = request(hub, method, path)
        conn.close()
        seen.append(response.status)
    # GET blob: the README fault does not match, the HEAD one neither -> third fault (500)
    assert seen == [500, 503, 500, 200, 200]


def test_reset_closes_the_connection_without_an_answer(served):
    hub, _ = served
    hub.faults.add("reset")
    with pytest.raises((ConnectionResetError, http.client.RemoteDisconnected)):
        request(hub, "GET", PATH)
    assert hub.log.records()[0].status == 0
    response, body, conn = request(hub, "GET", PATH)
    conn.close()
    assert body == BODY


def test_stall_before_headers_outlasts_the_client_timeout(served):
    hub, _ = served
    hub.faults.add("stall", seconds=3.0)
    with pytest.raises(socket.timeout):
        request(hub, "HEAD", PATH, timeout=1.0)
    assert hub.log.records()[0].fault == "stall"


def test_stall_mid_body_sends_the_first_bytes_then_hangs(served):
    hub, _ = served
    hub.faults.add("stall", seconds=3.0, at_byte=1000)
    conn = http.client.HTTPConnection("127.0.0.1", hub.port, timeout=1.0)
    conn.request("GET", PATH)
    response = conn.getresponse()
    assert response.status == 200
    assert response.read(1000) == BODY[:1000]
    with pytest.raises(socket.timeout):
        response.read(1)
    conn.close()


def test_cut_announces_the_full_length_and_closes_midway(served):
    hub, _ = served
    hub.faults.add("cut", at_byte=4096)
    with pytest.raises(http.client.IncompleteRead) as caught:
        request(hub, "GET", PATH)
    assert caught.value.partial == BODY[:4096]
    assert caught.value.expected == len(BODY) - 4096


def test_cut_on_a_resumed_request_past_the_mark_sends_nothing(served):
    hub, _ = served
    hub.faults.add("cut", at_byte=4096, times=2)
    with pytest.raises(http.client.IncompleteRead) as caught:
        request(hub, "GET", PATH, headers={"Range": "bytes=5000-"})
    assert caught.value.partial == b""


def test_cut_is_not_applied_to_a_head(served):
    hub, _ = served
    hub.faults.add("cut")
    response, _, conn = request(hub, "HEAD", PATH)
    conn.close()
    assert response.status == 200 and hub.faults.pending  # still waiting for a GET


def test_wrong_size_announces_more_than_it_sends(served):
    hub, _ = served
    hub.faults.add("wrong_size", extra_bytes=100, times=2)
    response, _, conn = request(hub, "HEAD", PATH)
    conn.close()
    assert response.getheader("X-Linked-Size") == str(len(BODY) + 100)
    with pytest.raises(http.client.IncompleteRead) as caught:
        request(hub, "GET", PATH)
    assert caught.value.partial == BODY


def test_corrupt_sends_the_right_length_with_a_wrong_digest(served):
    hub, _ = served
    hub.faults.add("corrupt", at_byte=7)
    response, body, conn = request(hub, "GET", PATH)
    conn.close()
    assert response.getheader("ETag") == f'"{SHA}"'
    assert len(body) == len(BODY) and hashlib.sha256(body).hexdigest() != SHA
    assert body[:7] == BODY[:7] and body[8:] == BODY[8:]


def test_a_stalled_download_does_not_hold_up_other_requests(served):
    hub, _ = served
    hub.faults.add("stall", "*blob.bin", seconds=5.0, at_byte=100)
    stalled = threading.Thread(target=lambda: _swallow(request, hub, "GET", PATH, timeout=10))
    stalled.start()
    while not hub.log.records("GET", "*blob.bin"):
        time.sleep(0.01)
    response, body, conn = request(hub, "GET", f"/{REPO}/resolve/main/README.md")
    conn.close()
    assert (response.status, body) == (200, b"hello\n")
    assert stalled.is_alive()                      # still stalled while the other was served
    hub.stop()                                     # ends the stall
    stalled.join(timeout=5)
    assert not stalled.is_alive()


def test_unknown_fault_kind_is_refused(hub):
    with pytest.raises(ValueError, match="unknown fault kind"):
        hub.faults.add("explode")


# ---- lifecycle and store -----------------------------------------------------------------------

def test_stop_is_prompt_with_a_stall_and_an_idle_keepalive_connection(tmp_path):
    hub = LocalHub(tmp_path / "hub").start()
    hub.store.commit(REPO, {"dir/blob.bin": BODY})
    port = hub.port
    idle = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    idle.request("HEAD", PATH)
    idle.getresponse().read()            # a kept-alive connection, idle in the server
    hub.faults.add("stall", seconds=60)
    stalled = threading.Thread(target=lambda: _swallow(request, hub, "GET", PATH, timeout=60))
    stalled.start()
    while not hub.log.records(path_glob=PATH, method="GET"):
        time.sleep(0.01)
    started = time.monotonic()
    hub.stop()
    assert time.monotonic() - started < 2.0
    stalled.join(timeout=5)
    assert not stalled.is_alive()
    with pytest.raises((OSError, http.client.HTTPException)):
        idle.request("HEAD", PATH)       # the idle connection was closed by the server
        idle.getresponse()
    idle.close()
    LocalHub(tmp_path / "hub", port=port).start().stop()   # the port can be served again


def _swallow(fn, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except (OSError, http.client.HTTPException):
        pass


def test_store_refuses_unsafe_names(tmp_path):
    store = HubStore(tmp_path)
    for repo_id in ("../x", "a/b/c", "", "a/..", "a/.hidden"):
        with pytest.raises(HubStoreError):
            store.commit(repo_id, {"f": b"x"})
    for path in ("../f", "/abs", "a//b", "a/./b", ""):
        with pytest.raises(HubStoreError):
            store.commit("acme/ok", {path: b"x"})
    assert not any(tmp_path.parent.glob("f"))


def test_parse_range_edges():
    assert _parse_range("bytes=0-0", 10) == (0, 0)
    assert _parse_range("bytes=-20", 10) == (0, 9)
    assert _parse_range("bytes=0-", 0) is None
    assert _parse_range("items=0-1", 10) is None
    assert _parse_range("bytes=-", 10) is None


def test_standalone_server_imports_a_folder_and_stops_on_sigterm(tmp_path):
    plain = tmp_path / "plain" / "acme" / "demo"
    plain.mkdir(parents=True)
    (plain / "model.onnx").write_bytes(BODY)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "modeld.testing.hub", "--root",
                             str(tmp_path / "store"), "--port", "0", "--import-dir",
                             str(tmp_path / "plain"), "--fault", "status_503:*model.onnx:1"],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        first = proc.stdout.readline().strip()
        assert first.startswith("HF_ENDPOINT=http://127.0.0.1:")
        assert proc.stdout.readline().strip() == "repo acme/demo"
        port = int(first.rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/acme/demo/resolve/main/model.onnx")
        first_response = conn.getresponse()
        first_response.read()
        assert first_response.status == 503               # the --fault flag
        conn.request("GET", "/acme/demo/resolve/main/model.onnx")
        assert conn.getresponse().read() == BODY
        # another process (the demo, a test) commits to the store the server is serving
        HubStore(tmp_path / "store").commit("acme/demo", {"model.onnx": b"v2"})
        conn.request("GET", "/acme/demo/resolve/main/model.onnx")
        assert conn.getresponse().read() == b"v2"
        conn.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
