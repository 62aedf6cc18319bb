"""Bounded property-based fuzzing against a live server: every operation of the OpenAPI schema with
schemathesis (valid and invalid inputs): no answer is ever a 5xx; and random *valid* generation requests
(any text, sizes, schedulers, policies within the limits): every one succeeds."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from test_service_support import live_server, one_thread  # noqa: F401

schemathesis = pytest.importorskip("schemathesis")

from schemathesis import GenerationMode  # noqa: E402

EXAMPLES = 300


@pytest.fixture(scope="module")
def server(one_thread, tmp_path_factory):  # noqa: F811
    # tiny limits keep the valid generations (and A/B runs) cheap; a short queue makes 429s part of the run
    with live_server(max_steps=3, max_width=32, max_height=32, max_num_images=2, queue_size=2, max_concurrent=1,
                     batching=False, request_timeout_s=20.0, job_ttl_s=5.0, ab_dir=str(tmp_path_factory.mktemp("ab")),
                     ab_max_images=8, ab_queue_size=1) as s:
        yield s


@pytest.fixture(scope="module")
def cases(server):
    schema = schemathesis.openapi.from_dict(server.app.openapi())
    strategies = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategies.append(operation.as_strategy(generation_mode=mode))
    assert len(strategies) >= 2 * 15  # every route is in the schema
    return st.one_of(strategies)


def test_no_input_gives_a_server_error(server, cases):
    seen: dict[int, int] = {}

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def check(data):
        case = data.draw(cases)
        response = case.call(base_url=server.url, timeout=30)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, (case.method, case.path, case.body, response.status_code, response.text[:500])
        content_type = response.headers.get("content-type") or [""]
        content_type = content_type[0] if isinstance(content_type, list) else content_type
        if response.status_code >= 400 and content_type.startswith("application/json"):
            error = response.json().get("error")
            assert error and error.get("message"), response.text[:500]

    check()
    assert any(code < 300 for code in seen) and any(400 <= code < 500 for code in seen), seen


CHEAP_POLICIES = ["cfg", "apg", "ag", "linear_ag", "cfg_zero_star", "perp_neg"]
SCHEDULERS = ["default", "ddim", "ddpm", "pndm", "lms", "euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_karras", "unipc"]


@st.composite
def valid_bodies(draw):
    size = st.sampled_from([8, 16, 24, 32])
    body = {
        "prompt": draw(st.text(max_size=60)),
        "steps": draw(st.integers(1, 3)),
        "scheduler": draw(st.sampled_from(SCHEDULERS)),
        "policy": {"name": draw(st.sampled_from(CHEAP_POLICIES)),
                   "scale": draw(st.floats(0, 20, allow_nan=False, allow_infinity=False))},
        "width": draw(size),
        "height": draw(size),
        "num_images": draw(st.integers(1, 2)),
        "seed": draw(st.integers(0, 2**63 - 1)),
        "output_format": draw(st.sampled_from(["png", "jpeg", "webp"])),
    }
    if draw(st.booleans()):
        body["negative_prompt"] = draw(st.text(max_size=30))
    return body


def test_valid_requests_always_succeed(server):
    import httpx

    @settings(max_examples=30, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(body=valid_bodies())
    def check(body):
        r = httpx.post(f"{server.url}/generate", json=body, timeout=60)
        assert r.status_code == 200, (body, r.status_code, r.text[:500])
        result = r.json()
        assert len(result["images"]) == body["num_images"] and result["seeds"][0] == body["seed"]
        assert (result["width"], result["height"]) == (body["width"], body["height"])

    check()
