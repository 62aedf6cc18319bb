"""The ``verifier`` reward: the exact verifier's report turned into a score, against the report itself and hand
cases (a rendered ground-truth scene, a blank image, an object of the wrong colour), and its refusals."""

import numpy as np
import pytest
import torch

from diffsteer.guidance.errors import InvalidInput
from diffsteer.guidance.reward_models import get_reward
from diffsteer.proving_ground.render import render_prompt
from diffsteer.proving_ground.reward import VerifierReward, VerifierRewardConfig
from diffsteer.proving_ground.verifier import verify
from diffsteer.proving_ground.world import parse_caption
from diffsteer.rewards import NonDifferentiableRewardError, build_reward


def _image(caption: str, seed: int = 0) -> torch.Tensor:
    pixels, _ = render_prompt(parse_caption(caption), seed)
    return torch.from_numpy(pixels).permute(2, 0, 1).float().div(255)[None]


def test_a_rendered_scene_scores_one_and_a_blank_image_zero():
    reward = get_reward("verifier", "cpu")
    images = torch.cat([_image("two red circles"), torch.zeros(1, 3, 64, 64)])
    np.testing.assert_array_equal(reward.evaluate(images, ["two red circles"] * 2).total_score.numpy(), [1.0, 0.0])


def test_partial_credit_is_the_fraction_of_applicable_checks_that_hold():
    # a blue square drawn for "a red square": present (shape matches), shape right, colour and count wrong -> 2/4
    image = _image("a blue square", seed=3)
    report = verify(image[0].permute(1, 2, 0).numpy(), parse_caption("a red square"))
    assert (report.object_present, report.shape_correct, report.colour_correct, report.count_correct) == (
        True,
        True,
        False,
        False,
    )
    assert report.position_correct is None  # no relation: not counted
    partial = VerifierReward().score(image, "a red square")
    assert partial.item() == pytest.approx(2 / 4)
    assert VerifierReward(VerifierRewardConfig(score="passed")).score(image, "a red square").item() == 0.0


def test_a_relation_counts_as_a_fifth_check():
    caption = "a red circle to the left of a blue square"
    image = _image(caption, seed=1)
    assert VerifierReward().score(image, caption).item() == 1.0
    mirrored = image.flip(-1)  # the same objects, the relation reversed
    report = verify(mirrored[0].permute(1, 2, 0).numpy(), parse_caption(caption))
    assert report.position_correct is False and report.count_correct
    assert VerifierReward().score(mirrored, caption).item() == pytest.approx(4 / 5)


def test_refusals_name_the_problem():
    reward = VerifierReward()
    with pytest.raises(InvalidInput, match="proving-ground captions only; 'a photo of a cat'") as e:
        reward.score(_image("a red circle"), "a photo of a cat")
    assert e.value.field == "prompt"
    with pytest.raises(ValueError, match="prompts are required"):
        reward.score(_image("a red circle"))
    images = _image("a red circle").requires_grad_()
    with pytest.raises(NonDifferentiableRewardError):
        reward.score(images, "a red circle")
    with pytest.raises(ValueError, match="verifier.score"):
        build_reward({"name": "verifier", "score": "mean"})


def test_the_service_answers_422_naming_the_prompt_for_a_caption_the_verifier_cannot_read():
    from fastapi.testclient import TestClient
    from test_service_support import settings

    from diffsteer.service.app import create_app

    policy = {"name": "dynamic_cfg", "reward": "verifier:1"}
    with TestClient(create_app(settings(model="builtin:proving-ground", preload=False))) as client:
        ok = client.post("/generate", json={"prompt": "a red circle", "steps": 2, "seed": 1, "policy": policy})
        bad = client.post("/generate", json={"prompt": "a photo of a cat", "steps": 2, "seed": 1, "policy": policy})
    assert ok.status_code == 200
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "prompt"
    assert "'a photo of a cat'" in bad.json()["error"]["message"]
