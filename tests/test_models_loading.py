"""Loading models from local diffusers folders, single files and hub ids (offline), the model cache, and the
``diffsteer`` CLI end to end (PNG files with their generation parameters, the policy listing)."""

from __future__ import annotations

import json
import socket
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import diffsteer.guidance.models as models
from diffsteer.guidance.errors import InvalidInput
from diffsteer.guidance.images import read_png_metadata
from diffsteer.guidance.models import ModelCache, load_model
from diffsteer.guidance.registry import policy_class, policy_names
from diffsteer.guidance.sampler import generate
from diffsteer.service.cli import main

REQUEST = {
    "prompt": "a red cat",
    "negative_prompt": "blurry",
    "policy": "cfg:scale=5",
    "steps": 2,
    "seed": 3,
    "width": 32,
    "height": 32,
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory, sd_model, sdxl_model, vpred_model):
    """The built-in tiny models saved as diffusers folders with diffusers' own ``save_pretrained``."""
    base = tmp_path_factory.mktemp("diffusers")
    out = {}
    for key, model in (("sd", sd_model), ("sdxl", sdxl_model), ("v", vpred_model)):
        model.to_pipeline().save_pretrained(base / key)
        out[key] = base / key
    return out


@pytest.fixture
def no_network(monkeypatch):
    """Record (and refuse) every outgoing connection attempt."""
    attempts = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"network access attempted in a test: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


def call_with_deadline(fn, seconds: float):
    """Run ``fn()`` in a daemon thread; fail (instead of hanging the suite) if it takes longer than ``seconds``.
    Returns (result, exception, elapsed)."""
    box: dict = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box["error"] = e

    start = time.perf_counter()
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    elapsed = time.perf_counter() - start
    if thread.is_alive():
        pytest.fail(f"call did not return within {seconds} s (hanging on the network?)")
    return box.get("result"), box.get("error"), elapsed


def test_hub_offline_mode_is_in_force():
    """The offline tests below are only meaningful (and only safe) with the hub switched off."""
    import huggingface_hub.constants

    assert huggingface_hub.constants.HF_HUB_OFFLINE is True


# --- diffusers folders ---------------------------------------------------------------------------------------


def assert_same_images(reference, loaded, request=REQUEST):
    a = generate(reference, request)
    b = generate(loaded, request)
    assert a.pixels.shape == b.pixels.shape == (1, 3, 32, 32)
    assert a.pixels.std() > 1e-3, "degenerate image: the comparison would prove nothing"
    diff = (a.pixels - b.pixels).abs().max().item()
    assert diff <= 1e-6, f"max abs pixel difference {diff}"
    assert a.nfe == b.nfe


def test_sd_folder_loads_and_reproduces_builtin(folders, sd_model):
    model = load_model(str(folders["sd"]), device="cpu")
    assert model.family.name == "sd"
    assert model.prediction_type == "epsilon"
    assert model.name == str(folders["sd"])
    assert len(model.text_encoders) == len(model.tokenizers) == 1
    assert model.scheduler_config["_class_name"] == sd_model.scheduler_config["_class_name"] == "DDIMScheduler"
    assert model.default_size == sd_model.default_size
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert not any(p.requires_grad for p in model.unet.parameters())
    assert model.unet is not sd_model.unet
    assert_same_images(sd_model, model)


def test_sdxl_folder_loads_and_reproduces_builtin(folders, sdxl_model):
    model = load_model(str(folders["sdxl"]), device="cpu")
    assert model.family.name == "sdxl"
    assert model.prediction_type == "epsilon"
    assert len(model.text_encoders) == len(model.tokenizers) == 2
    assert model.force_zeros_for_empty_prompt is sdxl_model.force_zeros_for_empty_prompt is True
    assert model.scheduler_config["_class_name"] == "EulerDiscreteScheduler"
    assert_same_images(sdxl_model, model)


def test_v_prediction_folder_keeps_prediction_type(folders, vpred_model, sd_model):
    model = load_model(str(folders["v"]), device="cpu")
    assert model.family.name == "sd"
    assert model.prediction_type == "v_prediction"
    assert model.scheduler_config["prediction_type"] == "v_prediction"
    assert_same_images(vpred_model, model)
    # The prediction type matters: the same weights read as epsilon give another image.
    eps = generate(sd_model, REQUEST).pixels
    v = generate(model, REQUEST).pixels
    assert (eps - v).abs().max().item() > 1e-3


