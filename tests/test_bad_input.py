"""Bad input gets one clear error naming the field (and, for closed sets, the accepted values), never a traceback.

Checked through the Python API (``GenerationParams.parse``, ``generate``, ``parse_policy``, ``load_model``), which
raise ``InvalidInput`` (a ``ValueError`` with ``.field``), and through the CLI (``diffsteer.service.cli.main`` returns 2 and
prints one line on stderr), plus one real run of the ``diffsteer`` console script.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from diffsteer.guidance.errors import InvalidInput
from diffsteer.guidance.models import load_model
from diffsteer.guidance.registry import parse_policy, policy_names
from diffsteer.guidance.request import GenerationParams, Limits
from diffsteer.guidance.sampler import generate
from diffsteer.guidance.schedulers import scheduler_names
from diffsteer.service.cli import main, parse_size

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    needs_hypothesis = pytest.mark.skipif(False, reason="")
except ImportError:  # hypothesis is a dev dependency; without it the property tests are skipped
    needs_hypothesis = pytest.mark.skip(reason="hypothesis is not installed")

    def given(*a, **k):
        return lambda f: f

    def settings(*a, **k):
        return lambda f: f

    class _Strategy:
        def __or__(self, other):
            return self

    class st:  # noqa: N801
        floats = lists = sampled_from = none = staticmethod(lambda *a, **k: _Strategy())


POLICIES = policy_names()
SCHEDULERS = scheduler_names()

# What the registry must hold, written out so that an empty or shrunken registry cannot pass the "accepted
# values are listed" checks vacuously.
EXPECTED_POLICIES = {"cfg", "apg", "ag", "linear_ag", "cfg_zero_star", "perp_neg"}
EXPECTED_SCHEDULERS = {"default", "ddim", "euler", "euler_a", "heun", "dpmpp_2m", "unipc"}

BASE = {"prompt": "a red cat", "steps": 2, "width": 32, "height": 32, "seed": 1}


@pytest.fixture(scope="module")
def console_script_run(tmp_path_factory):
    """Start ``diffsteer generate ... --policy nope:scale=3`` as a real subprocess; the test below collects it."""
    exe = shutil.which("diffsteer")
    command = (
        [exe] if exe else [sys.executable, "-c", "import sys; from diffsteer.service.cli import main; sys.exit(main())"]
    )
    tmp = tmp_path_factory.mktemp("console")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen(
        [*command, "generate", "a red cat", "--policy", "nope:scale=3", "-o", str(tmp / "x.png")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp,
    )
    yield proc, tmp
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module", autouse=True)
def _start_console_script_early(console_script_run):
    return console_script_run


def test_closed_sets_are_what_the_checks_expect():
    assert EXPECTED_POLICIES <= set(POLICIES)
    assert EXPECTED_SCHEDULERS <= set(SCHEDULERS)


# --------------------------------------------------------------------------------------------------------------
# The cases. Each: id, API overrides of BASE, CLI arguments, expected field, accepted values (or None), and
# fragments the message must contain.
# --------------------------------------------------------------------------------------------------------------

CASES = [
    ("unknown-policy", {"policy": "nope"}, ["--policy", "nope"], "policy.name", POLICIES, ["'nope'"]),
    (
        "unknown-policy-json",
        {"policy": {"name": "nope", "scale": 3}},
        ["--policy", '{"name": "nope", "scale": 3}'],
        "policy.name",
        POLICIES,
        ["'nope'"],
    ),
    ("policy-nan", {"policy": "cfg:scale=nan"}, ["--policy", "cfg:scale=nan"], "policy.scale", None, ["finite"]),
    (
        "policy-NaN-json",
        {"policy": {"name": "cfg", "scale": math.nan}},
        ["--policy", '{"name": "cfg", "scale": NaN}'],
        "policy.scale",
        None,
        ["finite"],
    ),
    ("policy-inf", {"policy": "cfg:scale=inf"}, ["--policy", "cfg:scale=inf"], "policy.scale", None, ["finite"]),
    (
        "policy-Infinity",
        {"policy": "cfg:scale=Infinity"},
        ["--policy", "cfg:scale=Infinity"],
        "policy.scale",
        None,
        ["finite"],
    ),
    ("apg-eta-2", {"policy": "apg:eta=2"}, ["--policy", "apg:eta=2"], "policy.eta", None, ["1"]),
    ("cfg-rescale-neg", {"policy": "cfg:rescale=-1"}, ["--policy", "cfg:rescale=-1"], "policy.rescale", None, ["0"]),
    ("cfg-scale-too-big", {"policy": "cfg:scale=1000"}, ["--policy", "cfg:scale=1000"], "policy.scale", None, ["100"]),
    ("malformed-spec", {"policy": "cfg:scale"}, ["--policy", "cfg:scale"], "policy", None, ["'scale'", "key=value"]),
    (
        "spec-given-twice",
        {"policy": "cfg:scale=3,scale=4"},
        ["--policy", "cfg:scale=3,scale=4"],
        "policy.scale",
        None,
        ["twice"],
    ),
    ("invalid-json", {"policy": '{"name": "cfg",'}, ["--policy", '{"name": "cfg",'], "policy", None, ["JSON"]),
    ("json-not-object", {"policy": 7}, None, "policy", None, ["int"]),
    ("steps-0", {"steps": 0}, ["--steps", "0"], "steps", None, ["1"]),
    ("steps-negative", {"steps": -3}, ["--steps", "-3"], "steps", None, ["1"]),
    ("steps-above-max", {"steps": 201}, ["--steps", "201"], "steps", None, ["201", "200"]),
    ("width-not-multiple-of-8", {"width": 33}, ["--size", "33x32"], "width", None, ["multiple of 8", "33"]),
    ("height-not-multiple-of-8", {"height": 36}, ["--size", "32x36"], "height", None, ["multiple of 8", "36"]),
    ("width-too-small", {"width": 0}, ["--size", "0x32"], "width", None, ["8"]),
    ("unknown-scheduler", {"scheduler": "foo"}, ["--scheduler", "foo"], "scheduler", SCHEDULERS, ["'foo'"]),
    ("num-images-0", {"num_images": 0}, ["--num-images", "0"], "num_images", None, ["1"]),
    ("num-images-above-max", {"num_images": 17}, ["--num-images", "17"], "num_images", None, ["16"]),
    ("seed-negative", {"seed": -1}, ["--seed", "-1"], "seed", None, ["0"]),
    ("seed-too-big", {"seed": 2**63}, ["--seed", str(2**63)], "seed", None, []),
    ("eta-nan", {"eta": math.nan}, ["--eta", "nan"], "eta", None, ["finite"]),
    ("eta-above-1", {"eta": 1.5}, ["--eta", "1.5"], "eta", None, ["1"]),
    ("prompt-too-long", {"prompt": "cat " * 1001}, None, "prompt", None, ["4004", "4000"]),
    (
        "negative-too-long",
        {"negative_prompt": "x" * 4001},
        ["--negative", "x" * 4001],
        "negative_prompt",
        None,
        ["4001", "4000"],
    ),
    ("prompt-not-a-string", {"prompt": 5}, None, "prompt", None, ["string"]),
    ("unknown-request-field", {"guidance_scale": 7}, None, "guidance_scale", None, []),
    ("prompt-empty-list", {"prompt": []}, None, "prompt", None, ["empty"]),
    (
        "prompt-list-vs-num-images",
        {"prompt": ["a cat", "a dog"], "num_images": 3},
        None,
        "num_images",
        None,
        ["3", "2"],
    ),
    ("seed-and-seeds", {"seeds": [1, 2], "num_images": 2}, None, "seeds", None, ["seed"]),
    ("seeds-length", {"seed": None, "seeds": [1, 2, 3], "num_images": 2}, None, "seeds", None, ["3", "2"]),
    ("seeds-negative", {"seed": None, "seeds": [1, -2], "num_images": 2}, None, "seeds.1", None, ["0"]),
]
API_CASES = [pytest.param(c[1], c[3], c[4], c[5], id=c[0]) for c in CASES]
CLI_CASES = [pytest.param(c[2], c[3], c[4], c[5], id=c[0]) for c in CASES if c[2] is not None]


def check_error(err: InvalidInput, field: str, accepted, fragments) -> None:
    assert isinstance(err, ValueError)
    assert err.field == field, f"field {err.field!r} != {field!r} ({err})"
    message = str(err)
    assert message.startswith(f"{field}: "), message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    if accepted is not None:
        assert "accepted values" in message, message
        for value in accepted:
            assert value in message, f"accepted value {value!r} not listed in {message!r}"
    assert "Traceback" not in message


@pytest.mark.parametrize("overrides, field, accepted, fragments", API_CASES)
def test_params_parse_names_field(overrides, field, accepted, fragments):
    with pytest.raises(InvalidInput) as info:
        GenerationParams.parse({**BASE, **overrides})
    check_error(info.value, field, accepted, fragments)


@pytest.mark.parametrize("overrides, field, accepted, fragments", API_CASES)
def test_generate_names_field(sd_model, overrides, field, accepted, fragments):
    with pytest.raises(InvalidInput) as info:
        generate(sd_model, {**BASE, **overrides})
    check_error(info.value, field, accepted, fragments)


def test_valid_base_request_is_accepted():
    """The cases above differ from BASE by one field only, so BASE itself must be fine."""
    params = GenerationParams.parse(BASE)
    assert (params.steps, params.width, params.height, params.seed) == (2, 32, 32, 1)


# --- parse_policy directly --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, field, accepted, fragments",
    [
        pytest.param("nope", "policy.name", POLICIES, ["'nope'"], id="unknown-name"),
        pytest.param("nope:scale=3", "policy.name", POLICIES, ["'nope'"], id="unknown-name-with-params"),
        pytest.param({"scale": 3}, "policy.name", POLICIES, ["missing"], id="json-missing-name"),
        pytest.param("", "policy.name", POLICIES, [], id="empty"),
        pytest.param("cfg:scale=nan", "policy.scale", None, ["finite"], id="nan"),
        pytest.param("cfg:scale=-inf", "policy.scale", None, [], id="minus-inf"),
        pytest.param("cfg:scales=[1,NaN]", "policy.scales.1", None, ["finite"], id="nan-in-list"),
        pytest.param("apg:eta=2", "policy.eta", None, [], id="apg-eta"),
        pytest.param("apg:momentum=-2", "policy.momentum", None, [], id="apg-momentum"),
        pytest.param("cfg:rescale=-1", "policy.rescale", None, [], id="rescale"),
        pytest.param("linear_ag:period=0", "policy.period", None, [], id="linear-ag-period"),
        pytest.param("cfg:schedule=wobbly", "policy.schedule", ["constant", "linear", "cosine"], [], id="schedule"),
        pytest.param("ag:space=pixels", "policy.space", ["x0", "eps"], [], id="ag-space"),
        pytest.param("cfg:scale", "policy", None, ["key=value"], id="malformed"),
        pytest.param('{"name": "cfg",', "policy", None, ["invalid JSON"], id="bad-json"),
        pytest.param('{"name": "cfg", "scale": }', "policy", None, ["invalid JSON"], id="bad-json-value"),
        pytest.param("cfg:scales=[]", "policy", None, ["scales"], id="empty-scales"),
    ],
)
def test_parse_policy_errors(spec, field, accepted, fragments):
    with pytest.raises(InvalidInput) as info:
        parse_policy(spec)
    err = info.value
    assert err.field == field, str(err)
    for fragment in fragments:
        assert fragment in str(err)
    for value in accepted or []:
        assert repr(value) in str(err) or value in str(err), f"{value!r} not in {err}"


@pytest.mark.parametrize("prompt", [["a cat", 5], [None]], ids=["int-in-list", "none-in-list"])
def test_bad_prompt_list_item_names_prompt_without_pydantic_internals(prompt):
    """``prompt`` is ``str | list[str]``: the error must name ``prompt`` (or the list item), not pydantic's union
    branches (``prompt.str``, ``prompt.list[str]``)."""
    with pytest.raises(InvalidInput) as info:
        GenerationParams.parse({**BASE, "prompt": prompt})
    err = info.value
    assert err.field in ("prompt", f"prompt.{len(prompt) - 1}"), str(err)
    assert "list[str]" not in str(err) and "prompt.str" not in str(err), str(err)


def test_closed_set_messages_for_policy_name_list_every_policy():
    with pytest.raises(InvalidInput) as info:
        parse_policy("nope")
    check_error(info.value, "policy.name", POLICIES, ["accepted values"])


def test_cross_field_interval_is_rejected_naming_interval():
    """interval_start ≥ interval_end is a cross-field check: the error may name the policy or the field."""
    for spec in (
        "cfg:interval_start=0.8,interval_end=0.2",
        {"name": "cfg", "interval_start": 0.5, "interval_end": 0.5},
    ):
        with pytest.raises(InvalidInput) as info:
            parse_policy(spec)
        assert info.value.field in ("policy", "policy.interval_start", "policy.interval_end"), str(info.value)
        assert "interval_start" in str(info.value)
    with pytest.raises(InvalidInput) as info:
        GenerationParams.parse({**BASE, "policy": "cfg:interval_start=0.8,interval_end=0.2"})
    assert info.value.field.startswith("policy") and "interval_start" in str(info.value)


def test_unknown_policy_parameter_names_field_and_lists_accepted_parameters():
    """A policy's parameters are a closed set: the error names the bad one and lists the accepted ones."""
    with pytest.raises(InvalidInput) as info:
        parse_policy("cfg:bogus=1")
    err = info.value
    assert err.field == "policy.bogus", str(err)
    for name in ("scale", "rescale", "schedule", "scales", "interval_start", "interval_end"):
        assert name in str(err), f"accepted parameter {name!r} not listed in {err}"

    with pytest.raises(InvalidInput) as info:
        parse_policy({"name": "apg", "sclae": 5})
    assert info.value.field == "policy.sclae"
    for name in ("scale", "eta", "momentum", "norm_threshold"):
        assert name in str(info.value), f"accepted parameter {name!r} not listed in {info.value}"


