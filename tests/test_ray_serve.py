"""Scale-out on Ray Serve (server/scaleout): two engine replicas of the tiny random LLaMA behind
one ingress, on a local Ray cluster bound to 127.0.0.1 (no dashboard), shut down at the end.

The first tests need no Ray: the CLI and the app never import it without --replicas, the
snapshot merge, the read-only registry view the replicas use, the errors sent as data. The rest
share one cluster (module fixture): the official openai client through the ingress, outputs
equal to the single-process server's, adapter affinity (the x-prolora-replica header), upload /
delete / re-upload reaching both replicas, a disconnect aborting on the replica, the dashboard
and /metrics per replica, and a replica killed with SIGKILL (restarted by Ray, registry intact).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from prolora_serve.server.config import ServerConfig
from test_server_api import ADAPTER_CONFIGS, PROMPT, tiny_config, upload, write_adapter

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20
CLUSTER_START_S = 240  # ray.init + two replicas loading the model + the ingress
RECOVERY_S = 120  # a killed replica restarted and serving again


# --- without Ray ------------------------------------------------------------------------------
def test_app_and_cli_do_not_import_ray_without_replicas(tmp_path) -> None:
    code = f"""
import sys
from prolora_serve.server import cli
from prolora_serve.server.api.app import create_app
args = cli.build_parser().parse_args(["serve", "--adapter-dir", {str(tmp_path)!r}])
config = cli.server_config(args)
assert config.scaleout.replicas is None
create_app(config)
assert "ray" not in sys.modules, sorted(m for m in sys.modules if m.startswith("ray"))
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_replicas_without_ray_installed_is_a_clear_error(monkeypatch, capsys) -> None:
    from prolora_serve.server import cli

    for name in [m for m in sys.modules if m.startswith("prolora_serve.server.scaleout.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ModuleNotFoundError
    assert cli.main(["serve", "--replicas", "2", "--log-level", "warning"]) == 2
    assert "pip install 'prolora-serve[ray]'" in capsys.readouterr().err


def test_scaleout_options_are_declared_once() -> None:
    config = ServerConfig.from_options(replicas=2, replica_cpus="0.5", ray_address="auto")
    assert (config.scaleout.replicas, config.scaleout.replica_cpus) == (2, 0.5)
    assert config.scaleout.ray_object_store_memory == 200 * MiB
    for bad in ({"replicas": 0}, {"replica_cpus": 0}, {"replica_cpus": "x"},
                {"replica_max_adapters": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ServerConfig.from_options(**bad)


def _replica_snapshot(waiting: int, resident: list[tuple[str, int, float]], loads: int):
    """One replica's EngineSnapshot: ``resident`` as (adapter id, in use, last used)."""
    from prolora_serve.server.engine.client import EngineSnapshot
    from prolora_serve.server.engine.engine import EngineStats
    from prolora_serve.server.engine.residency import AdapterCacheStats, LoadTimes, ResidentAdapterInfo
    from prolora_serve.server.engine.scheduler import AdapterTraffic

    times = LoadTimes()
    times.observe(0.01 * loads)
    cache = AdapterCacheStats(100, 10 * len(resident), len(resident), 0, 5, 1, loads, 0,
                              load_times={"a": times})
    stats = EngineStats(num_waiting=waiting, num_running=1, last_batch_size=1,
                        last_batch_tokens=1, kv_blocks_total=64, kv_blocks_used=waiting,
                        kv_blocks_cached=0, prefix_cache_hits=0, prefix_cache_queries=0,
                        kv_cache_bytes=1000, base_model_bytes=500, adapter_cache=cache,
                        num_requests=3, num_finished=2, num_aborted=0, num_preemptions=0,
                        num_steps=7, prompt_tokens=10, generated_tokens=20,
                        schedule_seconds=0.5, forward_seconds=1.0, postprocess_seconds=0.25)
    infos = [ResidentAdapterInfo(i, 10, 5, t, n, {"r": 2}) for i, n, t in resident]
    traffic = {"a": AdapterTraffic(requests=2, running=1), None: AdapterTraffic(requests=1)}
    return EngineSnapshot(stats, infos, traffic)


def test_merged_snapshot_sums_replicas_and_keeps_each() -> None:
    from prolora_serve.server.scaleout.aggregate import merge_snapshots

    part = _replica_snapshot
    one, two = part(2, [("a", 1, 5.0)], 1), part(3, [("a", 0, 9.0), ("b", 2, 1.0)], 2)
    merged = merge_snapshots({"r1": one, "r2": two})
    assert merged.replicas == {"r1": one, "r2": two}
    assert merged.stats.num_waiting == 5 and merged.stats.kv_blocks_total == 128
    assert merged.stats.forward_seconds == 2.0 and merged.stats.generated_tokens == 40
    assert merged.stats.adapter_cache.loads == 3 and merged.stats.adapter_cache.budget_bytes == 200
    assert merged.stats.adapter_cache.load_times["a"].count == 2
    resident = {info.adapter_id: info for info in merged.resident}
    assert set(resident) == {"a", "b"} and resident["a"].in_use == 1 and resident["a"].last_used == 9.0
    assert merged.adapters["a"].requests == 4 and merged.adapters[None].requests == 2
    assert one.resident[0].in_use == 1  # the parts are not changed


def test_dashboard_state_and_metrics_show_each_replica() -> None:
    from prolora_serve.server.api.dashboard import dashboard_state
    from prolora_serve.server.api.metrics import ScrapeState, ServerMetrics
    from prolora_serve.server.engine.client import KernelBackends, ModelInfo
    from prolora_serve.server.scaleout.aggregate import merge_snapshots

    merged = merge_snapshots({"r1": _replica_snapshot(2, [("a", 1, 5.0)], 1),
                              "r2": _replica_snapshot(3, [("b", 0, 9.0), ("a", 0, 1.0)], 2)})
    model = ModelInfo("m", 256, None, 500, {}, KernelBackends("cpu", "cpu"))
    state = dashboard_state(model, merged, None)
    assert [r["id"] for r in state["replicas"]] == ["r1", "r2"]
    assert state["replicas"][1]["resident"] == ["b", "a"]  # most recently used first
    assert state["replicas"][1]["scheduler"] == {"num_waiting": 3, "num_running": 1}
    assert state["replicas"][0]["adapter_cache"]["loads"] == 1
    assert state["scheduler"]["num_waiting"] == 5 and state["kv_cache"]["kv_blocks_total"] == 128
    assert dashboard_state(model, _replica_snapshot(0, [], 0), None)["replicas"] == []  # in process
    metrics = ServerMetrics()
    text = metrics.render(ScrapeState(stats=merged.stats, replicas={
        rid: part.stats for rid, part in merged.replicas.items()})).decode()
    assert 'prolora_replica_queue_depth{replica="r2"} 3.0' in text
    assert 'prolora_replica_adapter_cache_loads_total{replica="r1"} 1.0' in text
    assert "prolora_queue_depth 5.0" in text


def test_registry_reader_sees_another_writers_commits_and_never_writes(tmp_path) -> None:
    from prolora_serve.adapters.config import ProLoRAConfig
    from prolora_serve.adapters.registry import AdapterNotFoundError, AdapterRegistry, RegistryReader

    shapes = {"model.layers.0.self_attn.q_proj": (16, 16), "model.layers.0.self_attn.v_proj": (16, 8)}
    config = ProLoRAConfig(r=2, unshared_r=2, reduce_lora_A_x=1, reduce_lora_B_x=1, lora_alpha=4,
                           target_modules=("q_proj", "v_proj"), peft_type="LORA")
    writer = AdapterRegistry(tmp_path / "store", shapes)
    reader = RegistryReader(tmp_path / "store", shapes)
    (tmp_path / "store" / ".staging" / "in-flight").write_text("an upload being written")
    (tmp_path / "store" / ".pending" / "zeta").write_text("")
    assert not reader.has_adapter("one") and "one" not in reader and reader.version("../x") is None
    with pytest.raises(AdapterNotFoundError):
        reader.load_adapter("one")
    writer.register_path("one", write_adapter(tmp_path / "one.safetensors", config, shapes, 0))
    assert reader.has_adapter("one") and reader.load_adapter("one").num_params > 0
    first = reader.version("one")
    assert [r.adapter_id for r in reader.records()] == ["one"]
    writer.delete("one")
    assert reader.version("one") is None
    with pytest.raises(AdapterNotFoundError):
        reader.load_adapter("one")
    writer.register_path("one", write_adapter(tmp_path / "one-b.safetensors", config, shapes, 1))
    assert reader.version("one") not in (None, first)  # a re-upload is a new version
    RegistryReader(tmp_path / "store", shapes)  # opening a reader settles nothing
    assert (tmp_path / "store" / ".staging" / "in-flight").exists()
    assert (tmp_path / "store" / ".pending" / "zeta").exists()


def test_replica_errors_travel_as_data_with_their_fields() -> None:
    import pickle

    from prolora_serve.adapters.registry import AdapterNotFoundError
    from prolora_serve.server.engine.errors import GrammarError, InvalidTokenIdError
    from prolora_serve.server.scaleout.protocol import ReplicaFailed

    for error in (GrammarError("bad schema", param="response_format"),
                  InvalidTokenIdError("token 99999", "logit_bias"),
                  AdapterNotFoundError("adapter 'x' does not exist")):
        rebuilt = pickle.loads(pickle.dumps(ReplicaFailed.of(error))).rebuild()
        assert type(rebuilt) is type(error) and str(rebuilt) == str(error)
        assert getattr(rebuilt, "param", None) == getattr(error, "param", None)


class _FakeStream:
    """A DeploymentResponseGenerator stand-in: yields ``items``, raising any exception among them."""

    def __init__(self, items: list) -> None:
        self.items, self.cancelled = list(items), False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.items:
            raise StopAsyncIteration
        item = self.items.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        self.cancelled = True


class _FakeHandle:
    """The replicas' handle: each ``generate.remote`` call gets the next scripted stream."""

    def __init__(self, scripts: list[list]) -> None:
        self.scripts, self.streams, self.options_seen = list(scripts), [], []
        self.generate = self

    def options(self, **options):
        self.options_seen.append(options)
        return self

    def remote(self, *args):
        self.streams.append(_FakeStream(self.scripts.pop(0)))
        return self.streams[-1]


def _output(text: str, finished: bool):
    from prolora_serve.server.engine.engine import RequestOutput

    return RequestOutput("r", text, [1], finished, "length" if finished else None, [], [1], None, 1, 1)


def _ray_client(handle):
    pytest.importorskip("ray")
    from prolora_serve.server.scaleout.protocol import ReplicaDescription
    from prolora_serve.server.scaleout.ray_client import RayEngineClient

    client = RayEngineClient(handle, ReplicaDescription(model=None, tokenizer=None), retries=2)
    client.start()
    return client


def _collect(client, adapter_id=None) -> list[str]:
    import asyncio

    from prolora_serve.server.engine.sampling import SamplingParams

    async def run():
        return [o.text async for o in client.generate("r", [1], SamplingParams(max_tokens=2), adapter_id)]
    return asyncio.run(run())


def test_a_replica_gone_before_streaming_is_retried_after_is_a_503(monkeypatch) -> None:
    pytest.importorskip("ray")
    from ray.exceptions import ActorDiedError

    from prolora_serve.server.scaleout import ray_client

    monkeypatch.setattr(ray_client, "RETRY_BACKOFF_S", 0.0)

    from prolora_serve.adapters.registry import AdapterNotFoundError
    from prolora_serve.server.scaleout.protocol import ReplicaFailed, ReplicaStarted
    from prolora_serve.server.scaleout.ray_client import ReplicaUnavailableError

    started = ReplicaStarted("r1")
    handle = _FakeHandle([[started, ActorDiedError()], [ReplicaStarted("r2"), _output("a", False), _output("b", True)]])
    assert _collect(_ray_client(handle), "alpha") == ["a", "b"]  # resent: nothing had streamed
    assert {"multiplexed_model_id": "alpha"} in handle.options_seen
    assert not handle.streams[1].cancelled

    handle = _FakeHandle([[started, _output("a", False), ActorDiedError()]])
    with pytest.raises(ReplicaUnavailableError, match="replica r1 stopped while serving"):
        _collect(_ray_client(handle))
    handle = _FakeHandle([[started, ActorDiedError()]] * 3)
    with pytest.raises(ReplicaUnavailableError):
        _collect(_ray_client(handle))
    assert len(handle.streams) == 3  # the first try and two retries

    error = ReplicaFailed.of(AdapterNotFoundError("adapter 'x' does not exist"))
    with pytest.raises(AdapterNotFoundError, match="'x' does not exist"):
        _collect(_ray_client(_FakeHandle([[started, error]])))


# --- one cluster: two replicas and the ingress ------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until(condition, timeout_s: float, what: str, poll_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = condition()
            if last:
                return last
        except Exception as err:  # noqa: BLE001 - not yet
            last = err
        time.sleep(poll_s)
    raise AssertionError(f"{what}: not within {timeout_s} s (last: {last!r})")


@pytest.fixture(scope="module")
def adapter_files(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    from prolora_serve.adapters.accounting import ModelShape

    root = tmp_path_factory.mktemp("ray-adapters")
    shapes = ModelShape.from_model_dir(tiny_llama_dir).linear_shapes()
    files = {name: write_adapter(root / f"{name}.safetensors", config, shapes, seed)
             for seed, (name, config) in enumerate(ADAPTER_CONFIGS.items())}
    for name, seed in (("delta", 11), ("delta-new", 12)):  # the same id's old and new weights
        files[name] = write_adapter(root / f"{name}.safetensors", ADAPTER_CONFIGS["alpha"], shapes, seed)
    return files


@pytest.fixture(scope="module")
def reference(live_server, tiny_llama_dir, tmp_path_factory, adapter_files):
    """The single-process server on the same model and adapters (both versions of delta)."""
    server = live_server(tiny_config(tiny_llama_dir, tmp_path_factory.mktemp("ref") / "adapters"))
    for name in ("alpha", "beta", "gamma", "delta", "delta-new"):
        assert upload(server.url, name, adapter_files[name]).status_code == 201
    yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    server.stop()


class Cluster:
    def __init__(self, url: str, config: ServerConfig, deploy, model_dir: Path) -> None:
        from transformers import AutoTokenizer

        self.url, self.config, self.deploy = url, config, deploy
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        self.prompt_ids = AutoTokenizer.from_pretrained(model_dir).encode(PROMPT)
        self.start_seconds = 0.0

    def identities(self) -> list:
        handle = self.deploy.replicas_handle()
        return sorted(handle.broadcast("identify").results(timeout_s=60), key=lambda i: i.replica_id)

    def on_every_replica(self, adapter_id: str | None, max_tokens: int = 12) -> dict[str, object]:
        """Each replica's greedy text (or error) for PROMPT, bypassing the router."""
        from prolora_serve.server.engine.sampling import SamplingParams
        from prolora_serve.server.scaleout.protocol import ReplicaFailed

        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        results = self.deploy.replicas_handle().broadcast(
            "complete", f"direct-{time.monotonic_ns()}", self.prompt_ids, params, adapter_id
        ).results(timeout_s=60)
        return {rid: out.rebuild() if isinstance(out, ReplicaFailed) else out for rid, out in results}


@pytest.fixture(scope="module")
def cluster(tiny_llama_dir, tmp_path_factory, adapter_files):
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        pytest.skip("Ray is not installed (the ray extra)")
    from prolora_serve.server.scaleout import deploy

    port = _free_port()
    config = tiny_config(tiny_llama_dir, tmp_path_factory.mktemp("ray") / "adapters", replicas=2,
                         replica_cpus=0.5, port=port, threads=1, log_level="warning")
    started = time.monotonic()
    try:
        deploy.run(config, num_cpus=2)
        cluster = Cluster(f"http://127.0.0.1:{port}", config, deploy, tiny_llama_dir)
        _wait_until(lambda: httpx.get(f"{cluster.url}/health", timeout=5).status_code == 200,
                    CLUSTER_START_S, "the ingress is healthy")
        cluster.start_seconds = time.monotonic() - started
        for name in ("alpha", "beta", "gamma"):
            response = upload(cluster.url, name, adapter_files[name])
            assert response.status_code == 201, response.text
        yield cluster
    finally:
        deploy.stop()


def greedy(client: openai.OpenAI, model: str, max_tokens: int = 12):
    """A greedy completion with its raw response (headers)."""
    return client.completions.with_raw_response.create(
        model=model, prompt=PROMPT, max_tokens=max_tokens, temperature=0,
        extra_body={"ignore_eos": True})


def _text(raw) -> str:
    return raw.parse().choices[0].text


@pytest.mark.ray
def test_serve_replicas_command_end_to_end(tiny_llama_dir, tmp_path, adapter_files) -> None:
    """``prolora-serve serve --replicas 2`` as a user runs it: --register, both replicas, the
    header, Ctrl-C stops Serve and the cluster (exit 0). Runs before the module's cluster."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        pytest.skip("Ray is not installed (the ray extra)")
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "demo-a.safetensors").write_bytes(adapter_files["alpha"].read_bytes())
    port = _free_port()
    command = [str(Path(sys.executable).with_name("prolora-serve")), "serve", "--replicas", "2",
               "--replica-cpus", "0.5", "--model", str(tiny_llama_dir), "--dtype", "fp32",
               "--port", str(port), "--adapter-dir", str(tmp_path / "store"), "--register", str(demo),
               "--kv-cache-memory", "8MiB", "--adapter-memory", "8MiB", "--threads", "1",
               "--log-level", "warning"]
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until(lambda: process.poll() is None and
                    httpx.get(f"{url}/health", timeout=5).status_code == 200,
                    CLUSTER_START_S, "serve --replicas became healthy")
        assert [a["id"] for a in httpx.get(f"{url}/adapters", timeout=30).json()["data"]] == ["demo-a"]
        response = httpx.post(f"{url}/v1/completions", timeout=60, json={
            "model": "demo-a", "prompt": PROMPT, "max_tokens": 3, "ignore_eos": True})
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 3
        assert response.headers["x-prolora-replica"]
        assert len(httpx.get(f"{url}/v1/dashboard/state", timeout=30).json()["replicas"]) == 2
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert process.returncode == 0, log.read_text()[-3000:]
    assert (tmp_path / "store" / "demo-a.safetensors").is_file()


@pytest.mark.ray
def test_cluster_starts_in_bounded_time_bound_to_loopback(cluster) -> None:
    import ray

    assert cluster.start_seconds < CLUSTER_START_S
    identities = cluster.identities()
    assert len(identities) == 2 and len({i.pid for i in identities}) == 2
    assert all(i.max_adapters >= 1 for i in identities)
    assert [node["NodeManagerAddress"] for node in ray.nodes()] == ["127.0.0.1"]


@pytest.mark.ray
def test_openai_client_through_the_ingress_matches_one_process(cluster, reference) -> None:
    base = cluster.client.models.list().data[0].id
    assert base == reference.models.list().data[0].id
    for model in (base, "alpha", "beta", "gamma"):
        raw = greedy(cluster.client, model)
        assert raw.headers.get("x-prolora-replica") in {i.replica_id for i in cluster.identities()}
        assert _text(raw) == _text(greedy(reference, model)), model
    messages = [{"role": "user", "content": "what color is the sky ?"}]
    chat = dict(model="gamma", messages=messages, max_tokens=8, temperature=0,
                extra_body={"ignore_eos": True})
    whole = cluster.client.chat.completions.create(**chat)
    expected = reference.chat.completions.create(**chat).choices[0].message.content
    assert whole.choices[0].message.content == expected
    streamed = cluster.client.chat.completions.create(**chat, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected
    stream = cluster.client.completions.create(model="beta", prompt=PROMPT, max_tokens=10,
                                               temperature=0, stream=True,
                                               extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in stream if c.choices) == _text(greedy(reference, "beta", 10))
    with pytest.raises(openai.NotFoundError):
        cluster.client.completions.create(model="no-such-adapter", prompt=PROMPT, max_tokens=2)


@pytest.mark.ray
def test_repeated_requests_on_one_adapter_stay_on_one_replica(cluster) -> None:
    for _ in range(3):  # warm-up: the replica that loaded it tells Ray's router it holds it
        greedy(cluster.client, "alpha", max_tokens=2)
        time.sleep(0.5)
    served = [greedy(cluster.client, "alpha", max_tokens=2).headers["x-prolora-replica"]
              for _ in range(8)]
    assert len(set(served)) == 1, served


@pytest.mark.ray
def test_upload_delete_and_reupload_reach_every_replica(cluster, reference, adapter_files) -> None:
    expected_old = _text(greedy(reference, "delta"))
    expected_new = _text(greedy(reference, "delta-new"))
    assert expected_old != expected_new
    assert upload(cluster.url, "delta", adapter_files["delta"]).status_code == 201
    assert _text(greedy(cluster.client, "delta")) == expected_old  # resident on one replica now
    both = cluster.on_every_replica("delta")
    assert len(both) == 2 and set(both.values()) == {expected_old}, both

    assert httpx.delete(f"{cluster.url}/adapters/delta", timeout=60).status_code == 200
    from prolora_serve.adapters.registry import AdapterNotFoundError

    gone = cluster.on_every_replica("delta")
    assert len(gone) == 2 and all(isinstance(e, AdapterNotFoundError) for e in gone.values()), gone
    with pytest.raises(openai.NotFoundError):
        greedy(cluster.client, "delta")
    assert httpx.get(f"{cluster.url}/adapters/delta", timeout=30).status_code == 404

    assert upload(cluster.url, "delta", adapter_files["delta-new"]).status_code == 201
    assert _text(greedy(cluster.client, "delta")) == expected_new
    again = cluster.on_every_replica("delta")
    assert len(again) == 2 and set(again.values()) == {expected_new}, again


@pytest.mark.ray
def test_a_client_that_disconnects_aborts_its_request_on_the_replica(cluster) -> None:
    def counters():
        state = httpx.get(f"{cluster.url}/v1/dashboard/state", timeout=30).json()
        return state["counters"]["num_aborted"], state["scheduler"]["num_running"]

    aborted_before, _ = counters()
    body = {"model": "beta", "prompt": PROMPT, "max_tokens": 240, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{cluster.url}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200 and response.headers["x-prolora-replica"]
        for line in response.iter_lines():
            if line.startswith("data: {"):
                break  # one chunk arrived; now hang up
    _wait_until(lambda: counters()[0] > aborted_before and counters()[1] == 0, 30,
                "the replica aborted the request")


@pytest.mark.ray
def test_dashboard_and_metrics_cover_every_replica(cluster) -> None:
    greedy(cluster.client, "gamma", max_tokens=2)
    ids = {i.replica_id for i in cluster.identities()}
    state = httpx.get(f"{cluster.url}/v1/dashboard/state", timeout=30).json()
    assert {r["id"] for r in state["replicas"]} == ids
    for replica in state["replicas"]:
        assert set(replica) >= {"scheduler", "kv_cache", "adapter_cache", "resident"}
        assert replica["kv_cache"]["kv_blocks_total"] > 0
    assert state["kv_cache"]["kv_blocks_total"] == sum(r["kv_cache"]["kv_blocks_total"] for r in state["replicas"])
    resident = {a for r in state["replicas"] for a in r["resident"]}
    assert "gamma" in resident and {a["id"] for a in state["resident"]} == resident
    page = httpx.get(f"{cluster.url}/dashboard", timeout=30).text
    assert 'id="replica-table"' in page
    metrics = httpx.get(f"{cluster.url}/metrics", timeout=30).text
    for replica_id in ids:
        assert f'prolora_replica_queue_depth{{replica="{replica_id}"}}' in metrics
        assert f'prolora_replica_kv_blocks_used{{replica="{replica_id}"}}' in metrics


@pytest.mark.ray
def test_a_killed_replica_is_restarted_and_the_registry_is_intact(cluster, reference) -> None:
    """Last: SIGKILL the replica serving a stream. That stream ends with a 503 error event, new
    requests keep being served, Ray starts a replacement, and every adapter is still there."""
    registered = sorted(a["id"] for a in httpx.get(f"{cluster.url}/adapters", timeout=30).json()["data"])
    before = {i.replica_id: i for i in cluster.identities()}
    body = {"model": "alpha", "prompt": PROMPT, "max_tokens": 240, "stream": True, "ignore_eos": True}
    events = []
    with httpx.stream("POST", f"{cluster.url}/v1/completions", json=body, timeout=120) as response:
        victim = before[response.headers["x-prolora-replica"]]
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("data: {"):
                break
        os.kill(victim.pid, signal.SIGKILL)
        events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    errors = [e["error"] for e in events if "error" in e]
    finished = [e for e in events if e.get("choices") and e["choices"][0].get("finish_reason")]
    assert errors or finished, events  # the kill may land after the last token on a fast machine
    if errors:
        assert errors[0]["type"] == "service_unavailable" and "restarts it" in errors[0]["message"]

    # meanwhile the others serve (a request whose replica is gone before it streamed is resent)
    expected = {name: _text(greedy(reference, name)) for name in ("alpha", "beta", "gamma")}
    for name in ("alpha", "beta", "gamma"):
        assert _text(greedy(cluster.client, name)) == expected[name]

    def replaced():
        now = {i.replica_id: i for i in cluster.identities()}
        return len(now) == 2 and victim.replica_id not in now and now
    now = _wait_until(replaced, RECOVERY_S, "Ray restarted the killed replica", poll_s=1.0)
    assert sorted(a["id"] for a in httpx.get(f"{cluster.url}/adapters", timeout=30).json()["data"]) == registered
    for text in cluster.on_every_replica("gamma").values():
        assert text == expected["gamma"]
    assert len(now) == 2
