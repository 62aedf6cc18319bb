"""Our PNGs' ``parameters`` text read back with AUTOMATIC1111's own infotext rules, re-implemented here from
its ``modules/infotext_utils.py`` (``parse_generation_parameters``, ``unquote``): the prompt lines, the
``Negative prompt:`` lines, then a last line of ``key: value`` pairs matched by A1111's regular expression, a
value in double quotes being JSON; ``WxH`` values split into ``KEY-1``/``KEY-2``. Every field must come back,
with A1111's sampler names, and the JSON ``info`` of /sdapi/v1/txt2img must agree with the PNG."""

from __future__ import annotations

import base64
import io
import json
import re

import pytest
from PIL import Image

from diffsteer.guidance.images import a1111_parameters, encode_image
from diffsteer.guidance.schedulers import A1111_SAMPLERS, a1111_sampler, resolve_scheduler_name

# A1111 (1.10) modules/infotext_utils.py
RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")


def unquote(text: str) -> str:
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def parse_generation_parameters(x: str) -> dict[str, str]:
    res: dict[str, str] = {}
    prompt, negative_prompt, done_with_prompt = "", "", False
    *lines, lastline = x.strip().split("\n")
    if len(RE_PARAM.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    res["Prompt"] = prompt
    res["Negative prompt"] = negative_prompt
    for k, v in RE_PARAM.findall(lastline):
        if v and v[0] == '"' and v[-1] == '"':
            v = unquote(v)
        m = RE_IMAGESIZE.match(v)
        if m is not None:
            res[f"{k}-1"], res[f"{k}-2"] = m.group(1), m.group(2)
        else:
            res[k] = v
    return res


META = {
    "prompt": "a red circle, a blue square: left of it",
    "negative_prompt": "blurry, dark",
    "seed": 12345,
    "policy": "cfg:scale=3,interval_start=0.2,scales=[1,2]",
    "cfg_scale": 3.0,
    "steps": 20,
    "scheduler": "dpmpp_2m_karras",
    "sampler": "DPM++ 2M",
    "schedule_type": "Karras",
    "width": 64,
    "height": 48,
    "eta": 0.0,
    "model": "builtin:proving-ground",
    "nfe": 38,
    "lora": "style:0.8,detail:1",
}


def test_a1111_reads_every_field_back():
    png = encode_image(Image.new("RGB", (64, 48)), "png", META)
    text = Image.open(io.BytesIO(png)).text["parameters"]
    got = parse_generation_parameters(text)
    assert got["Prompt"] == META["prompt"] and got["Negative prompt"] == META["negative_prompt"]
    assert got["Steps"] == "20" and got["Seed"] == "12345" and got["CFG scale"] == "3.0"
    assert got["Sampler"] == "DPM++ 2M" and got["Schedule type"] == "Karras"
    assert (got["Size-1"], got["Size-2"]) == ("64", "48")
    assert got["Model"] == META["model"]
    assert got["Policy"] == META["policy"]  # quoted: commas no longer cut it
    assert got["Lora"] == META["lora"] and got["NFE"] == "38"


@pytest.mark.parametrize(
    ("ours", "name", "schedule"),
    [
        ("ddim", "DDIM", None),
        ("euler_a", "Euler a", None),
        ("euler", "Euler", None),
        ("dpmpp_2m", "DPM++ 2M", None),
        ("dpmpp_2m_karras", "DPM++ 2M", "Karras"),
        ("pndm", "PLMS", None),
        ("unipc", "UniPC", None),
        ("heun", "Heun", None),
        ("lms", "LMS", None),
        ("lcm", "LCM", None),
        ("ddpm", "DDPM", None),
    ],
)
def test_sampler_names_are_a1111s(ours, name, schedule):
    assert a1111_sampler(ours) == (name, schedule)
    text = a1111_parameters({**META, "scheduler": ours, "sampler": name, "schedule_type": schedule})
    got = parse_generation_parameters(text)
    assert got["Sampler"] == name and got.get("Schedule type") == schedule


def test_default_scheduler_is_resolved_through_the_checkpoint():
    assert resolve_scheduler_name("default", {"_class_name": "PNDMScheduler"}) == "pndm"
    assert (
        resolve_scheduler_name("default", {"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True})
        == "dpmpp_2m_karras"
    )
    assert a1111_sampler("default", {"_class_name": "EulerAncestralDiscreteScheduler"}) == ("Euler a", None)
    assert set(A1111_SAMPLERS) >= {"ddim", "euler_a", "dpmpp_2m_karras"}


def test_txt2img_pngs_and_info_agree(one_thread):  # noqa: F811
    from test_service_support import app_client

    with app_client() as client:
        r = client.post(
            "/sdapi/v1/txt2img",
            json={
                "prompt": "a, b: c",
                "negative_prompt": "d, e",
                "steps": 3,
                "seed": 7,
                "width": 32,
                "height": 32,
                "sampler_name": "DPM++ 2M",
                "scheduler": "Karras",
                "cfg_scale": 4.5,
                "batch_size": 2,
                "policy": "cfg:interval_start=0.1,interval_end=0.9",
            },
        )
        assert r.status_code == 200, r.text
        body = r.json()
        info = json.loads(body["info"])
        for k, image in enumerate(body["images"]):
            text = Image.open(io.BytesIO(base64.b64decode(image))).text["parameters"]
            assert text == info["infotexts"][k]
            got = parse_generation_parameters(text)
            assert got["Prompt"] == "a, b: c" and got["Negative prompt"] == "d, e"
            assert got["Sampler"] == info["sampler_name"] == "DPM++ 2M"
            assert got["Schedule type"] == info["scheduler"] == "Karras"
            assert float(got["CFG scale"]) == info["cfg_scale"] == 4.5
            assert int(got["Seed"]) == info["all_seeds"][k] == 7 + k
            assert int(got["Steps"]) == info["steps"] == 3
            assert got["Policy"] == info["policy"] and "interval_start=0.1" in got["Policy"]
            assert (got["Size-1"], got["Size-2"]) == ("32", "32")


from test_service_support import one_thread  # noqa: E402,F401


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_jpeg_and_webp_infotext_is_where_a1111_reads_it(fmt):
    """A1111 reads a JPEG's or WebP's parameters with piexif from the Exif sub-IFD's UserComment (charset header)."""
    import piexif
    import piexif.helper

    from diffsteer.guidance.images import read_exif_parameters

    meta = {"prompt": "a cät, with ünicode: yes", "steps": 3, "seed": 7, "width": 8, "height": 8, "sampler": "Euler"}
    data = encode_image(Image.new("RGB", (8, 8), "red"), fmt, meta)
    image = Image.open(io.BytesIO(data))
    comment = piexif.load(image.info["exif"])["Exif"][piexif.ExifIFD.UserComment]
    assert piexif.helper.UserComment.load(comment) == a1111_parameters(meta)
    assert read_exif_parameters(image) == a1111_parameters(meta)
    assert read_exif_parameters(Image.open(io.BytesIO(encode_image(Image.new("RGB", (8, 8)), fmt)))) is None