def test_unknown_policy_parameter_through_the_request_and_generate(sd_model):
    for call in (GenerationParams.parse, lambda d: generate(sd_model, d)):
        with pytest.raises(InvalidInput) as info:
            call({**BASE, "policy": "apg:sclae=5"})
        assert info.value.field == "policy.sclae", str(info.value)
        assert "momentum" in str(info.value), f"accepted parameters not listed in {info.value}"


def test_parse_policy_does_not_mutate_its_input():
    spec = {"name": "apg", "scale": 10}
    parse_policy(spec)
    assert spec == {"name": "apg", "scale": 10}


# --- step-dependent policy checks (only knowable with steps) --------------------------------------------------


def test_scales_length_mismatch_is_refused_by_generate(sd_model):
    with pytest.raises(InvalidInput) as info:
        generate(sd_model, {**BASE, "steps": 5, "policy": "cfg:scales=[1,2]"})
    err = info.value
    assert err.field == "policy.scales"
    assert "2" in str(err) and "5" in str(err), str(err)


@pytest.mark.parametrize("scheduler, steps", [("heun", 3), ("pndm", 4)])
def test_scales_one_per_requested_step_is_accepted_by_every_scheduler(sd_model, scheduler, steps):
    """``scales`` is documented as one value per step. Heun (2 evaluations per step) and PNDM (Runge-Kutta
    warm-up) have more timesteps than ``steps``; a list of ``steps`` scales must still be accepted, and an error
    must never quote a step count the user did not ask for."""
    try:
        result = generate(
            sd_model,
            {**BASE, "steps": steps, "scheduler": scheduler, "policy": {"name": "cfg", "scales": [1.0] * steps}},
        )
    except InvalidInput as e:
        pytest.fail(f"{scheduler}: valid per-step scales refused: {e}")
    assert result.pixels.shape == (1, 3, 32, 32)


