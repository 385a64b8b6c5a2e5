"""Local damage racing a pull, found by the soak: the model file here changes while the fetch
worker writes config.json. That is a local fault, worth retrying (the next pass sees the damage
and downloads again), not an upstream "this is not an ONNX model" that is never retried.

Deterministic stand-in for the race: the bytes rot under an unchanged stat (size, mtime, inode),
so the worker reuses the file without hashing it and only finds out when it parses it.
"""

from __future__ import annotations

import os

import pytest

from modeld.errors import IntegrityError, StoreError, TemporaryError
from modeld.workers.fetch import fetch_model
from tests.support.hub import fetch_request, publish, records_of

pytestmark = pytest.mark.faults


def _rot_keeping_stat(path) -> None:
    st = os.stat(path)
    with open(path, "r+b") as f:          # same inode, same size
        f.write(b"\xff" * st.st_size)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_model_damaged_during_a_pull_is_a_temporary_error(hub, model_dir):
    publish(hub)
    first = fetch_model(fetch_request(hub.endpoint, model_dir), lambda *a: None)
    (model_dir / "config.json").unlink()          # so the next pull describes the model again
    _rot_keeping_stat(model_dir / "model.onnx")
    with pytest.raises(TemporaryError) as caught:
        fetch_model(fetch_request(hub.endpoint, model_dir, known=records_of(first)),
                    lambda *a: None)
    assert isinstance(caught.value, IntegrityError)
    assert not isinstance(caught.value, StoreError)
    assert "changed on disk" in str(caught.value)


def test_an_intact_model_that_does_not_parse_stays_a_permanent_error(hub, model_dir):
    """The other side of the line: upstream content that is not ONNX is refused for good."""
    publish(hub, model=b"not an onnx model at all" * 10)
    with pytest.raises(StoreError, match="not an ONNX model"):
        fetch_model(fetch_request(hub.endpoint, model_dir), lambda *a: None)
