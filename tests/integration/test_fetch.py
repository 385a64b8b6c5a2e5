"""The fetch worker against the real loopback Hub, through the real huggingface_hub client.

``fetch_model`` is called in-process for speed; one test runs it through ``JobRunner`` in a spawn
process and kills it mid-download; the disk-full test runs it in a child with a small
``RLIMIT_FSIZE``.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import pickle
import resource
import signal
import threading
import time
from pathlib import Path

import pytest

from modeld import errors
from modeld.atomic import remove_leftovers
from modeld.errors import (DiskFullError, HubAuthError, HubNotFoundError, HubOfflineError,
                           HubUnavailableError, IntegrityError, StoreError)
from modeld.jobs import JobCancelledError, JobRunner, JobSpec
from modeld.testing.onnx_models import matmul_mlp, tiny_cnn
from modeld.workers import fetch as fetch_module
from modeld.work import FetchRequest, FetchResult
from modeld.workers.fetch import fetch_model
from tests.support.hub import (LABELS, MODEL_PATH, REPO, ProgressLog, dead_endpoint, fetch_request,
                               publish, records_of)

MODEL = tiny_cnn()


def pull(request: FetchRequest, progress=None):
    return fetch_model(request, progress or ProgressLog())


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".modeld-")]


@pytest.fixture
def pulled(hub, model_dir):
    """A first successful pull of the seed model; returns (hub, model_dir, result)."""
    publish(hub)
    result = pull(fetch_request(hub.endpoint, model_dir))
    hub.log.clear()
    return hub, model_dir, result


# ---- pulling and provenance --------------------------------------------------------------------

def test_pull_of_a_pinned_tag_records_the_commit_and_writes_all_files(hub, model_dir):
    commit = publish(hub)
    hub.store.tag(REPO, "v1", commit)
    publish(hub, model=matmul_mlp())                   # main moves on; the tag does not
    progress = ProgressLog()
    result = pull(fetch_request(hub.endpoint, model_dir, revision="v1"), progress)

    assert result.commit == commit and result.changed
    assert sorted(os.listdir(model_dir)) == ["config.json", "labels.txt", "model.onnx"]
    assert (model_dir / "model.onnx").read_bytes() == MODEL
    assert (model_dir / "labels.txt").read_bytes() == LABELS
    model, labels, config = result.files
    assert (model.name, labels.name, config.name) == ("model.onnx", "labels.txt", "config.json")
    assert model.sha256 == hashlib.sha256(MODEL).hexdigest()
    assert model.provenance.commit == commit and model.provenance.revision == "v1"
    assert model.provenance.filename == MODEL_PATH and model.provenance.etag == model.sha256
    st = os.stat(model_dir / "model.onnx")
    assert (model.size, model.mtime_ns, model.inode) == (st.st_size, st.st_mtime_ns, st.st_ino)
    assert result.downloaded_bytes == len(MODEL) + len(LABELS)

    doc = json.loads((model_dir / "config.json").read_text())
    assert doc["labels_count"] == len(LABELS.splitlines()) == 4
    assert doc["input_size"] == 32 and doc["opset"] == 17
    assert doc["inputs"] == [{"name": "images", "shape": [1, 3, 32, 32], "dtype": "float32"}]
    assert doc["outputs"] == [{"name": "output0", "shape": [1, 4, 16, 16], "dtype": "float32"}]
    assert doc["source"] == {"repo": REPO, "filename": MODEL_PATH, "commit": commit}
    assert doc["files"]["model.onnx"]["sha256"] == model.sha256
    assert config.sha256 == hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest()

    fractions = [f for f, _ in progress.calls if f is not None]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any(detail.startswith("downloading model.onnx [") and detail.endswith(" bytes]")
               for _, detail in progress.calls)


def test_pull_request_revision_is_url_encoded_and_resolved(hub, model_dir):
    publish(hub)
    pr_commit = publish(hub, model=tiny_cnn(seed=11), branch="refs/pr/1")
    result = pull(fetch_request(hub.endpoint, model_dir, revision="refs/pr/1"))
    assert result.commit == pr_commit
    assert (model_dir / "model.onnx").read_bytes() == tiny_cnn(seed=11)
    assert hub.log.records("HEAD")[0].path.endswith("/resolve/refs/pr/1/" + MODEL_PATH)


def test_symbolic_dims_and_no_labels(hub, model_dir):
    publish(hub, model=matmul_mlp(), labels=None)
    result = pull(fetch_request(hub.endpoint, model_dir, labels=None))
    doc = json.loads((model_dir / "config.json").read_text())
    assert doc["inputs"] == [{"name": "input", "shape": ["N", 64], "dtype": "float32"}]
    assert doc["labels_count"] is None and "labels.txt" not in doc["files"]
    assert [r.name for r in result.files] == ["model.onnx", "config.json"]


def test_pinned_commit_already_here_does_not_ask_the_hub(pulled):
    hub, model_dir, first = pulled
    request = fetch_request(hub.endpoint, model_dir, revision=first.commit,
                            known=records_of(first))
    result = pull(request)
    assert hub.log.records() == []
    assert result.commit == first.commit
    # only the provenance's revision differs (None -> the commit): no byte moved
    assert result.downloaded_bytes == 0
    assert [r.sha256 for r in result.files] == [r.sha256 for r in first.files]


def test_unchanged_branch_is_neither_downloaded_nor_hashed(pulled, monkeypatch):
    hub, model_dir, first = pulled
    hashed = []
    real_hash = fetch_module.sha256_file
    monkeypatch.setattr(fetch_module, "sha256_file", lambda p: hashed.append(p) or real_hash(p))
    # Tamper without changing size, mtime or inode: only a hash could see it.
    path = model_dir / "model.onnx"
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(100)
        f.write(bytes([MODEL[100] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_ino == st.st_ino

    result = pull(fetch_request(hub.endpoint, model_dir, known=records_of(first)))
    assert result.changed is False and result.downloaded_bytes == 0
    assert result.files == first.files
    assert hub.log.count("GET") == 0 and hub.log.count("HEAD") == 2
    assert hashed == []
    assert path.read_bytes() != MODEL          # not detected: the stat triple was trusted


def test_touched_file_is_hashed_once_and_kept_without_download(pulled):
    hub, model_dir, first = pulled
    path = model_dir / "model.onnx"
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    result = pull(fetch_request(hub.endpoint, model_dir, known=records_of(first)))
    assert hub.log.count("GET") == 0
    assert result.changed is True                  # the record's stat triple moved on
    assert result.files[0].sha256 == first.files[0].sha256
    assert result.files[0].mtime_ns == os.stat(path).st_mtime_ns


def test_moved_branch_pulls_the_changed_file_only(pulled):
    hub, model_dir, first = pulled
    new_model = tiny_cnn(seed=5)
    new_commit = publish(hub, model=new_model, labels=LABELS)   # labels unchanged
    result = pull(fetch_request(hub.endpoint, model_dir, known=records_of(first)))
    assert result.commit == new_commit != first.commit and result.changed
    assert (model_dir / "model.onnx").read_bytes() == new_model
    assert hub.log.count("GET", "*model.onnx") == 1
    assert hub.log.count("GET", "*labels.txt") == 0            # adopted by its ETag
    model, labels, config = result.files
    assert labels.provenance.commit == new_commit and labels.inode == first.files[1].inode
    assert json.loads((model_dir / "config.json").read_text())["source"]["commit"] == new_commit
    assert leftovers(model_dir) == []


@pytest.mark.parametrize("target", ["outside-dir", "loop"])
def test_a_symlink_in_place_of_the_model_is_replaced_not_written_through(pulled, tmp_path, target):
    hub, model_dir, first = pulled
    path = model_dir / "model.onnx"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_bytes(b"untouched")
    path.unlink()
    path.symlink_to(outside if target == "outside-dir" else path)   # unreadable as a file
    result = pull(fetch_request(hub.endpoint, model_dir, known=records_of(first)))
    assert not path.is_symlink() and path.read_bytes() == MODEL
    assert hub.log.count("GET", "*model.onnx") == 1 and result.changed
    assert os.listdir(outside) == ["keep.txt"] and (outside / "keep.txt").read_bytes() == b"untouched"


def test_crash_between_publish_and_manifest_adopts_the_file(pulled):
    hub, model_dir, first = pulled
    result = pull(fetch_request(hub.endpoint, model_dir, known={}))   # the manifest was lost
    assert hub.log.count("GET") == 0
    assert [r.sha256 for r in result.files] == [r.sha256 for r in first.files]
    assert result.files[0].provenance == first.files[0].provenance


def test_config_is_rewritten_only_when_its_content_changes(pulled):
    hub, model_dir, first = pulled
    config = model_dir / "config.json"
    before = os.stat(config)
    same = pull(fetch_request(hub.endpoint, model_dir, known=records_of(first)))
    assert os.stat(config).st_ino == before.st_ino and same.files[2] == first.files[2]
    changed = pull(fetch_request(hub.endpoint, model_dir, known=records_of(first),
                                 description="a new description"))
    assert changed.changed and changed.downloaded_bytes == 0
    assert json.loads(config.read_text())["description"] == "a new description"
    assert os.stat(config).st_ino != before.st_ino          # replaced atomically, not edited


def test_labels_dropped_from_the_entry_are_removed(pulled):
    hub, model_dir, first = pulled
    result = pull(fetch_request(hub.endpoint, model_dir, labels=None, known=records_of(first)))
    assert not (model_dir / "labels.txt").exists() and result.changed
    assert [r.name for r in result.files] == ["model.onnx", "config.json"]
    assert json.loads((model_dir / "config.json").read_text())["labels_count"] is None


def test_a_folder_in_the_repo_path_lands_as_model_onnx(hub, tmp_path):
    deep = "exports/v2/onnx with space/best.onnx"
    hub.store.commit(REPO, {deep: MODEL})
    model_dir = tmp_path / "models" / "det"
    pull(fetch_request(hub.endpoint, model_dir, filename=deep, labels=None))
    assert sorted(os.listdir(model_dir)) == ["config.json", "model.onnx"]
    assert sorted(os.listdir(tmp_path)) == ["hub", "models"]
    assert os.listdir(tmp_path / "models") == ["det"]


@pytest.mark.parametrize("field,value", [
    ("filename", "../../escape.onnx"), ("filename", "/etc/passwd"), ("filename", "a/../../b.onnx"),
    ("filename", "a\\..\\b.onnx"), ("labels", "../labels.txt"), ("filename", ""),
])
def test_hostile_repo_paths_are_refused_before_any_request(hub, tmp_path, field, value):
    publish(hub)
    model_dir = tmp_path / "models" / "det"
    with pytest.raises(StoreError, match="unsafe file path"):
        pull(fetch_request(hub.endpoint, model_dir, **{field: value}))
    assert hub.log.records() == []
    assert sorted(os.listdir(tmp_path)) == ["hub", "models"]
    assert os.listdir(model_dir) == []


def test_relative_model_dir_is_refused(hub):
    with pytest.raises(StoreError, match="not an absolute path"):
        pull(fetch_request(hub.endpoint, Path("models/det")))


# ---- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,error,text", [
    ({"repo": "acme/nothing"}, HubNotFoundError, "repository acme/nothing not found"),
    ({"revision": "no-such-tag"}, HubNotFoundError, "revision no-such-tag not found"),
    ({"filename": "det/missing.onnx"}, HubNotFoundError, "det/missing.onnx not found"),
    ({"labels": "det/missing.txt"}, HubNotFoundError, "det/missing.txt not found"),
    ({"repo": "not a repo id!"}, HubNotFoundError, "not a valid repo id"),
])
def test_missing_things_are_permanent_not_found_errors(hub, model_dir, overrides, error, text):
    publish(hub)
    with pytest.raises(error) as caught:
        pull(fetch_request(hub.endpoint, model_dir, **overrides))
    assert text in str(caught.value) and "model_catalog.toml" in str(caught.value)
    assert isinstance(caught.value, errors.PermanentError)
    assert hub.log.count("GET") == 0
    assert all(r.status in (200, 404) for r in hub.log.records())   # not retried
    assert leftovers(model_dir) == []


def test_private_repo_needs_a_token(hub, model_dir):
    publish(hub)
    hub.store.create_repo(REPO, private=True, tokens=["hf_secret"])
    for token in (None, "hf_wrong"):
        with pytest.raises(HubAuthError, match="HF_TOKEN"):
            pull(fetch_request(hub.endpoint, model_dir, token=token))
    assert hub.log.count() == 2              # one HEAD each: auth errors are not retried
    result = pull(fetch_request(hub.endpoint, model_dir, token="hf_secret"))
    assert (model_dir / "model.onnx").read_bytes() == MODEL and result.changed


def test_private_repo_through_cdn_redirects_keeps_the_token_off_the_cdn(hub, model_dir):
    publish(hub)
    hub.store.create_repo(REPO, private=True, tokens=["hf_secret"])
    hub.cdn_redirects = True
    hub.faults.add("cut", "/_cdn/*model.onnx", method="GET")
    result = pull(fetch_request(hub.endpoint, model_dir, token="hf_secret"))
    assert (model_dir / "model.onnx").read_bytes() == MODEL and result.changed
    cdn = hub.log.records(path_glob="/_cdn/*")
    assert [r.method for r in cdn] == ["GET", "GET", "GET"]     # model (cut, resumed), labels
    assert not any(r.auth for r in cdn)
    assert all(r.auth and r.status == 302 for r in hub.log.records(path_glob="*/resolve/*"))


def test_gated_repo_without_access_is_an_auth_error(hub, model_dir):
    publish(hub)
    hub.store.create_repo(REPO, gated=True, tokens=["hf_granted"])
    with pytest.raises(HubAuthError, match="gated"):
        pull(fetch_request(hub.endpoint, model_dir, token="hf_other"))


@pytest.mark.parametrize("content", [b"<html>this is not a model</html>\n" * 20,
                                     tiny_cnn(seed=2)[:1500], b""],
                         ids=["html", "truncated", "empty"])
def test_not_an_onnx_model_is_refused_and_not_published(pulled, content):
    hub, model_dir, first = pulled
    before = snapshot(model_dir)
    commit = publish(hub, model=content)
    with pytest.raises(StoreError) as caught:
        pull(fetch_request(hub.endpoint, model_dir, known=records_of(first)))
    assert f"model.onnx from {REPO}@{commit[:7]} is not an ONNX model" in str(caught.value)
    assert snapshot(model_dir) == before
    assert leftovers(model_dir) == []


def test_hub_down_is_a_temporary_error_after_bounded_attempts(model_dir):
    started = time.monotonic()
    with pytest.raises(HubUnavailableError, match="hub unreachable") as caught:
        pull(fetch_request(dead_endpoint(), model_dir, attempts=3))
    assert isinstance(caught.value, errors.TemporaryError)
    assert time.monotonic() - started < 10      # no 23 s of client-side retries


def test_offline_serves_what_is_here_and_refuses_what_is_not(pulled, tmp_path):
    hub, model_dir, first = pulled
    result = pull(fetch_request(hub.endpoint, model_dir, offline=True, known=records_of(first)))
    assert result.changed is False and hub.log.records() == []
    with pytest.raises(HubOfflineError, match="offline") as caught:
        pull(fetch_request(hub.endpoint, tmp_path / "models" / "other", offline=True))
    assert isinstance(caught.value, errors.PermanentError)
    as_main = pull(fetch_request(hub.endpoint, model_dir, offline=True, revision="main",
                                 known=records_of(first)))     # None and "main" are one branch
    assert as_main.files[0].sha256 == first.files[0].sha256
    with pytest.raises(HubOfflineError):          # another revision is not here either
        pull(fetch_request(hub.endpoint, model_dir, offline=True, revision="v9",
                           known=records_of(first)))
    assert hub.log.records() == []


def test_errors_survive_a_pickle_round_trip(hub, model_dir):
    publish(hub)
    hub.store.create_repo("acme/private", private=True)
    hub.store.commit("acme/private", {MODEL_PATH: MODEL})
    cases = [dict(repo="acme/nothing"), dict(repo="acme/private"), dict(filename="../x"),
             dict(endpoint=dead_endpoint(), attempts=1), dict(offline=True)]
    seen = []
    for overrides in cases:
        with pytest.raises(errors.ModeldError) as caught:
            pull(fetch_request(overrides.pop("endpoint", hub.endpoint), model_dir, **overrides))
        copy = pickle.loads(pickle.dumps(caught.value))
        assert type(copy) is type(caught.value) and str(copy) == str(caught.value)
        assert copy.fields() == caught.value.fields()
        seen.append(type(copy))
    assert seen == [HubNotFoundError, HubAuthError, StoreError, HubUnavailableError,
                    HubOfflineError]


# ---- faults: retried within bounds, or reported with the right type ----------------------------

@pytest.mark.parametrize("kind,method,extra,heads,gets", [
    # my HEAD fails twice, then: my HEAD, labels HEAD, client HEAD + GET for each file
    ("status_503", "HEAD", {}, 2 + 2 + 2, 2),
    ("reset", "HEAD", {}, 1 + 2 + 2, 2),
    ("stall", "HEAD", {"seconds": 3.0}, 1 + 2 + 2, 2),
    # the GET fails: one more attempt (client HEAD + GET) for the model
    ("status_500", "GET", {}, 2 + 3, 3),
    ("reset", "GET", {}, 2 + 3, 3),
    # the client resumes a body itself (one more GET, 1 s later)
    ("cut", "GET", {}, 2 + 2, 3),
    ("wrong_size", "GET", {}, 2 + 2, 3),
    ("stall", "GET", {"seconds": 3.0, "at_byte": 1000}, 2 + 2, 3),
])
def test_temporary_faults_are_retried_with_a_bounded_request_count(
        hub, model_dir, kind, method, extra, heads, gets):
    publish(hub)
    times = 2 if kind == "status_503" else 1
    hub.faults.add(kind, "*model.onnx", times=times, method=method, **extra)
    result = pull(fetch_request(hub.endpoint, model_dir, timeout_s=1.0))
    assert (model_dir / "model.onnx").read_bytes() == MODEL and result.changed
    assert (hub.log.count("HEAD"), hub.log.count("GET")) == (heads, gets)
    assert hub.faults.pending == []
    assert leftovers(model_dir) == []


def test_client_retries_its_own_head_once_within_our_attempt(hub, model_dir):
    commit = publish(hub)
    # the HEAD inside hf_hub_download is the only one asking for the model at the commit
    hub.faults.add("status_503", f"*/resolve/{commit}/{MODEL_PATH}", method="HEAD")
    pull(fetch_request(hub.endpoint, model_dir))
    assert (model_dir / "model.onnx").read_bytes() == MODEL
    assert hub.log.count("HEAD", f"*/resolve/{commit}/{MODEL_PATH}") == 2
    assert hub.log.count("GET") == 2


def test_not_found_fault_is_permanent_and_not_retried(hub, model_dir):
    publish(hub)
    hub.faults.add("not_found", "*model.onnx", method="HEAD")
    with pytest.raises(HubNotFoundError, match="not found"):
        pull(fetch_request(hub.endpoint, model_dir, attempts=5))
    assert hub.log.count() == 1


def test_persistent_5xx_gives_up_after_the_attempts(hub, model_dir):
    publish(hub)
    hub.faults.add("status_503", times=1000)
    with pytest.raises(HubUnavailableError, match="HTTP 503"):
        pull(fetch_request(hub.endpoint, model_dir, attempts=4))
    assert hub.log.count() == 4


def test_digest_mismatch_is_refused_on_every_attempt(pulled):
    hub, model_dir, first = pulled
    before = snapshot(model_dir)
    publish(hub, model=tiny_cnn(seed=9))
    hub.faults.add("corrupt", "*model.onnx", times=1000)
    with pytest.raises(IntegrityError, match="does not match its ETag"):
        pull(fetch_request(hub.endpoint, model_dir, known=records_of(first), attempts=3))
    assert hub.log.count("GET", "*model.onnx") == 3
    assert snapshot(model_dir) == before
    assert leftovers(model_dir) == []


def test_range_is_used_when_a_large_file_is_cut(hub, model_dir):
    # huggingface_hub writes 10 MiB chunks: a cut after the first chunk resumes with Range
    big = tiny_cnn(channels=600)
    assert len(big) > 11 * 2**20
    publish(hub, model=big, labels=None)
    hub.faults.add("cut", "*model.onnx", method="GET", at_byte=11 * 2**20)
    pull(fetch_request(hub.endpoint, model_dir, labels=None))
    assert (model_dir / "model.onnx").read_bytes() == big
    ranges = [r.range for r in hub.log.records("GET")]
    assert ranges == [None, f"bytes={10 * 2**20}-"]


def test_cut_on_every_request_leaves_the_old_files_serving(pulled):
    hub, model_dir, first = pulled
    before = snapshot(model_dir)
    publish(hub, model=tiny_cnn(seed=4))
    hub.faults.add("cut", "*model.onnx", times=1000, method="GET")
    with pytest.raises((HubUnavailableError, IntegrityError)):
        pull(fetch_request(hub.endpoint, model_dir, known=records_of(first), attempts=1))
    # one attempt = the GET and huggingface_hub's own 5 resumes
    assert hub.log.count("GET", "*model.onnx") == 6
    assert snapshot(model_dir) == before
    assert leftovers(model_dir) == [] and remove_leftovers(model_dir) == []


def test_announced_size_beyond_free_space_is_disk_full_before_any_get(pulled):
    hub, model_dir, first = pulled
    before = snapshot(model_dir)
    publish(hub, model=tiny_cnn(seed=6))
    hub.faults.add("wrong_size", "*model.onnx", method="HEAD", times=1, extra_bytes=2**62)
    with pytest.raises(DiskFullError, match="free disk space"):
        pull(fetch_request(hub.endpoint, model_dir, known=records_of(first)))
    assert hub.log.count("GET") == 0
    assert snapshot(model_dir) == before and leftovers(model_dir) == []


def _fetch_with_file_size_limit(request: FetchRequest, limit_bytes: int, conn) -> None:
    """Child process: writing past ``limit_bytes`` fails with EFBIG, as a full disk would."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    try:
        fetch_model(request, lambda fraction, detail: None)
        conn.send(None)
    except BaseException as e:  # noqa: BLE001 - the parent asserts on it
        conn.send(e)