@pytest.mark.parametrize("steps", [1, 3])
def test_few_steps_with_pndm_is_generated_or_refused_naming_steps(sd_model, steps):
    """PNDM's Runge-Kutta warm-up needs 4 steps when the checkpoint's config does not skip it (the built-in and
    SDXL configs do not): fewer must be generated (e.g. with skip_prk_steps) or refused as bad input, never
    raise diffusers' internal broadcasting error."""
    request = {**BASE, "steps": steps, "scheduler": "pndm", "policy": "cfg:scale=1"}
    try:
        result = generate(sd_model, request)
    except InvalidInput as e:
        assert e.field in ("steps", "scheduler"), str(e)
        assert "4" in str(e), str(e)
    else:
        assert result.pixels.shape == (1, 3, 32, 32)
        assert bool(result.pixels.isfinite().all())


# --- configurable limits --------------------------------------------------------------------------------------


def test_size_above_configured_maximum(sd_model):
    limits = Limits(max_width=64, max_height=48)
    assert GenerationParams.parse({**BASE, "width": 64, "height": 48}, limits).width == 64
    for key, value, maximum in (("width", 72, 64), ("height", 56, 48)):
        for call in (lambda d: GenerationParams.parse(d, limits), lambda d: generate(sd_model, d, limits=limits)):
            with pytest.raises(InvalidInput) as info:
                call({**BASE, key: value})
            check_error(info.value, key, None, [str(value), str(maximum)])
    # The default limits accept 72: the refusal above came from the configured limit.
    assert GenerationParams.parse({**BASE, "width": 72}).width == 72


