"""Property-based fuzzing from /openapi.json: no generated input may cause a 5xx (bounded run).

schemathesis' pytest plugin (``from_fixture``) does not run under pytest 9, so each operation's
strategy drives a plain hypothesis test here.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from prolora_serve.server.config import ServerConfig

FUZZED = r"^/(v1/completions|v1/chat/completions|v1/models.*|adapters.*|health|v1/capacity)$"
EXAMPLES_PER_OPERATION = 25


@pytest.fixture(scope="module")
def fuzzed_server(live_server, tiny_llama_dir, tmp_path_factory):
    # A short context bounds the work any generated request can ask for.
    config = ServerConfig.from_options(model=str(tiny_llama_dir), dtype="fp32",
                          adapter_dir=tmp_path_factory.mktemp("fuzz") / "adapters",
                          adapter_memory=4 << 20, kv_cache_memory=4 << 20, max_model_len=48,
                          max_batch=4, max_upload_size=1 << 20)
    server = live_server(config)
    yield server
    server.stop()


def _fuzz(operation, base_url: str) -> None:
    @given(case=operation.as_strategy())
    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case) -> None:
        case.call_and_validate(base_url=base_url, checks=[not_a_server_error], timeout=60)

    run()


@pytest.mark.timeout(900)
def test_no_server_errors(fuzzed_server) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzzed_server.url}/openapi.json").include(
        path_regex=FUZZED)
    operations = [result.ok() for result in schema.get_all_operations()]
    fuzzed = {f"{op.method.upper()} {op.path}" for op in operations}
    assert {"POST /v1/completions", "POST /v1/chat/completions", "POST /adapters",
            "DELETE /adapters/{adapter_id}"} <= fuzzed
    for operation in operations:
        _fuzz(operation, fuzzed_server.url)
    assert httpx_health(fuzzed_server.url) == 200


def httpx_health(url: str) -> int:
    import httpx

    return httpx.get(f"{url}/health").status_code
