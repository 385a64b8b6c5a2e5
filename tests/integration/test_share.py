"""Build once, prove everywhere (issue 15): real daemons on their own models/ folders and one
loopback hub. A builder quantizes, proves and shares; another robot with the same entry serves
the same bytes without quantizing, after proving them itself; damage, a host whose provider
cannot run the variant, two builders at once and a missing token each end as the README says."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from modeld.atomic import sha256_file
from modeld.testing.hub import LocalHub
from modeld.testing.onnx_models import matmul_mlp
from tests.support.daemon import DaemonProcess, variant_is, wait_event
from tests.support.workspace import Workspace, entry_toml

TOKEN = "hf_fleet_writer"
SHARE = "fleet/variants"
RACE = "fleet/race"
DAMAGED = "fleet/damaged"
COREML = "CoreMLExecutionProvider"


def shared_entry(share: str = SHARE) -> str:
    return (entry_toml("mlp", repo="acme/mlp", filename="mlp.onnx", labels=None,
                       quantize="dynamic_int8")
            + f'allow_slower = true\nshare = "{share}"\n')


def events(daemon: DaemonProcess) -> list[dict]:
    out = []
    for line in Path(daemon.log_path).read_text(errors="replace").splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and "event" in doc:
            out.append(doc)
    return out


def jobs_run(daemon: DaemonProcess, job: str) -> list[dict]:
    return [e for e in events(daemon) if e["event"] == "job_started" and e.get("job") == job]


def wait_for(predicate, what: str, daemon: DaemonProcess, timeout_s: float = 60):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"no {what} in {timeout_s} s:\n{daemon.log()}")


def upload_outcome(ws: Workspace) -> dict | None:
    try:
        shares = ws.manifest("mlp").get("shares") or {}
    except (OSError, ValueError):
        return None
    return next((v for k, v in shares.items() if k.startswith("upload:")), None)


class Robot:
    """One robot: its own catalog and models/, the fleet's hub, a daemon."""

    def __init__(self, root: Path, hub: LocalHub, **env: str) -> None:
        root.mkdir(parents=True)
        self.ws = Workspace(root=root, hub=hub, endpoint=hub.endpoint)
        self.daemon = DaemonProcess(self.ws, env=env)

    def serving(self, variant: str, timeout_s: float = 150, **options) -> dict:
        with self.daemon.subscribe("mlp", prefer="int8", node="n", **options) as sub:
            return wait_event(sub, variant_is("mlp", variant), timeout_s=timeout_s,
                              daemon=self.daemon)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """One hub serving ``acme/mlp`` and every robot of this module, started together where
    they do not depend on each other (2 cores: the wall time is what matters): the builder,
    two racing builders and a builder without a token first; once the builder has shared its
    INT8, a consumer, a host whose provider cannot run it, and a robot whose share holds a
    damaged copy."""
    root = tmp_path_factory.mktemp("fleet")
    hub = LocalHub(root / "hub", write_tokens=[TOKEN]).start()
    hub.store.create_repo("acme/mlp")
    hub.store.commit("acme/mlp", {"mlp.onnx": matmul_mlp()})
    robots: dict[str, Robot] = {}

    def robot(name: str, share: str = SHARE, **env: str) -> Robot:
        robots[name] = Robot(root / name, hub, **env)
        robots[name].ws.write_catalog(shared_entry(share))
        robots[name].daemon.start(wait=False)
        return robots[name]

    try:
        builder = robot("builder", HF_TOKEN=TOKEN)
        for i in range(2):
            robot(f"racer{i}", RACE, HF_TOKEN=TOKEN)
        robot("lone", "fleet/nobody")                             # no HF_TOKEN
        for r in robots.values():
            r.daemon.wait_listening()
        built = builder.serving("int8")
        shared = wait_for(lambda: upload_outcome(builder.ws), "upload", builder.daemon)
        assert shared["outcome"] == "shared", shared
        # a share whose copy of the variant rotted in the hub's storage
        folder = shared["path"].rsplit("/", 1)[0]
        hub.store.commit(DAMAGED, {p: hub.store.blob(SHARE, shared["commit"], p).blob
                                   for p in (shared["path"], f"{folder}/record.json")})
        blob = hub.store.blob(DAMAGED, hub.store.resolve(DAMAGED, "main"), shared["path"]).blob
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0xFF
        blob.write_bytes(bytes(data))
        robot("consumer")                                         # no HF_TOKEN: it only reads
        # The suite's only stand-in: a provider that cannot exist here (CoreML), simulated by
        # refusing the INT8's operators on it (MODELD_SIMULATE_PROVIDERS): a host whose gates
        # the shared variant fails.
        robot("coreml", MODELD_PROVIDERS=COREML,
              MODELD_SIMULATE_PROVIDERS=f"{COREML}=MatMulInteger,DynamicQuantizeLinear")
        robot("fresh", DAMAGED)
        for r in robots.values():
            r.daemon.wait_listening()
        yield hub, robots, built, shared
    finally:
        for r in robots.values():
            r.daemon.stop()
        hub.stop()