def test_steps_above_configured_maximum():
    limits = Limits(max_steps=10)
    assert GenerationParams.parse({**BASE, "steps": 10}, limits).steps == 10
    with pytest.raises(InvalidInput) as info:
        GenerationParams.parse({**BASE, "steps": 11}, limits)
    check_error(info.value, "steps", None, ["11", "10"])


# --- load_model ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["/nonexistent/diffsteer/model", "./no-such-model-dir", "no-such-model.safetensors"])
def test_load_model_missing_path(spec):
    with pytest.raises(InvalidInput) as info:
        load_model(spec, device="cpu")
    assert info.value.field == "model"
    assert spec in str(info.value) and "does not exist" in str(info.value)


def test_load_model_unknown_builtin_lists_builtins():
    with pytest.raises(InvalidInput) as info:
        load_model("builtin:huge", device="cpu")
    check_error(info.value, "model", ["builtin:tiny", "builtin:tiny-v", "builtin:tiny-sdxl"], ["'builtin:huge'"])


def test_load_model_bad_dtype_and_attention():
    with pytest.raises(InvalidInput) as info:
        load_model("builtin:tiny", device="cpu", dtype="fp8")
    check_error(info.value, "dtype", ["fp32", "fp16", "bf16"], ["'fp8'"])
    with pytest.raises(InvalidInput) as info:
        load_model("builtin:tiny", device="cpu", attention="flash")
    check_error(info.value, "attention", ["auto", "sdpa", "xformers"], ["'flash'"])


