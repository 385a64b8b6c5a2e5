"""Pure: an action -> the worker request that does it; a worker's result -> the manifest change.

The reconciler calls ``request_for`` before it starts a worker and ``apply`` when the worker is
done (writing the change through ``Store.update_manifest``). No disk, no clock, no processes:
tested in tests/test_handoff.py. The request carries the daemon's derivation and proof basis,
and ``apply`` records the result as it came: nothing computed on one side is overwritten on the
other.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Callable, Mapping

from . import share

from .manifest import FileRecord, Manifest
from .methods import worker_params
from .planning import (CONFIG_FILE, FP32_FILE, LABELS_FILE, Action, Adopt, Derive, PlanContext,
                       Prove, Pull, Share, config_derivation, proof_basis, providers_for)
from .settings import Settings
from .variants import Proof
from .work import (AdoptRequest, AdoptResult, FetchRequest, FetchResult, ProveRequest,
                   QuantizeRequest, QuantizeResult, UploadRequest, UploadResult)

Change = Callable[[Manifest], Manifest]
Request = FetchRequest | QuantizeRequest | ProveRequest | AdoptRequest | UploadRequest


def runtimes_for(settings: Settings, providers: tuple[str, ...]) -> dict[str, str]:
    """provider -> interpreter, for the providers of one job that a node runtime proves."""
    return {p: py for p, py in settings.runtimes.items() if p in providers}


def request_for(action: Pull | Derive | Prove | Adopt | Share, *, model_dir: str,
                settings: Settings, context: PlanContext,
                known: Mapping[str, FileRecord] | None = None, token: str | None = None,
                manifest: Manifest | None = None) -> Request:
    """The request that carries out ``action``. ``known``: the intact records of the model's
    files (a pull trusts their stat); ``token``: the Hub token (HF_TOKEN); ``manifest``: the
    model's manifest (a ``Share`` uploads the record and proof it holds; a ``Prove`` of a
    derived file reads the calibration folder its record's derivation names)."""
    entry = action.entry
    if isinstance(action, Adopt):
        assert entry.quantize is not None and entry.quantize.share
        return AdoptRequest(name=action.name, model_dir=model_dir, share=entry.quantize.share,
                            derivation=action.derivation,
                            file_name=share.file_for(action.derivation),
                            endpoint=settings.hub_endpoint, token=token,
                            offline=settings.hub_offline)
    if isinstance(action, Share):
        assert entry.quantize is not None and entry.quantize.share and manifest is not None
        return UploadRequest(name=action.name, model_dir=model_dir, share=entry.quantize.share,
                             record=manifest.files[action.file_name],
                             proof=manifest.proofs[action.file_name],
                             endpoint=settings.hub_endpoint, token=token)
    if isinstance(action, Pull):
        return FetchRequest(name=action.name, model_dir=model_dir, repo=entry.repo,
                            filename=entry.filename, revision=entry.revision,
                            labels=entry.labels, task=entry.task,
                            description=entry.description,
                            preprocessing_preset=entry.preprocessing_preset,
                            input_size=entry.input_size, known=dict(known or {}),
                            endpoint=settings.hub_endpoint, token=token,
                            offline=settings.hub_offline, attempts=settings.pull_attempts)
    providers = providers_for(entry, context)
    simulated = {k: tuple(v) for k, v in settings.simulated_providers.items()}
    if isinstance(action, Derive):
        spec = entry.quantize
        assert spec is not None
        # the derivation's calibration: the catalog's folder or a generation of field samples
        return QuantizeRequest(name=action.name, model_dir=model_dir, method=spec.method,
                               params=worker_params(spec.method, spec.params),
                               calibration=action.derivation.params.get("calibration"),
                               preprocessing_preset=entry.preprocessing_preset,
                               input_size=entry.input_size, providers=providers,
                               gates=spec.gates, simulated=simulated, task=entry.task or None,
                               runtimes=runtimes_for(settings, providers),
                               derivation=action.derivation, basis=proof_basis(context),
                               serving=action.serving)
    # Calibration data is for comparing a derived variant with FP32. FP32's own proof (does it
    # load and run) never reads it: a broken calibration folder must not un-serve FP32.
    # A derived file is proven on the held-out part of the data it was calibrated with: the
    # catalog's folder, or the generation of field samples its derivation names.
    record = manifest.files.get(action.file_name) if manifest is not None else None
    calibration = None
    if entry.quantize and action.reference_file:
        calibration = (record.derivation.params.get("calibration")
                       if record is not None and record.derivation is not None
                       else entry.quantize.calibration)
    return ProveRequest(model_dir=model_dir, file_name=action.file_name, variant=action.variant,
                        reference_file=action.reference_file, providers=providers,
                        gates=action.gates, calibration=calibration,
                        preprocessing_preset=entry.preprocessing_preset,
                        input_size=entry.input_size, simulated=simulated,
                        task=entry.task or None, runtimes=runtimes_for(settings, providers),
                        basis=proof_basis(context))


