"""How schemathesis generates the string formats of diffsteer's schema (``service/openapi.py``): valid policy
spec strings, OpenAI image sizes and A/B arm strings within the server's limits. Used by
tests/test_service_fuzz.py and, for the command line, ``SCHEMATHESIS_HOOKS=schemathesis_hooks`` (with tests/ on
PYTHONPATH)."""

from __future__ import annotations

import os

import schemathesis
from hypothesis import strategies as st

MAX_SIZE = int(os.environ.get("DIFFSTEER_FUZZ_MAX_SIZE", "32"))

# cheap, always-valid policies (values inside every range and independent of the steps)
SPECS = st.one_of(
    st.sampled_from(["cfg", "apg", "ag", "linear_ag", "cfg_zero_star", "perp_neg"]),
    st.builds(
        lambda name, w: f"{name}:scale={w:g}",
        st.sampled_from(["cfg", "apg", "ag", "cfg_zero_star"]),
        st.floats(0, 20, allow_nan=False).map(lambda x: round(x, 2)),
    ),
    st.builds(
        lambda a, b: f"cfg:interval_start={a},interval_end={b}",
        st.sampled_from([0, 0.1, 0.2]),
        st.sampled_from([0.5, 0.9, 1]),
    ),
)
sizes = st.sampled_from(range(8, MAX_SIZE + 1, 8))

schemathesis.openapi.format("diffsteer-policy-spec", SPECS)
schemathesis.openapi.format(
    "diffsteer-image-size", st.one_of(st.just("auto"), st.builds(lambda w, h: f"{w}x{h}", sizes, sizes))
)
schemathesis.openapi.format(
    "diffsteer-arm", st.builds(lambda name, spec: f"{name}={spec}", st.from_regex(r"\A[a-z]{1,8}\Z"), SPECS)
)

# Reward-driven policies run whole optimisation loops (ReNO: up to 1000 sampling passes) and can pass any
# request timeout on a CPU; until the cost-aware scheduler refuses them by cost, the fuzzer leaves them out.
EXPENSIVE = ("reno", "dynamic_cfg")


def _expensive(value) -> bool:
    if isinstance(value, dict):
        return any(_expensive(v) for v in value.values()) or value.get("name") in EXPENSIVE
    if isinstance(value, list):
        return any(_expensive(v) for v in value)
    return isinstance(value, str) and any(part.strip().startswith(EXPENSIVE) for part in value.split("="))


@schemathesis.hook
def filter_body(ctx, body) -> bool:
    return not _expensive(body)


@schemathesis.hook
def filter_case(ctx, case) -> bool:  # the coverage phase's cases too
    return not _expensive(case.body)