def test_load_model_bad_device_is_invalid_input():
    with pytest.raises(InvalidInput) as info:
        load_model("builtin:tiny", device="gpu0")
    assert info.value.field == "device", str(info.value)


@pytest.mark.parametrize(
    "suffix, content", [(".safetensors", b"this is not a safetensors file"), (".ckpt", b"garbage")]
)
def test_load_model_corrupt_checkpoint_file_is_invalid_input(tmp_path, suffix, content):
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(content)
    with pytest.raises(InvalidInput) as info:
        load_model(str(path), device="cpu")
    assert info.value.field == "model"
    assert str(path) in str(info.value)


def test_load_model_folder_without_model_index(tmp_path):
    """An existing local folder that is not a diffusers layout: say what is missing, not a hub-id error."""
    (tmp_path / "unet").mkdir()
    with pytest.raises(InvalidInput) as info:
        load_model(str(tmp_path), device="cpu")
    assert info.value.field == "model"
    assert str(tmp_path) in str(info.value)
    assert "model_index.json" in str(info.value), str(info.value)


# --- spec string == JSON object == JSON string; spec() round trip ------------------------------------------------


def test_spec_string_and_json_parse_to_equal_objects():
    obj = {"name": "apg", "scale": 10, "eta": 0, "momentum": -0.5}
    from_spec = parse_policy("apg:scale=10,eta=0,momentum=-0.5")
    from_obj = parse_policy(obj)
    from_json = parse_policy(json.dumps(obj))
    assert from_spec == from_obj == from_json
    assert type(from_spec).__name__ == "APGParams"
    assert (from_spec.scale, from_spec.eta, from_spec.momentum) == (10.0, 0.0, -0.5)
    # ... and the same through the request schema.
    requests = [
        GenerationParams.parse({**BASE, "policy": p})
        for p in ("apg:scale=10,eta=0,momentum=-0.5", obj, json.dumps(obj))
    ]
    assert requests[0] == requests[1] == requests[2]
    assert requests[0].policy == from_spec
    # Inequality is detected (the equality above is not vacuous).
    assert parse_policy("apg:scale=10,eta=0,momentum=-0.4") != from_spec


def test_spec_string_with_list_and_whitespace_equals_json():
    a = parse_policy(" cfg: scales=[7, 5,3], rescale=0.7 ")
    b = parse_policy({"name": "cfg", "scales": [7, 5, 3], "rescale": 0.7})
    assert a == b and a.scales == [7.0, 5.0, 3.0]


