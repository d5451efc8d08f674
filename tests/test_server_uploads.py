"""Adapter uploads over HTTP: bad input is refused with the right status and changes nothing;
API and admin keys guard what they should."""

from __future__ import annotations

import pickle

import httpx
import openai
import pytest

from prolora_serve.adapters.config import ProLoRAConfig
from prolora_serve.adapters.factory import random_adapter
from prolora_serve.adapters.format import adapter_to_bytes
from prolora_serve.server.config import ServerConfig

API_KEY, ADMIN_KEY = "api-key-1", "admin-key-2"
CONFIG = ProLoRAConfig(r=8, unshared_r=2, reduce_lora_A_x=3, reduce_lora_B_x=3, lora_alpha=16,
                       target_modules=("q_proj", "v_proj", "down_proj"))
BIG = ProLoRAConfig(r=64, unshared_r=64, reduce_lora_A_x=1, reduce_lora_B_x=1, lora_alpha=64,
                    target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                    "down_proj"))
MAX_UPLOAD = 128 * 1024  # room for CONFIG (~20 KiB), not for BIG (~600 KiB)


def auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


@pytest.fixture(scope="module")
def server(live_server, tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("uploads")
    config = ServerConfig.from_options(model=str(tiny_llama_dir), dtype="fp32", adapter_dir=root / "adapters",
                          adapter_memory=8 << 20, kv_cache_memory=8 << 20, max_model_len=128,
                          max_upload_size=MAX_UPLOAD, api_key=API_KEY, admin_key=ADMIN_KEY)
    server = live_server(config)
    server.root = root
    server.shapes = server.app.state.registry.linear_shapes
    response = post_file(server, "keeper", good_bytes(server))
    assert response.status_code == 201, response.text
    yield server
    server.stop()


def good_bytes(server, config: ProLoRAConfig = CONFIG, seed: int = 0) -> bytes:
    return adapter_to_bytes(random_adapter(config, server.shapes, seed=seed, b_std=0.3))


def post_file(server, name: str | None, data: bytes, key: str | None = ADMIN_KEY) -> httpx.Response:
    form = {"name": name} if name is not None else {}
    return httpx.post(f"{server.url}/adapters", data=form, files={"file": ("a.safetensors", data)},
                      headers=auth(key), timeout=60)


def snapshot(server) -> tuple[list[str], list[str]]:
    listed = httpx.get(f"{server.url}/adapters", headers=auth(API_KEY)).json()["data"]
    files = sorted(p.name for p in (server.root / "adapters").iterdir() if p.name != ".staging")
    return [a["id"] for a in listed], files


def _nan(server) -> bytes:
    adapter = random_adapter(CONFIG, server.shapes, b_std=0.3)
    next(iter(adapter.modules.values())).Bu[0, 0] = float("nan")
    return adapter_to_bytes(adapter)


def _other_base(server) -> bytes:
    shapes = {path: (h * 2, o) for path, (h, o) in server.shapes.items()}
    return adapter_to_bytes(random_adapter(CONFIG, shapes))


def _unknown_module(server) -> bytes:
    shapes = {**server.shapes, "model.layers.0.self_attn.rotary_proj": (64, 64)}
    config = ProLoRAConfig(**{**CONFIG.__dict__, "target_modules": ("q_proj", "rotary_proj")})
    return adapter_to_bytes(random_adapter(config, shapes))


@pytest.mark.parametrize("name, make, status, code", [
    ("trunc", lambda s: good_bytes(s)[:-64], 400, "invalid_adapter"),
    ("shapes", _other_base, 400, "invalid_adapter"),
    ("nan", _nan, 400, "invalid_adapter"),
    ("unknown", _unknown_module, 400, "invalid_adapter"),
    ("pickle", lambda s: pickle.dumps({"base_model.model.x.lora_A.weight": [0.5]}), 400, "invalid_adapter"),
    ("../escape", good_bytes, 400, "invalid_adapter_id"),
    ("a/b", good_bytes, 400, "invalid_adapter_id"),
    ("..", good_bytes, 400, "invalid_adapter_id"),
    ("keeper", good_bytes, 409, "adapter_exists"),
    ("huge", lambda s: good_bytes(s, BIG), 413, "upload_too_large"),
], ids=["truncated", "wrong-shapes", "nan", "unknown-module", "pickle", "traversal", "slash",
        "dotdot", "duplicate", "oversize"])
def test_bad_upload_is_refused_and_changes_nothing(server, name, make, status, code) -> None:
    before = snapshot(server)
    response = post_file(server, name, make(server))
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert snapshot(server) == before
    assert not (server.root / "escape.safetensors").exists()
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_chunked_oversize_upload_is_cut_off(server) -> None:
    before = snapshot(server)
    boundary = "b0undary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nchunky\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()

    def body():  # no Content-Length: the server must count the bytes itself
        yield head
        for _ in range(64):
            yield b"\x00" * 65536

    response = httpx.post(f"{server.url}/adapters", content=body(), headers={
        **auth(ADMIN_KEY), "content-type": f"multipart/form-data; boundary={boundary}"}, timeout=60)
    assert response.status_code == 413
    assert snapshot(server) == before


@pytest.mark.parametrize("form, files", [
    ({}, {"file": ("a", b"x")}),
    ({"name": "x"}, {}),
    ({"name": "x"}, {"file": ("a", b"x"), "config": ("c", b"{}")}),
    ({"name": "x"}, {"config": ("c", b"{}")}),
], ids=["no-name", "no-file", "file-and-pair", "config-only"])
def test_incomplete_forms_are_400(server, form, files) -> None:
    response = httpx.post(f"{server.url}/adapters", data=form, files=files or None,
                          headers=auth(ADMIN_KEY))
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"


def test_json_body_and_base_model_name_are_refused(server) -> None:
    response = httpx.post(f"{server.url}/adapters", json={"name": "x"}, headers=auth(ADMIN_KEY))
    assert response.status_code == 400
    base = server.app.state.model_name
    assert post_file(server, base, good_bytes(server)).status_code == 409


# ---- keys ----------------------------------------------------------------------------------
def test_api_key_guards_inference_and_reads(server) -> None:
    body = {"prompt": "the cat", "max_tokens": 2}
    for key, status in ((None, 401), ("wrong", 401), (API_KEY, 200), (ADMIN_KEY, 200)):
        response = httpx.post(f"{server.url}/v1/completions", json=body, headers=auth(key))
        assert response.status_code == status
        if status == 401:
            assert response.json()["error"]["type"] == "authentication_error"
        assert httpx.get(f"{server.url}/adapters", headers=auth(key)).status_code == status
        assert httpx.get(f"{server.url}/v1/models", headers=auth(key)).status_code == status
        assert httpx.get(f"{server.url}/v1/capacity", headers=auth(key)).status_code == status
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/metrics").status_code == 200
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    assert client.completions.create(model="keeper", prompt="the cat", max_tokens=2).choices
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0).models.list()


