"""Look up, download and upload proven variants in a share repo on the Hub (``modeld.share``).

Run by ``modeld.jobs.JobRunner`` in spawn workers: ``adopt`` (the planner's ``Adopt``) and
``upload`` (its ``Share``). Downloads go through the fetch worker's code (ETag digest check,
private scratch folder, atomic publish) and are checked again against the record's sha256;
uploads use ``HfApi.create_commit`` with the parent commit that was looked at, so two builders
racing leave one commit of the variant (the loser looks again and finds it). A look-up never
raises for the Hub's sake: "none here" and "refused" are outcomes, and the daemon builds its own.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import uuid
from dataclasses import replace
from pathlib import Path

import structlog
from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub import constants as hf_constants
from huggingface_hub import errors as hf_errors

from ..atomic import WORK_PREFIX, read_regular, sha256_file
from ..errors import HubError, HubNotFoundError, IntegrityError, ModeldError
from ..share import (ADOPTED, ALREADY_SHARED, DENIED, FAILED, MAX_RECORD_BYTES, NONE, RECORD_FILE,
                     REFUSED, SHARED, ShareRecord, make_record, record_path, variant_path)
from ..work import (AdoptRequest, AdoptResult, FetchRequest, ProgressFn, UploadRequest,
                    UploadResult)
from .fetch import _download_one, _head, _model_dir, _one_line, _publish, _retrying

log = structlog.get_logger(__name__)

#: HTTP statuses of a commit whose parent is no longer the branch's head
_STALE_PARENT = (409, 412)



def adopt(request: AdoptRequest, progress: ProgressFn) -> AdoptResult:
    """Download the shared variant of ``request.derivation`` into the model folder, or say why
    not. The file is published under its final name only after both digests matched."""
    where = f"{request.share}:{record_path(request.derivation)}"
    if request.offline:
        return AdoptResult(NONE, f"offline (HF_HUB_OFFLINE): {request.share} not asked")
    fetch = _fetch_request(request)
    model_dir = _model_dir(fetch)
    progress(0.0, f"looking in {request.share}")
    try:
        head = _retrying(fetch, RECORD_FILE, lambda: _head(
            fetch, RECORD_FILE, record_path(request.derivation), None))
    except HubNotFoundError:
        return AdoptResult(NONE, f"no shared variant for these inputs in {request.share}")
    except HubError as e:
        return AdoptResult(NONE, f"{request.share} not usable: {e.message}")
    scratch = model_dir / f"{WORK_PREFIX}{uuid.uuid4().hex[:12]}"
    scratch.mkdir()
    try:
        try:
            staged, _ = _retrying(fetch, RECORD_FILE,
                                  lambda: _download_one(fetch, scratch, head, lambda n: None))
            shared = ShareRecord.from_dict(json.loads(read_regular(staged, MAX_RECORD_BYTES)))
            shared.check(request.derivation, request.file_name)
            file_name = shared.file_name
            path = variant_path(request.derivation, file_name)
            remote = _retrying(fetch, file_name,
                               lambda: _head(fetch, file_name, path, head.commit))

            def report(done: int) -> None:
                progress(0.1 + 0.85 * min(1.0, done / max(1, shared.size)),
                         f"downloading {file_name} from {request.share}")

            staged, sha256 = _retrying(fetch, file_name,
                                       lambda: _download_one(fetch, scratch, remote, report))
            if sha256 != shared.sha256:
                raise IntegrityError(f"{path} has sha256 {sha256[:12]}, its record says "
                                     f"{shared.sha256[:12]}")
        except (IntegrityError, ValueError) as e:
            detail = f"shared variant at {request.share}@{head.commit[:7]} refused: {_text(e)}"
            return AdoptResult(REFUSED, detail, commit=head.commit)
        except HubError as e:
            return AdoptResult(NONE, f"{where} not downloaded: {e.message}", commit=head.commit)
        # the daemon's derivation, as the request carries it (the record was checked against it)
        record = replace(_publish(model_dir, staged, remote, sha256, fetch),
                         derivation=request.derivation)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    progress(1.0, f"adopted from {request.share}@{head.commit[:7]}")
    return AdoptResult(ADOPTED, f"from {request.share}@{head.commit[:7]}", record=record,
                       commit=head.commit, builder=dict(shared.builder))


def upload(request: UploadRequest, progress: ProgressFn) -> UploadResult:
    """Commit the variant and its record to the share, unless it is there already."""
    if not request.token:
        return UploadResult(DENIED, f"no HF_TOKEN: not sharing it in {request.share} "
                                    "(a token with write access there shares it)")
    record = request.record
    assert record.derivation is not None
    path = Path(request.model_dir) / record.name
    if sha256_file(path) != record.sha256:
        return UploadResult(FAILED, f"{record.name} changed on disk: not shared")
    file_path = variant_path(record.derivation, record.name)
    doc = make_record(record, request.proof, host_kind()).to_dict()
    api = HfApi(endpoint=request.endpoint, token=request.token)
    # The loopback hub speaks the LFS protocol, which the Hub also accepts; Xet needs a CAS.
    hf_constants.HF_HUB_DISABLE_XET = True
    try:
        progress(0.0, f"sharing in {request.share}")
        api.create_repo(request.share, exist_ok=True)
        for _ in range(max(1, request.attempts)):
            info = api.model_info(request.share)
            names = {s.rfilename for s in info.siblings or ()}
            if record_path(record.derivation) in names:
                return UploadResult(ALREADY_SHARED, f"{request.share}@{(info.sha or '')[:7]} "
                                    "already has this variant", info.sha or "", file_path)
            operations = [
                CommitOperationAdd(file_path, str(path)),
                CommitOperationAdd(record_path(record.derivation),
                                   (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())]
            try:
                commit = api.create_commit(
                    request.share, operations, parent_commit=info.sha,
                    commit_message=f"{request.name}: {record.name} ({record.derivation.method})")
            except hf_errors.HfHubHTTPError as e:
                if _status(e) in _STALE_PARENT:
                    continue   # another builder committed first: look again
                raise
            progress(1.0, f"shared in {request.share}@{commit.oid[:7]}")
            return UploadResult(SHARED, f"{request.share}@{commit.oid[:7]}", commit.oid, file_path)
        return UploadResult(FAILED, f"{request.share} kept moving: gave up after "
                                    f"{request.attempts} rounds")
    except hf_errors.HfHubHTTPError as e:
        if _status(e) in (401, 403):
            return UploadResult(DENIED, f"HF_TOKEN may not write to {request.share} "
                                        f"(HTTP {_status(e)}): not sharing it")
        return UploadResult(FAILED, f"{request.share} answered HTTP {_status(e)}: {_text(e)}")
    except Exception as e:  # noqa: BLE001 - network, disk: sharing is optional, never fatal
        return UploadResult(FAILED, f"{request.share} not reached: {type(e).__name__}: {_text(e)}")


def host_kind() -> str:
    """What kind of host proved it: the machine, the CPU model and how many CPUs."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), "")
    except OSError:
        pass
    return f"{platform.machine()} {cpu or platform.processor() or 'cpu'} ({os.cpu_count()} cpus)"


def _fetch_request(request: AdoptRequest) -> FetchRequest:
    return FetchRequest(name=request.name, model_dir=request.model_dir, repo=request.share,
                        filename=record_path(request.derivation), revision=None, labels=None,
                        task="", description="", preprocessing_preset=None, input_size=None,
                        known={}, endpoint=request.endpoint, token=request.token,
                        offline=request.offline, attempts=request.attempts,
                        timeout_s=request.timeout_s, backoff_base_s=0.2)


def _status(e: hf_errors.HfHubHTTPError) -> int | None:
    return e.response.status_code if e.response is not None else None


def _text(e: BaseException) -> str:
    return e.message if isinstance(e, ModeldError) else _one_line(e)