ROUND_TRIP = [
    "cfg",
    "cfg:scale=5",
    "cfg:scale=0.30000000000000004,rescale=0.7",
    "cfg:schedule=linear,scale=9,scale_end=2",
    "cfg:scales=[7,5.5,3]",
    "cfg:interval_start=0.2,interval_end=0.8",
    "cfg:sigma_low=0.28,sigma_high=5.42",
    "apg:scale=10,eta=0,momentum=-0.5",
    "apg:scale=12.5,eta=0.25,momentum=0,norm_threshold=15",
    "ag:scale=6,gamma_bar=0.995,space=eps",
    "linear_ag:scale=8,warmup_steps=4,period=3,extrapolate=false",
    "cfg_zero_star:scale=4,zero_init_steps=1",
    "perp_neg:scale=7,negative_scale=3",
    "perp_neg:scale=1e-05",
]


@pytest.mark.parametrize("spec", ROUND_TRIP)
def test_params_spec_round_trips(spec):
    params = parse_policy(spec)
    compact = params.spec()
    again = parse_policy(compact)
    assert again == params, f"{spec!r} -> {compact!r} -> {again!r}"
    assert again.spec() == compact
    assert compact.split(":")[0] == params.name


def test_every_registered_policy_round_trips_its_defaults():
    for name in POLICIES:
        params = parse_policy(name)
        assert params.spec() == name
        assert parse_policy(params.spec()) == params


finite = dict(allow_nan=False, allow_infinity=False)


@needs_hypothesis
@settings(max_examples=60, deadline=None)
@given(
    scale=st.floats(0, 100, **finite),
    rescale=st.floats(0, 1, **finite),
    schedule=st.sampled_from(["constant", "linear", "cosine"]),
    scales=st.none() | st.lists(st.floats(0, 100, **finite), min_size=1, max_size=6),
    start=st.floats(0, 0.49, **finite),
    end=st.floats(0.5, 1, **finite),
)
def test_cfg_spec_round_trip_property(scale, rescale, schedule, scales, start, end):
    params = parse_policy(
        {
            "name": "cfg",
            "scale": scale,
            "rescale": rescale,
            "schedule": schedule,
            "scales": scales,
            "interval_start": start,
            "interval_end": end,
        }
    )
    assert parse_policy(params.spec()) == params


@needs_hypothesis
@settings(max_examples=60, deadline=None)
@given(
    scale=st.floats(0, 100, **finite),
    eta=st.floats(0, 1, **finite),
    momentum=st.floats(-1, 1, **finite),
    threshold=st.floats(0, 1e6, **finite),
)
def test_apg_spec_round_trip_property(scale, eta, momentum, threshold):
    params = parse_policy(
        {"name": "apg", "scale": scale, "eta": eta, "momentum": momentum, "norm_threshold": threshold}
    )
    assert parse_policy(params.spec()) == params


# --- CLI ------------------------------------------------------------------------------------------------------------


def cli_base(tmp_path) -> list[str]:
    return [
        "generate",
        "a red cat",
        "-q",
        "--model",
        "builtin:tiny",
        "--device",
        "cpu",
        "--steps",
        "2",
        "--size",
        "32",
        "--seed",
        "1",
        "-o",
        str(tmp_path / "out.png"),
    ]


def run_cli(capsys, argv) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def check_cli_error(code, err, field, accepted=None, fragments=()):
    assert code == 2, f"exit code {code}, stderr {err!r}"
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {err!r}"
    line = lines[0]
    assert line.startswith(f"diffsteer: error: {field}: "), line
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    for value in accepted or []:
        assert value in line, f"accepted value {value!r} not listed in {line!r}"


@pytest.mark.parametrize("args, field, accepted, fragments", CLI_CASES)
def test_cli_bad_input(tmp_path, capsys, args, field, accepted, fragments):
    code, out, err = run_cli(capsys, [*cli_base(tmp_path), *args])
    check_cli_error(code, err, field, accepted, fragments)
    assert not list(tmp_path.iterdir()), "no image may be written for a refused request"


@pytest.mark.parametrize("size", ["abc", "32x", "x32", "32x32x32", "32*32", "", "3.5x32"])
def test_cli_malformed_size(tmp_path, capsys, size):
    code, out, err = run_cli(capsys, [*cli_base(tmp_path), "--size", size])
    check_cli_error(code, err, "--size", fragments=["WxH"])
    with pytest.raises(InvalidInput) as info:
        parse_size(size)
    assert info.value.field == "--size"