def test_admin_key_guards_uploads_and_deletes(server) -> None:
    data = good_bytes(server, seed=5)
    assert post_file(server, "guarded", data, key=None).status_code == 401
    assert post_file(server, "guarded", data, key=API_KEY).status_code == 401
    assert post_file(server, "guarded", data, key=ADMIN_KEY).status_code == 201
    url = f"{server.url}/adapters/guarded"
    assert httpx.delete(url, headers=auth(API_KEY)).status_code == 401
    assert httpx.get(url, headers=auth(API_KEY)).status_code == 200
    assert httpx.delete(url, headers=auth(ADMIN_KEY)).status_code == 200


# ---- listing: OpenAI-style cursor pages ------------------------------------------------------
def list_page(server, **params) -> httpx.Response:
    return httpx.get(f"{server.url}/adapters", params=params, headers=auth(API_KEY))


def test_adapter_list_is_paged_like_openai_lists(server) -> None:
    from openai import BaseModel as OpenAIModel
    from openai.pagination import SyncCursorPage

    from prolora_serve.server.api import listing

    for i in (3, 0, 4, 1, 2):
        assert post_file(server, f"page-{i}", good_bytes(server, seed=20 + i)).status_code == 201
    try:
        everything = list_page(server).json()
        ids = [a["id"] for a in everything["data"]]
        assert ids == sorted(ids) and {f"page-{i}" for i in range(5)} <= set(ids)
        assert (everything["object"], everything["has_more"]) == ("list", False)
        assert (everything["first_id"], everything["last_id"]) == (ids[0], ids[-1])
        shown = everything["data"][ids.index("page-0")]
        assert shown["object"] == "adapter" and shown["num_params"] > 0 and "resident" in shown

        walked, after = [], None
        while True:  # limit 1: one adapter a page, has_more until the last
            page = list_page(server, limit=1, **({"after": after} if after else {})).json()
            assert len(page["data"]) == 1 and page["first_id"] == page["last_id"] == page["data"][0]["id"]
            walked.append(page["last_id"])
            if not page["has_more"]:
                break
            after = page["last_id"]
        assert walked == ids

        past_the_end = list_page(server, after=ids[-1]).json()
        assert (past_the_end["data"], past_the_end["has_more"]) == ([], False)
        assert (past_the_end["first_id"], past_the_end["last_id"]) == (None, None)
        # An unregistered id is a position, not an error (a cursor deleted while paging).
        resumed = list_page(server, after="page-2x", limit=2).json()
        assert [a["id"] for a in resumed["data"]] == ["page-3", "page-4"]
        assert resumed["has_more"] == (ids.index("page-4") < len(ids) - 1)

        for params, param in (({"limit": 0}, "limit"), ({"limit": listing.MAX_LIMIT + 1}, "limit"),
                              ({"limit": "many"}, "limit"), ({"after": "../x"}, "after"),
                              ({"after": "a b"}, "after"), ({"after": ".."}, "after")):
            response = list_page(server, **params)
            assert response.status_code == 400, params
            error = response.json()["error"]
            assert (error["type"], error["param"]) == ("invalid_request_error", param)
        assert len(list_page(server, limit=listing.MAX_LIMIT).json()["data"]) == len(ids)

        class Item(OpenAIModel):
            id: str

        client = openai.OpenAI(base_url=server.url, api_key=API_KEY, max_retries=0)
        pages = client.get_api_list("/adapters", model=Item, page=SyncCursorPage[Item],
                                    options={"params": {"limit": 2}})
        assert [item.id for item in pages] == ids  # the official client follows the cursor
    finally:
        for i in range(5):
            httpx.delete(f"{server.url}/adapters/page-{i}", headers=auth(ADMIN_KEY))