def test_disk_full_while_downloading_keeps_the_old_files(pulled):
    hub, model_dir, first = pulled
    before = snapshot(model_dir)
    big = matmul_mlp(seed=3)
    assert len(big) > 200_000
    publish(hub, model=big)
    request = fetch_request(hub.endpoint, model_dir, known=records_of(first))
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_fetch_with_file_size_limit, args=(request, 100_000, child))
    process.start()
    child.close()
    assert parent.poll(60)
    error = parent.recv()
    process.join(10)
    assert isinstance(error, DiskFullError), repr(error)
    assert snapshot(model_dir) == before
    assert leftovers(model_dir) == []
    assert hub.log.count("GET", "*model.onnx") == 1        # not retried: space will not come back


def test_remove_leftovers_removes_temp_files_scratch_folders_and_incomplete_blobs(tmp_path):
    folder = tmp_path / "det"
    (folder / ".modeld-work-abc" / "models--a--b" / "blobs").mkdir(parents=True)
    (folder / ".modeld-work-abc" / "models--a--b" / "blobs" / "x.1234.incomplete").write_bytes(b"1")
    (folder / ".modeld-tmp-123-model.onnx").write_bytes(b"partial")
    (folder / "orphan.incomplete").write_bytes(b"x")
    (folder / "model.onnx").write_bytes(b"keep")
    removed = remove_leftovers(folder)
    assert removed == [".modeld-tmp-123-model.onnx", ".modeld-work-abc", "orphan.incomplete"]
    assert os.listdir(folder) == ["model.onnx"]
    assert remove_leftovers(tmp_path / "missing") == []