def apply(action: Action,
          result: FetchResult | QuantizeResult | Proof | AdoptResult | UploadResult | None
          ) -> Change:
    """The manifest change a finished job makes (the identity for repairs, which change files,
    not records)."""
    if isinstance(action, Pull):
        assert isinstance(result, FetchResult)
        return _pulled(action, result)
    if isinstance(action, Derive):
        assert isinstance(result, QuantizeResult)
        return _derived(action, result)
    if isinstance(action, Prove):
        assert isinstance(result, Proof)
        return _proven(action, result)
    if isinstance(action, (Adopt, Share)):
        assert isinstance(result, (AdoptResult, UploadResult))
        return _shared(action, result)
    return lambda m: m


def _shared(action: Adopt | Share, result: AdoptResult | UploadResult) -> Change:
    """The share's outcome is remembered (so nothing is asked twice until a reload or sync);
    an adopted file is published like a pulled one, with the daemon's derivation."""
    outcome = {f.name: getattr(result, f.name) for f in fields(result) if f.name != "record"}
    if isinstance(action, Adopt):
        key = share.adopt_key(action.derivation)
        record = result.record if isinstance(result, AdoptResult) else None
    else:
        key, record = share.upload_key(action.sha256), None

    def change(m: Manifest) -> Manifest:
        m = m.with_share(key, outcome)
        return m.with_file(record) if record is not None else m
    return change


def _pulled(action: Pull, result: FetchResult) -> Change:
    records = {r.name: r for r in result.files}

    def change(m: Manifest) -> Manifest:
        for record in records.values():
            if record.name == CONFIG_FILE:
                continue
            m = m.with_file(record)
        config = records.get(CONFIG_FILE)
        fp32 = m.files.get(FP32_FILE)
        if config is not None and fp32 is not None:
            # config.json's derivation names the FP32 and labels records just written
            derivation = config_derivation(action.entry, fp32, m.files.get(LABELS_FILE))
            m = m.with_file(replace(config, derivation=derivation))
        return m
    return change


def _derived(action: Derive, result: QuantizeResult) -> Change:
    record, proof = result.record, result.proof
    if record is None:   # withheld: the variant serving now stays; these inputs are not retried
        again = result.serving_proof

        def withheld(m: Manifest) -> Manifest:
            m = m.with_failure(action.derivation.key(), result.withheld)
            serving = m.files.get(action.serving.file_name) if action.serving else None
            if again is not None and serving is not None and serving.sha256 == again.file_sha256:
                m = m.with_proof(serving.name, again)   # judged on the newer samples too
            return m
        return withheld

    def change(m: Manifest) -> Manifest:
        m = m.with_file(record).with_failure(action.derivation.key(), None)
        if m.files.get(FP32_FILE) is not None and proof.file_sha256 == record.sha256:
            m = m.with_proof(record.name, proof)
        return m
    return change


def _proven(action: Prove, proof: Proof) -> Change:
    def change(m: Manifest) -> Manifest:
        record = m.files.get(action.file_name)
        if record is None or record.sha256 != proof.file_sha256:
            return m  # the file changed while it was being proven: the next pass re-plans
        return m.with_proof(action.file_name, proof)
    return change
