"""``rejections.Rejections``: the one record of nodes' rejections, shared by the server (adds,
asks per node) and the reconciler (restores, forgets). Pure: no sockets, no disk."""

from __future__ import annotations

from modeld.rejections import Rejection, Rejections


def rejection(node: str, sha: str = "a" * 64, provider: str = "CPUExecutionProvider",
              model: str = "det") -> Rejection:
    return Rejection(model=model, variant="int8", sha256=sha, provider=provider, node=node,
                     error="no", generation=1, at_unix_s=0.0, revision="1")


def test_a_rejection_is_per_node_and_added_once():
    record = Rejections()
    assert record.add([rejection("n1")]) == [rejection("n1")]
    assert record.add([rejection("n1")]) == []                   # the same nack again
    assert record.of_node("n1") == {("a" * 64, "CPUExecutionProvider")}
    assert record.of_node("n2") == frozenset()
    assert record.providers_of("a" * 64) == ["CPUExecutionProvider"] and len(record) == 1


def test_whoever_forgets_a_rejection_the_watchers_offer_those_models_again():
    record = Rejections()
    told: list[set[str]] = []
    record.watch(told.append)
    record.add([rejection("n1"), rejection("n2", model="seg", sha="b" * 64)])
    gone = record.forget(lambda r: r.model == "det")
    assert [r.node for r in gone] == ["n1"] and told == [{"det"}]
    assert record.of_node("n1") == frozenset() and record.of_node("n2")
    record.forget(tell=False)
    assert told == [{"det"}] and len(record) == 0 and not record
    assert record.forget() == [] and told == [{"det"}]           # nothing forgotten: no news


def test_a_persisted_record_reads_back():
    r = rejection("n1")
    record = {"model": r.model, "variant": r.variant, "sha256": r.sha256, "provider": r.provider,
              "node": r.node, "error": r.error, "revision": r.revision, "at_unix_s": 0}
    assert Rejection.from_record(record) == Rejection(**{**record, "generation": 0,
                                                         "at_unix_s": 0.0})