# ---- through the job runner, in a spawn process ------------------------------------------------

def test_worker_killed_mid_download_then_a_clean_pull(pulled):
    hub, model_dir, first = pulled
    before = snapshot(model_dir)
    new_model = tiny_cnn(seed=8)
    commit = publish(hub, model=new_model)
    hub.faults.add("stall", "*model.onnx", method="GET", seconds=60, at_byte=1000)
    spec = JobSpec(FetchRequest.target, timeout_s=60)
    request = fetch_request(hub.endpoint, model_dir, known=records_of(first))  # as it is
    runner = JobRunner()

    def kill_when_downloading(handle) -> None:
        def watch() -> None:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not hub.log.records("GET", "*model.onnx"):
                time.sleep(0.02)
            handle.cancel()
        threading.Thread(target=watch, daemon=True).start()

    with pytest.raises(JobCancelledError):
        runner.run(spec, request, on_start=kill_when_downloading)
    assert snapshot(model_dir) == before                       # the old files keep serving
    assert leftovers(model_dir)                                 # the killed worker's scratch
    assert remove_leftovers(model_dir) and leftovers(model_dir) == []

    hub.faults.clear()
    progress: list[tuple] = []
    result = runner.run(spec, request, on_progress=lambda f, d: progress.append((f, d)))
    assert isinstance(result, FetchResult) and pickle.loads(pickle.dumps(result)) == result
    assert result.commit == commit and result.changed
    assert (model_dir / "model.onnx").read_bytes() == new_model
    assert progress and progress[-1][0] == 1.0