def test_parse_size_accepts_good_sizes():
    assert parse_size("64x48") == (64, 48)
    assert parse_size("32") == (32, 32)
    assert parse_size("64X32") == (64, 32)


def test_cli_max_size(tmp_path, capsys):
    code, out, err = run_cli(capsys, [*cli_base(tmp_path), "--size", "128x32", "--max-size", "64"])
    check_cli_error(code, err, "width", fragments=["128", "64"])
    code, out, err = run_cli(capsys, [*cli_base(tmp_path), "--size", "32x72", "--max-size", "64"])
    check_cli_error(code, err, "height", fragments=["72", "64"])


def test_cli_scales_length_mismatch(tmp_path, capsys):
    code, out, err = run_cli(capsys, [*cli_base(tmp_path), "--steps", "5", "--policy", "cfg:scales=[1,2]"])
    check_cli_error(code, err, "policy.scales", fragments=["2", "5"])
    assert not (tmp_path / "out.png").exists()


def test_cli_interval_order(tmp_path, capsys):
    code, out, err = run_cli(capsys, [*cli_base(tmp_path), "--policy", "cfg:interval_start=0.8,interval_end=0.2"])
    assert code == 2 and "Traceback" not in err
    assert err.startswith("diffsteer: error: policy") and "interval_start" in err


def test_cli_unknown_policy_parameter(tmp_path, capsys):
    code, out, err = run_cli(capsys, [*cli_base(tmp_path), "--policy", "apg:sclae=5"])
    check_cli_error(code, err, "policy.sclae", fragments=["scale", "eta", "momentum", "norm_threshold"])


@pytest.mark.parametrize("model", ["/nonexistent/diffsteer/model", "missing.safetensors"])
def test_cli_missing_model(tmp_path, capsys, model):
    code, out, err = run_cli(capsys, [*cli_base(tmp_path), "--model", model])
    check_cli_error(code, err, "model", fragments=[model, "does not exist"])


def test_cli_bad_output_suffix(tmp_path, capsys):
    argv = cli_base(tmp_path)
    argv[-1] = str(tmp_path / "out.jpg")
    code, out, err = run_cli(capsys, argv)
    check_cli_error(code, err, "--output", fragments=[".png"])


def test_cli_bad_dtype(tmp_path, capsys):
    code, out, err = run_cli(capsys, [*cli_base(tmp_path), "--dtype", "fp8"])
    check_cli_error(code, err, "dtype", accepted=["fp32", "fp16", "bf16"])


def test_cli_bad_device(tmp_path, capsys):
    code, out, err = run_cli(capsys, [*cli_base(tmp_path), "--device", "gpu0"])
    check_cli_error(code, err, "device")


def test_cli_pndm_with_few_steps_does_not_traceback(tmp_path, capsys):
    code, out, err = run_cli(
        capsys, [*cli_base(tmp_path), "--scheduler", "pndm", "--steps", "2", "--policy", "cfg:scale=1"]
    )
    if code != 0:
        check_cli_error(code, err, "steps", fragments=["4"])


def test_cli_non_integer_steps_is_an_argparse_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main([*cli_base(tmp_path), "--steps", "many"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--steps" in err and "Traceback" not in err


def test_cli_valid_base_succeeds(tmp_path, capsys):
    """The CLI cases above differ from cli_base by one option, so cli_base itself must work."""
    code, out, err = run_cli(capsys, cli_base(tmp_path))
    assert code == 0, err
    assert (tmp_path / "out.png").is_file()


@pytest.mark.slow
def test_console_script_prints_no_traceback(console_script_run):
    """One real run of the installed ``diffsteer`` entry point (started at the beginning of the module, see
    ``console_script_run``, so that its interpreter start-up overlaps the in-process tests)."""
    proc, tmp = console_script_run
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the diffsteer console script did not finish within 240 s")
    assert proc.returncode == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("diffsteer: error: policy.name: unknown value 'nope'"), stderr
    assert "accepted values" in lines[0]
    for name in EXPECTED_POLICIES:
        assert name in lines[0]
    assert stdout == ""
    assert not list(tmp.iterdir()), "no image may be written"


def test_huge_num_images_is_refused_before_anything_is_allocated():
    """Found by the service fuzz: the limit check must not build one prompt per requested image first."""
    with pytest.raises(InvalidInput) as info:
        GenerationParams.parse({"prompt": "x", "num_images": 133_919_408_339})
    assert info.value.field == "num_images"
