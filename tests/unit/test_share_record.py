"""The share's pure parts (issue 15): the repo layout, what a record must match, outcomes in
the manifest, and the catalog's ``share`` option. No disk, no onnx."""

from __future__ import annotations

from dataclasses import replace

import pytest

from modeld.catalog import parse_catalog
from modeld.errors import CatalogError, IntegrityError
from modeld.manifest import FileRecord, Manifest
from modeld.share import (ADOPTED, RECORD_FILE, ShareRecord, file_for, make_record, record_path,
                          variant_folder)
from modeld.variants import INT8, Derivation, Proof, ProviderProof

DERIVATION = Derivation(source_sha256="f" * 64, method="dynamic_int8",
                        params={"recipes": "4", "per_channel": False}, onnx="1.0",
                        onnxruntime="1.2")
RECORD = FileRecord("model-int8.onnx", "8" * 64, 10, 1, 1, derivation=DERIVATION)
PROOF = Proof(variant=INT8, file_sha256="8" * 64, key="k", checker_ok=True, providers=(
    ProviderProof("CPUExecutionProvider", usable=True, passed=True, speedup=2.5),))


def test_the_layout_is_keyed_by_source_and_derivation():
    d = DERIVATION
    assert variant_folder(d.source_sha256, d.key()) == f"variants/{'f' * 16}/{d.key()}"
    assert record_path(d).endswith(f"/{d.key()}/{RECORD_FILE}")
    assert file_for(d) == "model-int8.onnx"
    assert file_for(replace(d, method="auto")) is None


def test_a_record_matches_only_the_same_source_and_derivation():
    r = RECORD
    record = make_record(r, PROOF, "x86_64 test (2 cpus)")
    again = ShareRecord.from_dict(record.to_dict())
    again.check(r.derivation, "model-int8.onnx")
    assert again.builder["providers"][0]["provider"] == "CPUExecutionProvider"
    with pytest.raises(IntegrityError, match="FP32"):
        again.check(replace(r.derivation, source_sha256="0" * 64), None)
    with pytest.raises(IntegrityError, match="derivation"):
        again.check(replace(r.derivation, params={**r.derivation.params, "recipes": "0"}), None)
    lying = ShareRecord.from_dict(record.to_dict() | {"derivation_key": "0" * 32})
    with pytest.raises(IntegrityError, match="derivation"):
        lying.check(r.derivation, None)
    with pytest.raises(IntegrityError, match="a derived variant"):
        ShareRecord.from_dict(record.to_dict() | {"file_name": "model.onnx"}).check(
            r.derivation, None)
    with pytest.raises(IntegrityError):
        ShareRecord.from_dict({"schema": 99})


def test_share_outcomes_round_trip_through_the_manifest():
    m = Manifest(name="m").with_share("adopt:k", {"outcome": ADOPTED, "commit": "c" * 40})
    back = Manifest.from_json(m.to_json(), name=m.name)
    assert back.shares == {"adopt:k": {"outcome": ADOPTED, "commit": "c" * 40}}
    assert b"shares" not in Manifest(name="m").to_json()     # absent without a share


@pytest.mark.parametrize("value", ['"fleet"', '"a/b/c"', "3", '"../x"'])
def test_a_bad_share_is_one_catalog_error(value):
    text = f'''[[models]]
name = "m"
repo = "acme/m"
filename = "m.onnx"
[models.quantize]
method = "dynamic_int8"
share = {value}
'''
    catalog = parse_catalog(text)
    error = catalog.entries["m"].quantize_error
    assert isinstance(error, CatalogError)
    assert "quantize.share" in str(error) and "\n" not in str(error)