def test_relative_folder_shaped_like_a_hub_id_loads_locally(folders, monkeypatch, no_network):
    """``org/name`` that exists on disk is a folder, never a hub id."""
    monkeypatch.chdir(folders["sd"].parent)
    target = folders["sd"].parent / "someorg" / "sd"
    target.parent.mkdir(exist_ok=True)
    if not target.exists():
        target.symlink_to(folders["sd"], target_is_directory=True)
    model = load_model("someorg/sd", device="cpu")
    assert model.family.name == "sd" and model.name == "someorg/sd"
    assert no_network == []


def test_folder_with_fp16_variant_only_loads(tmp_path, sd_model):
    """Folders that ship only ``*.fp16.safetensors`` weights (common for SDXL-Turbo) load through the variant
    fallback."""
    pipe = sd_model.to_pipeline()
    pipe.save_pretrained(tmp_path / "m", variant="fp16")
    assert any(p.name.endswith(".fp16.safetensors") for p in (tmp_path / "m" / "unet").iterdir())
    assert not (tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    model = load_model(str(tmp_path / "m"), device="cpu")
    assert model.family.name == "sd"
    torch.testing.assert_close(model.unet.conv_in.weight, sd_model.unet.conv_in.weight, rtol=0, atol=0)


# --- single files and hub ids, offline -----------------------------------------------------------------------


def write_sd_style_checkpoint(path, sdxl: bool = False) -> None:
    """diffusers no longer ships a diffusers -> original (LDM) converter in the package (it lives in the repo's
    scripts/), so write a file with the original layout's keys and a bogus tensor: enough for the loader to
    recognise an SD (or SDXL) single-file checkpoint and to look for its config."""
    tensors = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
        "model.diffusion_model.input_blocks.0.0.bias": torch.zeros(8),
        "first_stage_model.decoder.conv_in.weight": torch.zeros(8, 4, 3, 3),
    }
    if sdxl:
        tensors["conditioner.embedders.1.model.ln_final.weight"] = torch.zeros(8)
    else:
        tensors["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.zeros(1, 77)
    save_file(tensors, str(path))


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd", "sdxl"])
def test_single_file_without_config_offline_says_config_needed(tmp_path, no_network, sdxl):
    path = tmp_path / "model.safetensors"
    write_sd_style_checkpoint(path, sdxl=sdxl)
    _, error, elapsed = call_with_deadline(lambda: load_model(str(path), device="cpu"), 60)
    assert isinstance(error, InvalidInput), repr(error)
    assert error.field == "model"
    message = str(error)
    assert str(path) in message
    assert "config" in message.lower()
    assert "`config`" in message or "--model-config" in message, "the message must say how to pass a config"
    assert "Traceback" not in message
    assert no_network == [], f"tried to reach the network: {no_network}"
    assert elapsed < 30


def test_cli_single_file_without_config_exits_2(tmp_path, capsys, no_network):
    path = tmp_path / "model.safetensors"
    write_sd_style_checkpoint(path)
    code = main(["generate", "a cat", "-q", "--device", "cpu", "--model", str(path), "-o", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("diffsteer: error: model: ") and "config" in err and "Traceback" not in err
    assert not (tmp_path / "o.png").exists()
    assert no_network == []


@pytest.mark.parametrize("spec", ["someorg/somemodel", "stabilityai/not-a-real-model-xyz"])
def test_hub_id_offline_is_invalid_input_quickly(spec, no_network):
    _, error, elapsed = call_with_deadline(lambda: load_model(spec, device="cpu"), 60)
    assert isinstance(error, InvalidInput), repr(error)
    assert error.field == "model"
    assert spec in str(error)
    assert "HF_HUB_OFFLINE" in str(error)
    assert elapsed < 30, f"took {elapsed:.1f} s"
    assert no_network == [], f"tried to reach the network: {no_network}"


# --- ModelCache -------------------------------------------------------------------------------------------------


def test_model_cache_returns_the_same_object():
    cache = ModelCache(device="cpu")
    first = cache.get("builtin:tiny")
    second = cache.get("builtin:tiny")
    assert first is second
    assert cache.loaded() == ["builtin:tiny"]
    other = cache.get("builtin:tiny-v")
    assert other is not first and other.prediction_type == "v_prediction"
    assert cache.get("builtin:tiny-v") is other
    assert sorted(cache.loaded()) == ["builtin:tiny", "builtin:tiny-v"]
    assert cache.get(None) is cache.get("default")


def test_model_cache_loads_once_under_concurrency(monkeypatch):
    calls = []

    def slow_load(spec, **kwargs):
        calls.append((spec, kwargs))
        time.sleep(0.2)
        return object()

    monkeypatch.setattr(models, "load_model", slow_load)
    cache = ModelCache(device="cpu", dtype="fp32")
    results = [None] * 6
    barrier = threading.Barrier(len(results))

    def worker(i):
        barrier.wait()
        results[i] = cache.get("some/model")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(results))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(calls) == 1, calls
    assert calls[0] == ("some/model", {"device": "cpu", "dtype": "fp32"})
    assert all(r is results[0] for r in results) and results[0] is not None


def test_model_cache_does_not_cache_failures():
    cache = ModelCache(device="cpu")
    for _ in range(2):
        with pytest.raises(InvalidInput):
            cache.get("/nonexistent/diffsteer/model")
    assert cache.loaded() == []


# --- CLI generate end to end ---------------------------------------------------------------------------------


def parse_a1111(text: str) -> tuple[list[str], dict[str, str]]:
    """Head lines and the last line's fields, by A1111's rules (tests/test_infotext.py)."""
    from test_infotext import RE_PARAM, unquote

    lines = text.split("\n")
    fields = {k: unquote(v) for k, v in RE_PARAM.findall(lines[-1])}
    return lines[:-1], fields


def run_generate(capsys, *args) -> tuple[int, str, str]:
    code = main(["generate", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_generate_writes_png_with_metadata(tmp_path, capsys, sd_model):
    out = tmp_path / "nested" / "cat.png"
    code, stdout, stderr = run_generate(
        capsys,
        "a red cat",
        "--negative",
        "blurry",
        "--model",
        "builtin:tiny",
        "--device",
        "cpu",
        "--steps",
        "2",
        "--size",
        "32x32",
        "--seed",
        "42",
        "--policy",
        "apg:scale=5,eta=0.5",
        "--scheduler",
        "euler",
        "-q",
        "-o",
        str(out),
    )
    assert code == 0, stderr
    assert out.is_file()
    assert list(out.parent.iterdir()) == [out]

    meta = read_png_metadata(str(out))
    assert meta == read_png_metadata(out.read_bytes())
    expected = {
        "prompt": "a red cat",
        "negative_prompt": "blurry",
        "seed": 42,
        "policy": "apg:scale=5.0,eta=0.5",
        "cfg_scale": 5.0,
        "steps": 2,
        "scheduler": "euler",
        "width": 32,
        "height": 32,
        "model": "builtin:tiny",
        "nfe": 4,  # APG with w > 1: conditional + unconditional at each of 2 steps
    }
    for key, value in expected.items():
        assert meta[key] == value, f"{key}: {meta[key]!r} != {value!r}"

    image = Image.open(out)
    assert image.size == (32, 32) and image.mode == "RGB"
    head, fields = parse_a1111(image.text["parameters"])
    assert head == ["a red cat", "Negative prompt: blurry"]
    assert fields["Steps"] == "2"
    assert fields["Sampler"] == "Euler"  # A1111's name
    assert fields["Seed"] == "42"
    assert fields["Model"] == "builtin:tiny"
    assert fields["Policy"] == "apg:scale=5.0,eta=0.5"
    assert fields["NFE"] == "4"
    assert fields["Size"] == "32x32"
    assert fields["CFG scale"] == "5.0"
    # Per-key text chunks are there too.
    assert image.text["prompt"] == "a red cat" and json.loads(image.text["seed"]) == 42

    # The stored policy spec reproduces the image through the Python API.
    api = generate(
        sd_model,
        {
            "prompt": meta["prompt"],
            "negative_prompt": meta["negative_prompt"],
            "seed": meta["seed"],
            "policy": meta["policy"],
            "steps": meta["steps"],
            "scheduler": meta["scheduler"],
            "width": 32,
            "height": 32,
        },
    )
    saved = np.asarray(image.convert("RGB"), dtype=np.int16)
    assert np.abs(saved - np.asarray(api.images[0], dtype=np.int16)).max() <= 1


def test_cli_generate_several_images_consecutive_seeds(tmp_path, capsys, sd_model):
    out = tmp_path / "shot.png"
    code, stdout, stderr = run_generate(
        capsys,
        "a blue dog",
        "--model",
        "builtin:tiny",
        "--device",
        "cpu",
        "--steps",
        "2",
        "--size",
        "32",
        "--seed",
        "10",
        "--num-images",
        "2",
        "--policy",
        "cfg:scale=3",
        "-o",
        str(out),
    )
    assert code == 0, stderr
    paths = [tmp_path / "shot-0.png", tmp_path / "shot-1.png"]
    assert sorted(tmp_path.iterdir()) == paths, "expected NAME-0.png and NAME-1.png only"
    metas = [read_png_metadata(str(p)) for p in paths]
    assert [m["seed"] for m in metas] == [10, 11]
    assert [Image.open(p).text["parameters"].split("Seed: ")[1].split(",")[0] for p in paths] == ["10", "11"]
    for m in metas:
        assert m["prompt"] == "a blue dog" and m["policy"] == "cfg:scale=3.0" and m["steps"] == 2 and m["nfe"] == 4
    # Without --quiet, one line per image: path, seed and NFE.
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert len(lines) == 2
    for line, path, seed in zip(lines, paths, (10, 11)):
        assert str(path) in line and f"seed={seed}" in line and "nfe=4" in line

    a, b = (np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in paths)
    assert np.abs(a - b).max() > 0, "different seeds must give different images"
    # Image k is the image of seed + k on its own.
    alone = generate(
        sd_model, {"prompt": "a blue dog", "seed": 11, "steps": 2, "policy": "cfg:scale=3", "width": 32, "height": 32}
    )
    assert np.abs(b - np.asarray(alone.images[0], dtype=np.int16)).max() <= 1


# --- CLI policies ----------------------------------------------------------------------------------------------


def test_cli_policies_lists_every_policy_with_parameters(capsys):
    assert main(["policies"]) == 0
    out = capsys.readouterr().out
    names = policy_names()
    assert {"cfg", "apg", "ag", "linear_ag", "cfg_zero_star", "perp_neg"} <= set(names)
    lines = out.splitlines()
    headers = [line.split(":")[0] for line in lines if line and not line.startswith(" ")]
    assert headers == names
    for name in names:
        start = lines.index(next(line for line in lines if line.startswith(f"{name}:")))
        block = []
        for line in lines[start + 1 :]:
            if not line.startswith(" "):
                break
            block.append(line.strip())
        params = {k: v for k, v in policy_class(name).Params.model_fields.items() if k != "name"}
        listed = [line.split(" = ")[0] for line in block]
        assert listed == list(params), f"{name}: {listed} != {list(params)}"
        for line, (key, info) in zip(block, params.items()):
            default = line.split(" = ", 1)[1].split("    ")[0]
            assert json.loads(default) == info.get_default(call_default_factory=True), f"{name}.{key}: {default}"


def test_cli_policies_json_is_a_schema_per_policy(capsys):
    assert main(["policies", "--json"]) == 0
    schemas = json.loads(capsys.readouterr().out)
    assert sorted(schemas) == policy_names()
    for name, schema in schemas.items():
        assert schema["type"] == "object"
        params = set(policy_class(name).Params.model_fields)
        assert set(schema["properties"]) == params, name
        assert schema["properties"]["name"].get("const", schema["properties"]["name"].get("default")) == name
        assert "scale" in schema["properties"] or "candidates" in schema["properties"], name
        assert schema.get("additionalProperties") is False, f"{name}: unknown parameters must be rejected"
    apg = schemas["apg"]["properties"]
    assert apg["eta"]["minimum"] == 0 and apg["eta"]["maximum"] == 1
    assert apg["momentum"]["default"] == -0.5
