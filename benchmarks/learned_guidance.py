"""How much guidance did a fine-tune learn? Its change to the noise prediction, read against the base model's
guidance direction on the base model's own sampling trajectories.

Preference fine-tuning (Diffusion-DPO, SmPO, AlignProp) changes both the conditional and the unconditional
prediction. With g = ε_base(x, c) − ε_base(x, ∅) the base model's guidance direction at a trajectory state x and
δ_c, δ_u the tuned model's changes of its conditional and unconditional predictions there:

    cos(δ_c, g)                      does the conditional prediction move along the guidance direction?
    k = ⟨δ_c − δ_u, g⟩ / ‖g‖²        the guidance scale the change adds: the tuned model's guidance difference
                                     ε_t(c) − ε_t(∅) has k·g more of g than the base's (k = 0.1 at cfg 3 is
                                     about what cfg 3.3 would give, along g)
    ‖δ_c‖ / ‖g‖                      the size of the change against the guidance itself

per recorded step, averaged over images. States are the base model's DDIM trajectory under ``--policy`` at
held-out proving-ground items; each pipeline is read at the same states and timesteps.

    python benchmarks/learned_guidance.py RUN/dpo/pipeline RUN/smpo/pipeline [--category single --items 32]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from diffsteer.proving_ground import CATEGORIES  # noqa: E402


def guidance_alignment(
    delta_cond: torch.Tensor, delta_uncond: torch.Tensor, guidance: torch.Tensor
) -> dict[str, float]:
    """cos(δ_c, g), k = ⟨δ_c − δ_u, g⟩/‖g‖² and ‖δ_c‖/‖g‖ per image ([B, ...] each), averaged over the batch."""
    dc, du, g = (t.flatten(1).double() for t in (delta_cond, delta_uncond, guidance))
    g_sq = (g * g).sum(1)
    return {
        "cos": float(torch.nn.functional.cosine_similarity(dc, g, dim=1).mean()),
        "k": float((((dc - du) * g).sum(1) / g_sq).mean()),
        "relative_size": float((dc.norm(dim=1) / g_sq.sqrt()).mean()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pipelines", nargs="+", help="tuned diffusers folders (e.g. a preference run's */pipeline)")
    ap.add_argument("--base", default="builtin:proving-ground", help="the model they were tuned from")
    ap.add_argument(
        "--category", default="single", choices=CATEGORIES, help="proving-ground category of the held-out items"
    )
    ap.add_argument("--items", type=int, default=32)
    ap.add_argument("--suite-seed", type=int, default=4)
    ap.add_argument("--policy", default="cfg:scale=3", help="guidance of the base trajectories")
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps")
    ap.add_argument("--record", default="2,6,10,14,18", help="steps whose states are read (1-based, after the step)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        record = sorted(int(s) for s in args.record.split(","))
    except ValueError:
        ap.error(f"--record: comma-separated step numbers, got {args.record!r}")
    if record[0] < 1 or record[-1] >= args.steps:
        ap.error(f"--record: steps are 1 to {args.steps - 1} (below --steps: the next step's timestep is read)")
    from diffsteer.guidance.errors import InvalidInput

    try:
        report(args, record)
    except InvalidInput as e:  # a missing pipeline folder, an unknown category or policy
        ap.error(str(e))
    return 0


def report(args: argparse.Namespace, record: list[int]) -> None:
    """Sample the base trajectories and print each pipeline's rows."""
    from diffsteer.guidance.conditioning import encode_conditions
    from diffsteer.guidance.denoiser import call_unet
    from diffsteer.guidance.models import load_model
    from diffsteer.guidance.request import Limits
    from diffsteer.guidance.sampler import generate, make_scheduler
    from diffsteer.proving_ground import heldout_suite

    base = load_model(args.base, device="cpu")
    items = heldout_suite(args.category, args.items, seed=args.suite_seed)
    prompts = [i.prompt for i in items]
    states: dict[int, torch.Tensor] = {}

    def keep(event) -> None:
        if event.step in record:
            states[event.step] = event.latents.clone()

    result = generate(
        base,
        {
            "prompt": prompts,
            "seeds": [i.seed for i in items],
            "steps": args.steps,
            "scheduler": "ddim",
            "policy": args.policy,
        },
        callback=keep,
        limits=Limits(max_num_images=max(len(items), Limits.max_num_images)),
    )
    _, timesteps = make_scheduler(base, result.params)
    size = base.native_size
    conditions = encode_conditions(base, prompts, None, ["cond", "uncond"], height=size, width=size)[0]

    def predictions(model, x, t):
        return {c: call_unet(model.unet, x, t, conditions[c]).float() for c in ("cond", "uncond")}

    print(
        f"base trajectories: {args.base}, {args.policy}, {args.steps} DDIM steps, {len(items)} held-out "
        f"{args.category} items (suite seed {args.suite_seed})"
    )
    print("| pipeline | step | t | cos(δ_c, g) | k | ‖δ_c‖/‖g‖ |\n| --- | --- | --- | --- | --- | --- |")
    for path in args.pipelines:
        tuned = load_model(path, device="cpu")
        with torch.no_grad():
            for step in record:
                x, t = states[step], timesteps[step].repeat(len(items))  # the timestep the next step reads
                b, n = predictions(base, x, t), predictions(tuned, x, t)
                r = guidance_alignment(n["cond"] - b["cond"], n["uncond"] - b["uncond"], b["cond"] - b["uncond"])
                print(
                    f"| {path} | {step} | {int(t[0])} | {r['cos']:+.3f} | {r['k']:+.3f} | {r['relative_size']:.3f} |",
                    flush=True,
                )


if __name__ == "__main__":
    raise SystemExit(main())
