"""vLLM's dynamic LoRA endpoints on a real server: loads from --adapter-import-dir (PRoLoRA file,
PRoLoRA directory, PEFT LoRA directory) then generation by name, unloads, and every refusal
(403 outside the import dir, 400 invalid or taken, 404 unknown, 401 without the admin key)
leaving the registry as it was."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import openai
import pytest

from prolora_serve.adapters.config import ProLoRAConfig
from prolora_serve.adapters.factory import random_adapter
from prolora_serve.adapters.format import CONFIG_NAME, WEIGHTS_NAME, save_adapter
from prolora_serve.server.config import ServerConfig

MiB = 1 << 20
API_KEY, ADMIN_KEY = "lora-api-key", "lora-admin-key"
PROMPT = "the cat sat on the mat"
CONFIG = ProLoRAConfig(r=8, unshared_r=2, reduce_lora_A_x=3, reduce_lora_B_x=5, lora_alpha=16,
                       target_modules=("q_proj", "v_proj", "down_proj"))


def tiny_config(model_dir: Path, adapter_dir: Path, **overrides) -> ServerConfig:
    settings = dict(model=str(model_dir), dtype="fp32", adapter_dir=adapter_dir,
                    adapter_memory=16 * MiB, kv_cache_memory=16 * MiB, max_batch=8,
                    max_model_len=256)
    return ServerConfig.from_options(**{**settings, **overrides})


def auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def load(server, name: str, path: str, key: str | None = None, **extra) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/load_lora_adapter", headers=auth(key), timeout=60,
                      json={"lora_name": name, "lora_path": path, **extra})


def unload(server, name: str, key: str | None = None) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": name},
                      headers=auth(key), timeout=60)


def write_peft_lora(model_dir: Path, target: Path) -> None:
    """A LoRA saved by PEFT itself on the served tiny LLaMA (what a training run leaves)."""
    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                           init_lora_weights=False)
    peft.get_peft_model(model, lora).save_pretrained(target)


@pytest.fixture(scope="module")
def server(live_server, tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-endpoints")
    imports, outside = root / "imports", root / "outside"
    imports.mkdir()
    outside.mkdir()
    server = live_server(tiny_config(tiny_llama_dir, root / "adapters", adapter_import_dir=imports))
    shapes = server.app.state.registry.linear_shapes

    def adapter(seed: int):
        return random_adapter(CONFIG, shapes, seed=seed, b_std=0.3)

    save_adapter(adapter(0), imports / "single.safetensors", single_file=True)
    save_adapter(adapter(1), imports / "prolora_dir")
    write_peft_lora(tiny_llama_dir, imports / "peft_dir")
    (imports / "sub").mkdir()
    save_adapter(adapter(2), imports / "sub" / "nested.safetensors", single_file=True)
    (imports / "garbage.safetensors").write_bytes(b"not a safetensors file at all")
    other = {k: (i * 2, o) for k, (i, o) in shapes.items()}
    save_adapter(random_adapter(CONFIG, other, seed=4), imports / "wrong_shapes.safetensors",
                 single_file=True)
    # valid adapters outside the import dir, and ways of reaching them from inside it
    save_adapter(adapter(5), outside / "secret.safetensors", single_file=True)
    save_adapter(adapter(6), outside / "secret_dir")
    os.symlink(outside / "secret.safetensors", imports / "link_out.safetensors")
    os.symlink(outside / "secret_dir", imports / "dir_link_out")
    (imports / "files_link_out").mkdir()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        os.symlink(outside / "secret_dir" / name, imports / "files_link_out" / name)
    os.symlink(imports / "single.safetensors", imports / "link_in.safetensors")
    server.root, server.imports, server.outside = root, imports, outside
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def registry_state(server) -> tuple[list[str], list[str]]:
    listed = httpx.get(f"{server.url}/adapters").json()["data"]
    files = sorted(p.name for p in (server.root / "adapters").iterdir() if p.name != ".staging")
    staged = list((server.root / "adapters" / ".staging").iterdir())
    assert not staged, staged  # nothing half-written is left behind either
    return sorted(a["id"] for a in listed), files


def greedy(client: openai.OpenAI, model: str, max_tokens: int = 6):
    return client.completions.create(model=model, prompt=PROMPT, max_tokens=max_tokens,
                                     temperature=0, extra_body={"ignore_eos": True})


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])
    return body["error"]


# ---- loads, generation by name, unloads ----------------------------------------------------
@pytest.mark.parametrize("name, path", [("from-file", "single.safetensors"),
                                        ("from-prolora-dir", "prolora_dir"),
                                        ("from-peft-dir", "peft_dir")])
def test_load_generate_unload_then_404(server, client, name, path) -> None:
    base_name = server.app.state.model_name
    response = load(server, name, path)
    assert response.status_code == 200, response.text
    assert response.text == f"Success: LoRA adapter '{name}' added successfully."
    assert name in registry_state(server)[0]
    assert name in [m.id for m in client.models.list().data]
    result = greedy(client, name)
    assert result.model == name and result.usage.completion_tokens == 6
    assert result.choices[0].text != greedy(client, base_name).choices[0].text

    response = unload(server, name)
    assert response.status_code == 200, response.text
    assert response.text == f"Success: LoRA adapter '{name}' removed successfully."
    assert name not in registry_state(server)[0]
    with pytest.raises(openai.NotFoundError):
        greedy(client, name)
    again = unload(server, name)
    assert again.status_code == 404 and error_of(again)["code"] == "adapter_not_found"


def test_absolute_nested_and_symlinked_inside_paths_load(server, client) -> None:
    for name, path in (("abs-path", str(server.imports / "single.safetensors")),
                       ("nested", "sub/nested.safetensors"),
                       ("link-in", "link_in.safetensors")):
        response = load(server, name, path)
        assert response.status_code == 200, (path, response.text)
        assert greedy(client, name).model == name
        assert unload(server, name).status_code == 200


def test_unload_is_delete_and_frees_the_engine_slot(server, client) -> None:
    assert load(server, "slot-freed", "single.safetensors").status_code == 200
    greedy(client, "slot-freed")
    resident = {a.adapter_id for a in server.app.state.engine.adapter_cache.resident()}
    assert "slot-freed" in resident
    assert unload(server, "slot-freed").status_code == 200
    cache = server.app.state.engine.adapter_cache
    cache.collect()  # the step thread does this at its next step; idle, nothing holds it
    assert "slot-freed" not in {a.adapter_id for a in cache.resident()}
    assert httpx.get(f"{server.url}/adapters/slot-freed").status_code == 404


# ---- refusals: the registry is unchanged after each -------------------------------------------
def test_paths_outside_the_import_dir_are_403(server) -> None:
    before = registry_state(server)
    for path in (str(server.outside / "secret.safetensors"),  # absolute, elsewhere
                 "../outside/secret.safetensors",  # '..' out
                 "sub/../single.safetensors",  # '..' even when it would land inside
                 "link_out.safetensors",  # a symlinked file leading out
                 "dir_link_out",  # a symlinked directory leading out
                 "files_link_out",  # a directory inside whose files lead out
                 str(server.outside / "missing.safetensors"),  # outside and absent: still 403
                 "/etc/passwd"):
        response = load(server, "escapee", path)
        assert response.status_code == 403, (path, response.text)
        error = error_of(response)
        assert error["type"] == "permission_error" and error["param"] == "lora_path", path
    assert registry_state(server) == before


def test_invalid_adapters_are_400_and_unknown_paths_404(server) -> None:
    before = registry_state(server)
    for path in ("garbage.safetensors", "wrong_shapes.safetensors", "sub"):
        response = load(server, "invalid", path)
        assert response.status_code == 400, (path, response.text)
        assert error_of(response)["code"] == "invalid_adapter", path
    missing = load(server, "invalid", "no-such-adapter")
    assert missing.status_code == 404 and error_of(missing)["param"] == "lora_path"
    for body in ({"lora_name": "x"}, {"lora_path": "single.safetensors"},
                 {"lora_name": "", "lora_path": "single.safetensors"}):
        response = httpx.post(f"{server.url}/v1/load_lora_adapter", json=body)
        assert response.status_code == 400 and error_of(response)["type"] == "invalid_request_error"
    for path in ("a" * 5000, "sub/" + "b" * 300, "nul\x00.safetensors"):
        response = load(server, "invalid", path)
        assert response.status_code == 400 and error_of(response)["param"] == "lora_path", path
    bad_name = load(server, "no/slashes", "single.safetensors")
    assert bad_name.status_code == 400 and error_of(bad_name)["code"] == "invalid_adapter_id"
    inplace = load(server, "inplace", "single.safetensors", load_inplace=True)
    assert inplace.status_code == 400 and error_of(inplace)["param"] == "load_inplace"
    assert registry_state(server) == before


def test_duplicate_and_base_model_names_are_400(server) -> None:
    assert load(server, "twice", "single.safetensors").status_code == 200
    before = registry_state(server)
    duplicate = load(server, "twice", "prolora_dir")
    assert duplicate.status_code == 400 and error_of(duplicate)["code"] == "adapter_exists"
    base = load(server, server.app.state.model_name, "single.safetensors")
    assert base.status_code == 400 and error_of(base)["param"] == "lora_name"
    assert registry_state(server) == before
    assert unload(server, "twice").status_code == 200
    unknown = unload(server, "never-loaded")
    assert unknown.status_code == 404 and error_of(unknown)["param"] == "lora_name"


# ---- keys, and the import dir unset ------------------------------------------------------------
@pytest.fixture(scope="module")
def keyed_server(live_server, tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-keys")
    server = live_server(tiny_config(tiny_llama_dir, root / "adapters", api_key=API_KEY,
                                     admin_key=ADMIN_KEY))
    yield server
    server.stop()


def test_admin_key_required_then_403_while_the_import_dir_is_unset(keyed_server, tmp_path) -> None:
    save_adapter(random_adapter(CONFIG, keyed_server.app.state.registry.linear_shapes, seed=0),
                 tmp_path / "a.safetensors", single_file=True)
    path = str(tmp_path / "a.safetensors")
    for key in (None, "wrong", API_KEY):
        assert load(keyed_server, "a", path, key=key).status_code == 401
        assert unload(keyed_server, "a", key=key).status_code == 401
    response = load(keyed_server, "a", path, key=ADMIN_KEY)
    assert response.status_code == 403
    error = error_of(response)
    assert error["code"] == "adapter_import_disabled" and "--adapter-import-dir" in error["message"]
    assert len(keyed_server.app.state.registry) == 0
    assert unload(keyed_server, "a", key=ADMIN_KEY).status_code == 404