def test_the_builder_shares_what_it_built_and_proved(fleet):
    hub, robots, built, shared = fleet
    builder = robots["builder"]
    assert shared["outcome"] == "shared", shared
    record_file = hub.store.blob(SHARE, shared["commit"], shared["path"].rsplit("/", 1)[0]
                                 + "/record.json")
    record = json.loads(record_file.blob.read_bytes())
    fp32 = builder.ws.manifest("mlp")["files"]["model.onnx"]["sha256"]
    assert record["sha256"] == built["sha256"] and record["source_sha256"] == fp32
    assert record["derivation"]["method"] == "dynamic_int8" and record["recipes"]
    assert record["derivation"]["onnxruntime"] and record["derivation"]["onnx"]
    cpu = record["builder"]["providers"][0]
    assert cpu["provider"] == "CPUExecutionProvider" and cpu["passed"] and cpu["speedup"]
    assert record["builder"]["host"]
    assert hub.store.blob(SHARE, shared["commit"], shared["path"]).sha256 == built["sha256"]
    assert len(jobs_run(builder.daemon, "quantizing")) == 1


def test_another_robot_serves_the_shared_bytes_without_quantizing(fleet):
    hub, robots, built, shared = fleet
    consumer = robots["consumer"]
    told = consumer.serving("int8")
    assert told["sha256"] == built["sha256"]
    assert sha256_file(Path(told["path"])) == built["sha256"]
    assert jobs_run(consumer.daemon, "quantizing") == []        # no quantize worker ran
    assert len(jobs_run(consumer.daemon, "adopting")) == 1
    manifest = consumer.ws.manifest("mlp")
    record = manifest["files"]["model-int8.onnx"]
    assert record["provenance"]["repo"] == SHARE
    assert record["provenance"]["commit"] == shared["commit"]
    proof = manifest["proofs"]["model-int8.onnx"]                # its own proof, on this host
    assert proof["file_sha256"] == built["sha256"]
    assert proof["providers"][0]["passed"] and proof["providers"][0]["latency_ms"]
    # status says where it came from and what this host measured
    status = consumer.daemon.status()["models"]["mlp"]
    came = status["detail"]["shared"]
    assert came["repo"] == SHARE and came["commit"] == shared["commit"]
    assert came["measured_here"]["CPUExecutionProvider"]["passed"]
    assert came["builder"]["host"]
    text = consumer.ws.cli("status").stdout
    assert f"from the share {SHARE}@{shared['commit'][:7]}" in text
    # a consumer that has no token never tries to write
    assert upload_outcome(consumer.ws) is None


def test_a_variant_this_hosts_provider_cannot_run_is_not_served_here(fleet):
    hub, robots, built, shared = fleet
    other = robots["coreml"]
    wait_for(lambda: jobs_run(other.daemon, "quantizing"), "own build", other.daemon, 150)
    told = other.serving("fp32", providers=[COREML])
    assert told["sha256"] != built["sha256"]
    proof = wait_for(lambda: other.ws.manifest("mlp")["proofs"].get("model-int8.onnx"),
                     "int8 proof", other.daemon)
    assert proof["providers"][0]["provider"] == COREML
    assert not proof["providers"][0]["passed"]               # neither the shared one nor its own
    assert len(jobs_run(other.daemon, "adopting")) == 1      # it looked in the share first


def test_two_builders_at_once_leave_one_valid_commit(fleet):
    hub, robots, *_ = fleet
    racers = [robots["racer0"], robots["racer1"]]
    told = [r.serving("int8") for r in racers]

    def outcome(r: Robot) -> dict | None:
        adopted = r.ws.manifest("mlp")["files"]["model-int8.onnx"].get("provenance")
        return {"outcome": "adopted"} if adopted else upload_outcome(r.ws)

    outcomes = [wait_for(lambda r=r: outcome(r), "share outcome", r.daemon) for r in racers]
    assert sorted(o["outcome"] for o in outcomes) in (
        ["already_shared", "shared"], ["adopted", "shared"]), outcomes
    commits = [r for r in hub.log.records("POST", f"/api/models/{RACE}/commit/*")
               if r.status == 200]
    assert len(commits) == 1
    head = hub.store.resolve(RACE, "main")
    files = hub.store.files(RACE, head)
    records = [p for p in files if p.endswith("/record.json")]
    assert len(records) == 1
    record = json.loads(hub.store.blob(RACE, head, records[0]).blob.read_bytes())
    model = hub.store.blob(RACE, head, records[0].replace("record.json", record["file_name"]))
    assert model.sha256 == record["sha256"] == sha256_file(model.blob)
    assert record["sha256"] in {t["sha256"] for t in told}


def test_a_shared_file_damaged_in_the_hub_is_refused_and_built_here(fleet):
    hub, robots, built, shared = fleet
    fresh = robots["fresh"]
    told = fresh.serving("int8")
    assert told["sha256"] == built["sha256"]                     # its own, deterministic build
    assert len(jobs_run(fresh.daemon, "quantizing")) == 1
    refused = [e for e in events(fresh.daemon) if e["event"] == "share_refused"]
    assert len(refused) == 1 and "ETag" in refused[0]["detail"], refused
    assert fresh.ws.manifest("mlp")["files"]["model-int8.onnx"].get("provenance") is None


def test_a_builder_without_a_write_token_says_so_once_and_keeps_serving(fleet):
    hub, robots, *_ = fleet
    lone = robots["lone"]
    told = lone.serving("int8")
    outcome = wait_for(lambda: upload_outcome(lone.ws), "upload outcome", lone.daemon)
    assert outcome["outcome"] == "denied" and "HF_TOKEN" in outcome["detail"]
    lines = [e for e in events(lone.daemon) if e["event"] == "not_shared"]
    assert len(lines) == 1, lines
    assert lone.serving("int8")["sha256"] == told["sha256"]
    assert hub.store.access("fleet/nobody") is None              # nothing was written
