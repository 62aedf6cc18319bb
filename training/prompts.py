"""Training prompt sources.

* ``pg-train:all`` or ``pg-train:CATEGORY[,CATEGORY...]``: the proving ground's training prompts (every
  caption form of the specs training may see; the held-out combinations of the combinatorial categories are
  excluded, single-object prompts are held out by seed only);
* any prompt source of :func:`diffsteer.evaluation.prompts.load_prompts` (a text file, GenEval JSONL, PartiPrompts TSV,
  or ``pg:...`` to train on the held-out suite's prompts deliberately).
"""

from __future__ import annotations

from diffsteer.evaluation.prompts import load_prompts
from diffsteer.guidance.errors import InvalidInput
from diffsteer.proving_ground import CATEGORIES, caption
from diffsteer.proving_ground.prompts import training_prompt_specs

PREFIX = "pg-train:"


def load_training_prompts(source: str, field: str = "prompts") -> list[str]:
    """The distinct prompt texts of ``source``, in a fixed order."""
    if not isinstance(source, str) or not source.strip():
        raise InvalidInput(
            field, "empty; accepted: pg-train:all, pg-train:CATEGORY[,...], or an evaluation prompt source"
        )
    source = source.strip()
    if source.startswith(PREFIX):
        wanted = source[len(PREFIX) :]
        names = list(CATEGORIES) if wanted == "all" else [c.strip() for c in wanted.split(",") if c.strip()]
        unknown = [c for c in names if c not in CATEGORIES]
        if unknown or not names:
            raise InvalidInput(field, f"unknown category {unknown or wanted!r}; accepted: all, {', '.join(CATEGORIES)}")
        return sorted({caption(spec) for c in names for spec in training_prompt_specs(c)})

    try:
        prompt_set = load_prompts(source)
    except InvalidInput as e:
        raise InvalidInput(field, e.reason) from None
    return [entry.text for entry in prompt_set.prompts]
