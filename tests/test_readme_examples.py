"""The request examples of README.md and service/README.md validate against the published OpenAPI schema
(with a JSON-Schema validator, ``jsonschema``), and the server accepts them; bad requests fail the same
validation, so the check cannot pass vacuously."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

jsonschema = pytest.importorskip("jsonschema")

from test_service_support import one_thread, settings  # noqa: E402,F401

ROOT = Path(__file__).resolve().parents[1]
# `curl ... localhost:PORT/PATH ... -d '{...}'`, possibly continued over lines with a backslash
CURL = re.compile(r"curl [^\n]*?localhost:\d+(/[\w/.-]*)(?:[^\n]*\\\n)*?[^\n]*?-d '([^']*)'")


def examples() -> list[tuple[str, str, dict]]:
    found = []
    for name in ("README.md", "service/README.md"):
        for m in CURL.finditer((ROOT / name).read_text(encoding="utf-8")):
            found.append((name, m.group(1), json.loads(m.group(2))))
    return found


@pytest.fixture(scope="module")
def schema():
    """The schema a server with the default settings and the default model publishes."""
    from diffsteer.service.app import create_app
    from diffsteer.service.settings import ServiceSettings

    return create_app(ServiceSettings(preload=False)).openapi()


def validator(schema: dict, path: str):
    body = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    root = {**body, "components": schema["components"]}  # '#/components/schemas/...' resolves in this document
    cls = jsonschema.validators.validator_for({"$schema": "https://json-schema.org/draft/2020-12/schema"})
    cls.check_schema(root)
    return cls(root)


def test_there_are_examples_of_every_generation_route():
    paths = {path for _, path, _ in examples()}
    assert {"/generate", "/jobs", "/v1/images/generations", "/sdapi/v1/txt2img", "/ab"} <= paths


@pytest.mark.parametrize(("readme", "path", "body"), examples())
def test_readme_examples_validate(schema, readme, path, body):
    errors = [e.message for e in validator(schema, path).iter_errors(body)]
    assert not errors, (readme, path, body, errors)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/generate", {"prompt": "x", "policy": {"name": "apg", "scale": "6"}}),  # a string is not a number
        ("/generate", {"prompt": "x", "policy": {"name": "nope"}}),
        ("/generate", {"prompt": "x", "policy": {"name": "cfg", "eta": 0}}),  # apg's parameter, not cfg's
        ("/generate", {"prompt": "x", "policy": "nope:scale=1"}),
        ("/generate", {"prompt": "x", "steps": 10_000}),
        ("/generate", {"prompt": "x", "width": 63}),
        ("/generate", {"prompt": "x", "seed": 1, "seeds": [1]}),
        ("/v1/images/generations", {"prompt": "x", "n": 100}),
        ("/sdapi/v1/txt2img", {"prompt": "x", "enable_hr": True}),
        ("/ab", {"arms": ["a=cfg", "b=cfg"], "prompts": "pg:all", "output_dir": "/tmp"}),
    ],
)
def test_bad_requests_fail_the_same_validation(schema, path, body):
    assert list(validator(schema, path).iter_errors(body))


def test_policy_forms_of_the_issue_validate(schema):
    v = validator(schema, "/generate")
    for policy in ("apg:scale=6", {"name": "apg", "scale": 6}, "cfg", {"name": "reno", "iterations": 3}):
        assert not list(v.iter_errors({"prompt": "x", "policy": policy})), policy


def test_the_server_accepts_the_examples(one_thread, tmp_path):  # noqa: F811
    """Every example on a server (the tiny model, few steps: what matters is that it is accepted)."""
    from fastapi.testclient import TestClient
    from test_service_support import wait_ready

    from diffsteer.service.app import create_app

    app = create_app(settings(max_steps=50, max_width=64, max_height=64, ab_dir=str(tmp_path)))
    with TestClient(app) as client:
        wait_ready(client)
        for readme, path, body in examples():
            body = {**body, "steps": 2}
            if path == "/v1/images/generations":
                body["size"] = "32x32"
            r = client.post(path, json=body)
            assert r.status_code in (200, 202), (readme, path, body, r.status_code, r.text[:300])
            if path == "/ab":
                client.delete(r.headers["location"])
