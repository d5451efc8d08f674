"""Per-adapter Prometheus series: counters equal the usage the API returned, running/waiting
gauges, load seconds once per cold load, bounded labels ("other"), and adapter ids only for
scrapes that present the API key. Real servers on 127.0.0.1; the units under them too."""

from __future__ import annotations

import collections
import threading
import time

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from prolora_serve.adapters.config import ProLoRAConfig
from prolora_serve.adapters.factory import random_adapter
from prolora_serve.adapters.format import adapter_to_bytes
from prolora_serve.kernels import AdapterWeightPool
from prolora_serve.server.api import metrics
from prolora_serve.server.engine.residency import AdapterCache, LoadTimes, ResidentAdapterInfo
from prolora_serve.server.engine.scheduler import AdapterTraffic
from test_engine_residency import FakeSource, acquire_now, adapter_bytes, make_adapter
from test_engine_scheduler import make_scheduler, make_seq, step
from test_server_lora_endpoints import API_KEY, ADMIN_KEY, CONFIG, PROMPT, auth, tiny_config

LIMIT = 2  # adapter labels on the metrics server: the third adapter with traffic is "other"


def samples(text: str, name: str, **labels: str) -> dict[str, float]:
    """``{adapter label: value}`` of one sample name (e.g. ``prolora_adapter_requests_total``),
    among the samples that also carry ``labels`` (e.g. ``le="+Inf"``)."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and "adapter" in sample.labels \
                    and labels.items() <= sample.labels.items():
                found[sample.labels["adapter"]] = sample.value
    return found


def upload(server, name: str, seed: int, key: str | None = None) -> None:
    data = adapter_to_bytes(random_adapter(CONFIG, server.app.state.registry.linear_shapes,
                                           seed=seed, b_std=0.3))
    response = httpx.post(f"{server.url}/adapters", data={"name": name},
                          files={"file": ("a.safetensors", data)}, headers=auth(key), timeout=60)
    assert response.status_code == 201, response.text


@pytest.fixture(scope="module")
def server(live_server, tiny_llama_dir, tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(metrics, "ADAPTER_LABEL_LIMIT", LIMIT)
        # one running sequence at a time: a second request waits (the gauge test needs it)
        server = live_server(tiny_config(tiny_llama_dir, tmp_path_factory.mktemp("metrics"),
                                         max_batch=1))
    assert server.app.state.metrics.engine_collector.labels.limit == LIMIT
    for seed, name in enumerate(("m1", "m2", "x1", "x2", "x3")):
        upload(server, name, seed)
    server.issued = collections.Counter()  # requests sent per adapter ("" = base), all tests
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def scrape(server, key: str | None = None) -> str:
    response = httpx.get(f"{server.url}/metrics", headers=auth(key))
    assert response.status_code == 200
    return response.text


def complete(server, client, adapter: str, max_tokens: int, prompt: str = PROMPT):
    model = adapter or server.app.state.model_name
    result = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                       temperature=0, extra_body={"ignore_eos": True})
    server.issued[adapter] += 1
    return result.usage


def test_counters_equal_the_usage_returned(server, client) -> None:
    before = scrape(server)
    usage = collections.defaultdict(lambda: [0, 0, 0])
    for adapter, max_tokens, prompt in (("m1", 5, PROMPT), ("m1", 3, "the dog"), ("m2", 7, PROMPT),
                                        ("", 4, "one two three")):
        used = complete(server, client, adapter, max_tokens, prompt)
        usage[adapter][0] += 1
        usage[adapter][1] += used.prompt_tokens
        usage[adapter][2] += used.completion_tokens
    chat = client.chat.completions.create(model="m2", max_tokens=2, temperature=0,
                                          messages=[{"role": "user", "content": "say hello"}],
                                          extra_body={"ignore_eos": True})
    server.issued["m2"] += 1
    usage["m2"][0] += 1
    usage["m2"][1] += chat.usage.prompt_tokens
    usage["m2"][2] += chat.usage.completion_tokens
    after = scrape(server)
    for index, name in enumerate(("prolora_adapter_requests_total",
                                  "prolora_adapter_prompt_tokens_total",
                                  "prolora_adapter_generated_tokens_total")):
        old, new = samples(before, name), samples(after, name)
        for adapter in ("m1", "m2", ""):
            assert new[adapter] - old.get(adapter, 0) == usage[adapter][index], (name, adapter)
    assert samples(after, "prolora_adapter_requests_total")["m1"] == 2  # exact, not just deltas
    for name in ("prolora_adapter_running_requests", "prolora_adapter_waiting_requests"):
        gauges = samples(after, name)
        assert {"m1", "m2", "", "other"} <= set(gauges) and not any(gauges.values()), name
    assert samples(after, "prolora_adapter_resident")["m1"] == 1


def test_load_seconds_observed_once_per_cold_load(server, client) -> None:
    complete(server, client, "m1", 2)  # resident since the first test: no new load
    text = scrape(server)
    count = samples(text, "prolora_adapter_load_seconds_count")
    assert count["m1"] == 1 and count["m2"] == 1
    assert samples(text, "prolora_adapter_load_seconds_sum")["m1"] > 0
    assert samples(text, "prolora_adapter_load_seconds_bucket", le="+Inf")["m1"] == 1
    loads = next(s.value for f in text_string_to_metric_families(text) for s in f.samples
                 if s.name == "prolora_adapter_cache_loads_total")
    assert sum(count.values()) == loads  # every cold load observed once, in some label


def test_running_and_waiting_come_from_the_engine(server, client) -> None:
    """max_batch=1: while a long m2 request runs, an m1 request waits."""
    def running_and_waiting() -> tuple[dict[str, float], dict[str, float]]:
        text = scrape(server)
        return (samples(text, "prolora_adapter_running_requests"),
                samples(text, "prolora_adapter_waiting_requests"))

    def until(check, what: str):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            gauges = running_and_waiting()
            if check(*gauges):
                return gauges
            time.sleep(0.005)
        raise AssertionError(f"never saw {what}")

    threads = [threading.Thread(target=complete, args=(server, client, adapter, 240))
               for adapter in ("m2", "m1")]
    threads[0].start()
    until(lambda running, waiting: running["m2"] == 1, "m2 running")
    threads[1].start()
    running, waiting = until(lambda running, waiting: waiting["m1"] == 1, "m1 waiting")
    assert running["m2"] == 1 and running["m1"] == 0 and waiting["m2"] == 0
    assert running[""] == waiting[""] == running["other"] == waiting["other"] == 0
    for thread in threads:
        thread.join(timeout=120)
    running, waiting = running_and_waiting()
    assert not any(running.values()) and not any(waiting.values())


def test_labels_are_bounded_and_the_rest_is_other(server, client) -> None:
    for adapter in ("x1", "x2", "x3"):
        complete(server, client, adapter, 2)
    text = scrape(server)
    requests = samples(text, "prolora_adapter_requests_total")
    labelled = set(requests) - {"", "other"}
    assert labelled == {"m1", "m2"}  # the first two with traffic keep their labels
    assert not any(f'"{x}"' in text for x in ("x1", "x2", "x3"))
    for adapter in labelled:
        assert requests[adapter] == server.issued[adapter]
    assert requests["other"] == sum(server.issued[x] for x in ("x1", "x2", "x3"))
    assert requests[""] >= server.issued[""]
    assert samples(text, "prolora_adapter_load_seconds_count")["other"] == 3
    # a deleted adapter gives its label up; the busiest unlabelled adapter takes it
    complete(server, client, "x2", 2)
    assert httpx.delete(f"{server.url}/adapters/m1").status_code == 200
    requests = samples(scrape(server), "prolora_adapter_requests_total")
    assert set(requests) - {"", "other"} == {"m2", "x2"}
    assert requests["x2"] == server.issued["x2"] == 2
    assert requests["other"] == server.issued["x1"] + server.issued["x3"]


# ---- with an API key, only keyed scrapes see adapter ids --------------------------------------
@pytest.fixture(scope="module")
def keyed_server(live_server, tiny_llama_dir, tmp_path_factory):
    def start(**options):
        root = tmp_path_factory.mktemp("metrics-keys")
        server = live_server(tiny_config(tiny_llama_dir, root, api_key=API_KEY,
                                         admin_key=ADMIN_KEY, **options))
        upload(server, "secret-adapter", 0, key=ADMIN_KEY)
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
        client.completions.create(model="secret-adapter", prompt=PROMPT, max_tokens=2)
        return server

    started = [start(), start(metrics_adapter_labels="open")]
    yield started
    for server in started:
        server.stop()


def test_adapter_series_only_with_a_key_unless_opened(keyed_server) -> None:
    guarded, opened = keyed_server
    anonymous = scrape(guarded)
    assert "secret-adapter" not in anonymous and "prolora_adapter_requests" not in anonymous
    assert "prolora_http_requests_total" in anonymous and "prolora_adapters_registered 1.0" in anonymous
    for key in ("wrong", None):
        assert "secret-adapter" not in scrape(guarded, key)
    for key in (API_KEY, ADMIN_KEY):
        assert samples(scrape(guarded, key), "prolora_adapter_requests_total")["secret-adapter"] == 1
    assert samples(scrape(opened), "prolora_adapter_requests_total")["secret-adapter"] == 1


# ---- the units under the series ---------------------------------------------------------------
def test_cache_observes_read_plus_copy_once_per_cold_load() -> None:
    source = FakeSource({"a": make_adapter(0), "b": make_adapter(1)})
    slow = source.load_adapter
    source.load_adapter = lambda adapter_id: (time.sleep(0.02), slow(adapter_id))[1]
    cache = AdapterCache(AdapterWeightPool("cpu", torch.float32),
                         adapter_bytes(source.adapters["a"]), source,
                         host_budget_bytes=0)  # room for one; no host tier: every cold load reads
    for adapter_id in ("a", "a", "b", "a"):  # a cold, a warm, b evicts a, a cold again
        cache.release(acquire_now(cache, adapter_id))
    times = cache.stats().load_times
    assert (times["a"].count, times["b"].count) == (2, 1) == (2, cache.loads - 2)
    assert times["a"].sum_seconds >= 0.04 and sum(times["a"].bucket_counts) == 2
    cache.forget("a")
    assert "a" not in cache.stats().load_times
    cache.close()


def test_scheduler_traffic_counts_tokens_and_states() -> None:
    sched = make_scheduler(num_blocks=64, block_size=4, max_batch=1)
    sched.add(make_seq("r1", 5, max_tokens=3))
    sched.add(make_seq("r2", 4, max_tokens=2))
    step(sched)
    traffic = sched.adapter_traffic()[None]
    assert (traffic.requests, traffic.prompt_tokens, traffic.running, traffic.waiting) == (2, 9, 1, 1)
    assert traffic.generated_tokens == 1  # live sequences' tokens count as they are generated
    while sched.has_work:
        step(sched)
    done = sched.adapter_traffic()[None]
    assert (done.generated_tokens, done.running, done.waiting) == (5, 0, 0)


def test_labels_fold_and_name_other_never_gets_a_label() -> None:
    labels = metrics.AdapterLabels(limit=1)
    traffic = {None: AdapterTraffic(requests=1), "other": AdapterTraffic(requests=9),
               "a": AdapterTraffic(requests=2, prompt_tokens=4, running=1),
               "b": AdapterTraffic(requests=1, generated_tokens=3)}
    resident = [ResidentAdapterInfo(x, 1, 1, 0.0, 0, {}) for x in ("a", "b")]
    series = labels.fold(traffic, resident, {"b": LoadTimes(1, 0.5, [0] * 15)})
    assert labels.labelled == {"a"}
    assert series.traffic["other"].requests == 10 and series.traffic["other"].generated_tokens == 3
    assert series.traffic["a"].running == 1 and series.traffic[""].requests == 1
    assert series.resident == {"a": 1, "other": 1}
    assert series.load_times["other"].count == 1 and series.load_times["a"].count == 0
