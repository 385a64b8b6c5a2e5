"""The loopback Hub's upload side, driven by the real huggingface_hub client (``HfApi``):
create_repo, model_info, preupload, the LFS batch/upload/verify and the NDJSON commit."""

from __future__ import annotations

import hashlib
import http.client
import threading
from pathlib import Path

import pytest
from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download
from huggingface_hub import constants as hf_constants
from huggingface_hub import errors as hf_errors

from modeld.testing.hub import LocalHub
from modeld.testing.onnx_models import matmul_mlp

TOKEN = "hf_writer"
REPO = "fleet/variants"


@pytest.fixture
def hub(tmp_path: Path, monkeypatch):
    # the loopback hub speaks LFS, not Xet (as modeld.workers.share does)
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    with LocalHub(tmp_path / "hub", write_tokens=[TOKEN]) as running:
        yield running


def api(hub: LocalHub, token: str | bool = TOKEN) -> HfApi:
    return HfApi(endpoint=hub.endpoint, token=token)


def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "model-int8.onnx"
    path.write_bytes(matmul_mlp(seed=5))
    return path


def add(path_in_repo: str, content) -> CommitOperationAdd:
    return CommitOperationAdd(path_in_repo, content)


def test_create_repo_and_commit_then_download_the_same_bytes(hub, tmp_path):
    url = api(hub).create_repo(REPO)
    assert url.repo_id == REPO
    assert api(hub).create_repo(REPO, exist_ok=True).repo_id == REPO   # 409 -> exist_ok
    head = api(hub).model_info(REPO)
    assert [s.rfilename for s in head.siblings] == [".gitattributes"]   # the Hub's first commit
    source = model_file(tmp_path)
    commit = api(hub).create_commit(
        REPO, [add("v/model-int8.onnx", str(source)), add("v/record.json", b'{"a": 1}\n')],
        commit_message="share", parent_commit=head.sha)
    assert api(hub).model_info(REPO).sha == commit.oid
    got = hf_hub_download(REPO, "v/model-int8.onnx", revision=commit.oid, endpoint=hub.endpoint,
                          cache_dir=tmp_path / "cache")
    assert Path(got).read_bytes() == source.read_bytes()
    # the ONNX file (NUL bytes) went through LFS: batch, PUT, verify; the JSON inline
    assert hub.log.count("POST", "*.git/info/lfs/objects/batch") == 1
    assert hub.log.count("PUT", "/_lfs/*") == 1
    assert hub.log.count("POST", "/_lfs/*/verify") == 1
    # committing the same content again uploads nothing: the batch says it is stored
    api(hub).create_commit(REPO, [add("w/model-int8.onnx", str(source))], commit_message="again")
    assert hub.log.count("PUT", "/_lfs/*") == 1


def test_a_stale_parent_commit_is_refused_with_412_and_changes_nothing(hub):
    api(hub).create_repo(REPO)
    first = api(hub).model_info(REPO).sha
    second = api(hub).create_commit(REPO, [add("a.json", b"{}")], commit_message="a",
                                    parent_commit=first).oid
    with pytest.raises(hf_errors.HfHubHTTPError) as caught:
        api(hub).create_commit(REPO, [add("b.json", b"{}")], commit_message="b",
                               parent_commit=first)
    assert caught.value.response.status_code == 412
    info = api(hub).model_info(REPO)
    assert info.sha == second and "b.json" not in {s.rfilename for s in info.siblings}


def test_two_writers_with_the_same_parent_leave_one_commit(hub, tmp_path):
    api(hub).create_repo(REPO)
    parent = api(hub).model_info(REPO).sha
    source = model_file(tmp_path)
    outcomes: list[str] = []

    def write(i: int) -> None:
        try:
            api(hub).create_commit(REPO, [add("v/model-int8.onnx", str(source)),
                                          add("v/record.json", f'{{"writer": {i}}}'.encode())],
                                   commit_message=f"writer {i}", parent_commit=parent)
            outcomes.append("committed")
        except hf_errors.HfHubHTTPError as e:
            outcomes.append(str(e.response.status_code))

    threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(outcomes) == ["412", "committed"]
    commits = hub.log.records("POST", "/api/models/*/commit/*")
    assert sorted(r.status for r in commits) == [200, 412]


def test_writes_need_a_token_the_hub_accepts(hub):
    api(hub).create_repo(REPO)
    before = api(hub).model_info(REPO).sha
    with pytest.raises(hf_errors.HfHubHTTPError) as no_token:
        api(hub, token=False).create_commit(REPO, [add("x.json", b"{}")], commit_message="x")
    assert no_token.value.response.status_code == 401
    with pytest.raises(hf_errors.HfHubHTTPError) as reader:
        api(hub, token="hf_reader").create_commit(REPO, [add("x.json", b"{}")],
                                                  commit_message="x")
    assert reader.value.response.status_code == 403
    with pytest.raises(hf_errors.HfHubHTTPError) as create:
        api(hub, token="hf_reader").create_repo("fleet/other")
    assert create.value.response.status_code == 403
    assert api(hub).model_info(REPO).sha == before


def test_an_upload_that_is_not_its_oid_is_discarded(hub):
    api(hub).create_repo(REPO)
    body = b"\0not the promised content"
    oid = hashlib.sha256(b"something else").hexdigest()
    conn = http.client.HTTPConnection("127.0.0.1", hub.port, timeout=5)
    conn.request("PUT", f"/_lfs/fleet%2Fvariants/{oid}", body=body)
    assert conn.getresponse().status == 400
    assert hub.store.object(REPO, oid) is None
    # and a commit naming an object never uploaded is refused whole
    with pytest.raises(hf_errors.HfHubHTTPError):
        api(hub).create_commit(REPO, [add("a.json", b"{}")], commit_message="a",
                               parent_commit="0" * 40)
    assert {s.rfilename for s in api(hub).model_info(REPO).siblings} == {".gitattributes"}


def test_a_fault_on_the_commit_leaves_the_branch_as_it_was(hub, tmp_path):
    api(hub).create_repo(REPO)
    before = api(hub).model_info(REPO).sha
    hub.faults.add("status_500", "/api/models/*/commit/*", method="POST")
    with pytest.raises(hf_errors.HfHubHTTPError) as caught:
        api(hub).create_commit(REPO, [add("v/model-int8.onnx", str(model_file(tmp_path)))],
                               commit_message="x", parent_commit=before)
    assert caught.value.response.status_code == 500
    assert api(hub).model_info(REPO).sha == before    # uploaded objects are in no commit
    again = api(hub).create_commit(REPO, [add("v/model-int8.onnx", str(model_file(tmp_path)))],
                                   commit_message="x", parent_commit=before)
    assert api(hub).model_info(REPO).sha == again.oid
