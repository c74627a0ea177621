"""Processors of every vision-language family saved and loaded back by ``canfast.load``.

torchvision is not installed here (it does not import beside the pinned torch), so these tests
run the path a user without it gets: the PIL image processor and no video processor. Each
family's real transformers processor class is saved with a tiny model, loaded from the
directory, and must give the very inputs and scores that the processor it was saved from gives.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_models as tm
import torch

import canfast
from canfast.adapters.processors import _torchvision_installed, processor_class_name
from canfast.errors import BadInput

VLM = tm.VLM_FAMILIES
# Families whose transformers processor takes a video processor, or (Mistral 3) does not import,
# without torchvision.
AFFECTED = ("llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "smolvlm", "internvl")
VIDEO_PROCESSORS = {
    "llava_onevision": "LlavaOnevisionVideoProcessor",
    "qwen2_vl": "Qwen2VLVideoProcessor",
    "qwen2_5_vl": "Qwen2VLVideoProcessor",
    "qwen3_vl": "Qwen3VLVideoProcessor",
    "smolvlm": "SmolVLMVideoProcessor",
    "internvl": "InternVLVideoProcessor",
}

pytestmark = pytest.mark.skipif(
    _torchvision_installed(), reason="tests the loading path of a machine without torchvision"
)


def saved(family: str, directory: Path):
    """``(hf_model, processor)`` of ``family``, both saved in ``directory``."""
    hf_model, processor = tm.build(family)
    hf_model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return hf_model, processor


def as_on_the_hub(directory: Path, family: str) -> None:
    """Rewrite a saved processor into the layout of checkpoints published on the Hub: the image
    processor in ``preprocessor_config.json`` under its torchvision class name, a
    ``video_preprocessor_config.json`` beside it, the rest in ``processor_config.json``."""
    fields = json.loads((directory / "processor_config.json").read_text())
    image = fields.pop("image_processor")
    image["processor_class"] = fields["processor_class"]
    if family == "qwen3_vl":
        image["image_processor_type"] = "Qwen2VLImageProcessorFast"  # as Qwen3-VL's files say
    (directory / "preprocessor_config.json").write_text(json.dumps(image))
    (directory / "processor_config.json").write_text(json.dumps(fields))
    if family in VIDEO_PROCESSORS:
        video = {"video_processor_type": VIDEO_PROCESSORS[family], "do_resize": True}
        (directory / "video_preprocessor_config.json").write_text(json.dumps(video))


def check_same_inputs_and_scores(family: str, directory: Path, hf_model, processor) -> None:
    loaded = canfast.load(str(directory))
    assert type(loaded.processor).__name__ == type(processor).__name__
    image_processor = loaded.processor.image_processor
    assert type(image_processor).__name__.endswith("Pil"), type(image_processor)
    assert getattr(loaded.processor, "video_processor", None) is None
    original = canfast.Model(hf_model.eval(), processor, name=f"tiny-{family}")
    samples = tm.samples(family, 2)
    got, expected = loaded.encode(samples), original.encode(samples)
    assert sorted(got.inputs) == sorted(expected.inputs)
    for key, value in expected.inputs.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(got.inputs[key], value, msg=f"{family} {key}")
    assert torch.equal(got.labels, expected.labels)
    # One scoring step on the loaded model: the inputs its processor made are ones it accepts.
    scores = canfast.score(loaded, samples, targets="given", backend="torch", progress=False)
    reference = canfast.score(original, samples, targets="given", backend="torch", progress=False)
    assert sorted(scores.sites) == sorted(reference.sites)
    for name in reference.sites:
        assert torch.isfinite(scores[name]).all()
        torch.testing.assert_close(scores[name], reference[name], msg=f"{family} {name}")


@pytest.mark.parametrize("family", VLM)
def test_save_and_load_round_trip(family, tmp_path):
    hf_model, processor = saved(family, tmp_path)
    check_same_inputs_and_scores(family, tmp_path, hf_model, processor)


def chatml(image: str) -> str:
    return (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{% for c in m.content %}"
        f"{{% if c.type == 'image' %}}{image}{{% else %}}{{{{ c.text }}}}{{% endif %}}"
        "{% endfor %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


CHAT_TEMPLATES = {
    "qwen2_vl": chatml("<|vision_start|><|image_pad|><|vision_end|>"),
    "qwen3_vl": chatml("<|vision_start|><|image_pad|><|vision_end|>"),
    "llava_onevision": chatml("<image>"),
    "mistral3": (
        "{% for m in messages %}{% if m.role == 'user' %}[INST]{% for c in m.content %}"
        "{% if c.type == 'image' %}[IMG]{% else %}{{ c.text }}{% endif %}{% endfor %}[/INST]"
        "{% endif %}{% endfor %}"
    ),
}


@pytest.mark.parametrize("family", sorted(CHAT_TEMPLATES))
def test_chat_template_survives_the_round_trip(family, tmp_path):
    """A processor saved with a chat template is loaded with it, and prompts go through it."""
    hf_model, processor = tm.build(family)
    processor = copy.deepcopy(processor)
    processor.chat_template = CHAT_TEMPLATES[family]
    hf_model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = canfast.load(str(tmp_path))
    assert loaded.chat_template and loaded.processor.chat_template == CHAT_TEMPLATES[family]
    original = canfast.Model(hf_model.eval(), processor)
    samples = tm.samples(family, 2)
    got, expected = loaded.encode(samples), original.encode(samples)
    assert torch.equal(got.inputs["input_ids"], expected.inputs["input_ids"])
    assert torch.equal(got.target_mask, expected.target_mask)
    opener = "[/INST]" if family == "mistral3" else "<|im_start|>"
    assert loaded.tokenizer.convert_tokens_to_ids(opener) in got.inputs["input_ids"][0].tolist()
    with torch.no_grad():
        assert torch.isfinite(loaded.forward(got).logits).all()


@pytest.mark.parametrize("family", [*AFFECTED, "mistral3"])
def test_checkpoint_in_the_hub_layout_loads(family, tmp_path):
    hf_model, processor = saved(family, tmp_path)
    as_on_the_hub(tmp_path, family)
    check_same_inputs_and_scores(family, tmp_path, hf_model, processor)


def test_plain_autoprocessor_fails_where_canfast_does_not(tmp_path):
    """The failure this loading path exists for: transformers alone asks for a video
    processor, which needs torchvision."""
    from transformers import AutoProcessor

    saved("qwen2_vl", tmp_path)
    as_on_the_hub(tmp_path, "qwen2_vl")
    with pytest.raises((ImportError, ValueError, TypeError, AttributeError)):
        AutoProcessor.from_pretrained(tmp_path)
    assert getattr(canfast.load(str(tmp_path)).processor, "video_processor", None) is None


def test_pixtral_processor_saves_under_transformers_name(tmp_path):
    saved("mistral3", tmp_path)
    assert processor_class_name(str(tmp_path), "mistral3") == "PixtralProcessor"
    fields = json.loads((tmp_path / "processor_config.json").read_text())
    assert fields["processor_class"] == "PixtralProcessor"
    assert fields["patch_size"] == tm.PATCH_SIZE and fields["spatial_merge_size"] == 2


def test_pixtral_image_tokens_form_the_patch_grid():
    _, processor = tm.build("mistral3")
    tok = processor.tokenizer
    out = processor(images=[tm.image(0)], text=["[IMG] what is it ?"], return_tensors="pt")
    ids = out["input_ids"][0].tolist()
    step = tm.PATCH_SIZE * 2
    rows = int(out["image_sizes"][0][0]) // step
    columns = int(out["image_sizes"][0][1]) // step
    row = [tok.convert_tokens_to_ids("[IMG]")] * columns + [processor.image_break_token_id]
    grid = row * rows
    grid[-1] = processor.image_end_token_id
    start = ids.index(processor.image_token_id)
    assert ids[start : start + len(grid)] == grid
    assert ids.count(processor.image_token_id) == rows * columns


def test_missing_num2words_is_one_clear_line(tmp_path, monkeypatch):
    import transformers.models.smolvlm.processing_smolvlm as smolvlm

    saved("smolvlm", tmp_path)
    monkeypatch.setattr(smolvlm, "num2words", None)
    with pytest.raises(BadInput, match="num2words"):
        canfast.load(str(tmp_path))


QUIET = """
import sys
import canfast
canfast.load(sys.argv[1]).encode(__import__("tiny_models").samples(sys.argv[2], 2))
"""


def run_loading(target: str, family: str, env: dict) -> subprocess.CompletedProcess:
    """``canfast.load(target)`` and one encode in a fresh process with ``env`` added."""
    tests = str(Path(__file__).parent)
    path = tests + os.pathsep + os.environ.get("PYTHONPATH", "")
    env = {**os.environ, "PYTHONPATH": path, "TQDM_DISABLE": "1", **env}
    return subprocess.run(
        [sys.executable, "-c", QUIET, target, family],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.mark.parametrize("family", ["qwen3_vl", "mistral3"])
def test_loading_without_torchvision_says_nothing(family, tmp_path):
    """A fresh process (transformers warns once per process) loads and encodes in silence: no
    word about torchvision, backends or video processors when nothing is missing."""
    saved(family, tmp_path)
    as_on_the_hub(tmp_path, family)
    done = run_loading(str(tmp_path), family, {})
    assert done.returncode == 0, done.stderr
    said = (done.stdout + done.stderr).lower()
    for word in ("torchvision", "video", "backend", "pil"):
        assert word not in said, done.stderr


@pytest.mark.parametrize("family", ["qwen2_5_vl", "smolvlm", "mistral3"])
def test_a_cached_hub_id_loads_offline(family, tmp_path):
    """A Hub id in the local cache, offline: the processor's files are found there too."""
    revision = "0" * 40
    repo = tmp_path / "hub" / "models--tiny--checkpoint"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    saved(family, snapshot)
    as_on_the_hub(snapshot, family)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    env["TRANSFORMERS_OFFLINE"] = "1"
    done = run_loading("tiny/checkpoint", family, env)
    assert done.returncode == 0, done.stderr
    assert "torchvision" not in done.stderr.lower(), done.stderr


def test_a_torchvision_that_does_not_import_is_one_clear_line(tmp_path, monkeypatch):
    """transformers takes an installed torchvision for a working one; canfast checks it imports
    (PyPI's build for another torch does not) and says what to do."""
    import canfast.adapters.processors as processors

    saved("qwen2_vl", tmp_path)
    monkeypatch.setattr(processors, "_torchvision_installed", lambda: True)
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision now fails
    with pytest.raises(BadInput, match="torchvision is installed but does not import"):
        canfast.load(str(tmp_path))
