"""The proving ground: a synthetic shapes world with an exact verifier and a held-out prompt suite.

* :mod:`.world` -- vocabulary, ``ObjectSpec`` / ``SceneSpec`` / ``PromptSpec``, captions and parsing;
* :mod:`.render` -- layout of a scene satisfying a prompt, antialiased rasterisation;
* :mod:`.verifier` -- ``verify(image, spec) -> VerifierReport`` (GenEval-style attributes);
* :mod:`.prompts` -- the held-out split, the training sampler, the suite as JSONL;
* :mod:`.dataset` -- ``TrainingScenes``: the deterministic training stream.
"""

from .dataset import Example, TrainingScenes
from .prompts import SuiteItem, heldout_suite, load_default_suite, read_suite_jsonl, write_suite_jsonl
from .render import render, render_prompt
from .verifier import VerifierReport, detect_objects, summarise, verify, verify_batch
from .world import CATEGORIES, COLOURS, SHAPES, Group, ObjectSpec, PromptSpec, SceneSpec, caption, parse_caption

__all__ = [
    "CATEGORIES",
    "COLOURS",
    "SHAPES",
    "Example",
    "Group",
    "ObjectSpec",
    "PromptSpec",
    "SceneSpec",
    "SuiteItem",
    "TrainingScenes",
    "VerifierReport",
    "caption",
    "detect_objects",
    "heldout_suite",
    "load_default_suite",
    "parse_caption",
    "read_suite_jsonl",
    "render",
    "render_prompt",
    "summarise",
    "verify",
    "verify_batch",
    "write_suite_jsonl",
]
