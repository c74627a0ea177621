"""Vision towers whose rows do not split evenly into the batch's samples: towers that pack every
image of a batch into one sequence (Qwen-VL, Pixtral in Mistral 3) and towers that run each
image's tiles as rows of their own (LLaVA-NeXT, OneVision). With images of different sizes in one
batch, each sample's S must still be the mean over its own rows alone."""

import pytest
import tiny_models as tm
import torch
from test_families import capture, pick, reduce

import canfast
from canfast import masked, ops
from canfast.objective import evaluate
from canfast.score import ImageRows, image_rows

WIDE_GRID_SEED = 7
FAMILIES = [
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "mistral3",
    "llava_next",
    "llava_onevision",
    "internvl",
    "idefics3",
    "smolvlm",
]


@pytest.fixture(scope="module")
def models():
    # A grid of several aspect ratios, so that LLaVA-NeXT and OneVision cut these images into
    # different numbers of tiles.
    side = tm.IMAGE_SIZE
    saved = tm.LLAVA_GRID
    tm.LLAVA_GRID = [[side, side], [2 * side, side], [side, 2 * side], [2 * side, 2 * side]]
    try:
        # A seed of their own: tiny_models caches builds per (family, seed), so these wide-grid
        # builds neither reach other tests nor come from their cache.
        cache = {
            (family, dtype): tm.wrap(family, seed=WIDE_GRID_SEED, dtype=dtype)
            for family in FAMILIES
            for dtype in (torch.float32, torch.float64)
        }
        # InternVL's processor cuts each image into tiles by its aspect ratio (as real
        # checkpoints configure it); the processor of this seed's build is these tests' own.
        # Idefics3 and SmolVLM split an image into tiles by its size likewise.
        for dtype in (torch.float32, torch.float64):
            cache[("internvl", dtype)].processor.image_processor.crop_to_patches = True
            for family in ("idefics3", "smolvlm"):
                images = cache[(family, dtype)].processor.image_processor
                images.do_image_splitting = True
                images.size = {"longest_edge": 3 * side}
        yield cache
    finally:
        tm.LLAVA_GRID = saved


def model_of(cache, family, dtype=torch.float32):
    return cache[(family, dtype)]


def mixed(family: str, n: int = 4) -> list[canfast.Sample]:
    """``n`` samples whose images differ in size and aspect ratio (so in patches and tiles)."""
    side = tm.IMAGE_SIZE
    shapes = [(side, side), (2 * side, side), (side, 3 * side), (3 * side, 2 * side)]
    out = []
    for i, s in enumerate(tm.samples(family, n)):
        out.append(canfast.Sample(s.image.resize(shapes[i % len(shapes)]), s.prompt, s.target))
    return out


def check(scores, expected, label):
    for name, value in expected.items():
        got = scores[name].double()
        scale = value.abs().max().item()
        torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-7 * scale, msg=f"{label} {name}")


@pytest.mark.parametrize("unit", ["out", "mid"])
@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_sizes_in_one_batch_match_the_per_sample_reference(models, family, unit):
    model = model_of(models, family, torch.float64)
    model.hf.requires_grad_(True)
    samples = mixed(family)
    alpha = 0.5
    names = [s.name for s in model.sites(unit)]
    expected = reduce(capture(model, samples, unit), alpha, names)
    vision = [s.name for s in model.sites(unit) if s.component in ("vision", "projector")]
    assert vision and all(n in expected for n in vision)
    scores = canfast.score(
        model,
        samples,
        alpha=alpha,
        unit=unit,
        targets="given",
        batch_size=4,
        backend="torch",
        progress=False,
    )
    assert sorted(scores.sites) == sorted(names)
    check(scores, expected, f"{family} bs=4")
    # The spread is over samples too: batch_size 4 and batch_size 1 agree on it.
    single = canfast.score(
        model,
        samples,
        alpha=alpha,
        unit=unit,
        targets="given",
        batch_size=1,
        backend="torch",
        progress=False,
    )
    for name in vision:
        torch.testing.assert_close(scores.stats[name]["std"], single.stats[name]["std"])


@pytest.mark.skipif(not ops.available("cpp"), reason="the C++ extension is not built")
@pytest.mark.parametrize("family", ["qwen2_vl", "mistral3", "llava_next", "internvl", "smolvlm"])
def test_fused_path_on_mixed_sizes(models, family):
    """The fused sink takes the per-image groups too, and sums them into their samples."""
    model = model_of(models, family)
    samples = mixed(family)
    common = dict(targets="given", batch_size=4, backend="cpp", progress=False)
    fused = canfast.score(model, samples, path="fused", **common)
    hooks = canfast.score(model, samples, path="hooks", **common)
    for name in hooks.sites:
        torch.testing.assert_close(fused[name], hooks[name], rtol=1e-4, atol=1e-6)


def test_internvl_tiles_follow_its_image_tokens(models):
    model = model_of(models, "internvl")
    batch = model.encode(mixed("internvl"))
    layout = image_rows(model, batch)
    assert layout.layout == "tiled"
    assert int(layout.sizes.sum()) == batch.inputs["pixel_values"].shape[0]
    assert len(set(layout.sizes.tolist())) > 1


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_split_images_keep_their_own_tiles(models, family):
    model = model_of(models, family)
    batch = model.encode(mixed(family))
    layout = image_rows(model, batch)
    assert layout.layout == "tiled" and len(set(layout.sizes.tolist())) > 1


def test_tile_counts_follow_the_model(models):
    """LLaVA-NeXT's tiles per image are the model's own count, which differs across these."""
    model = model_of(models, "llava_next")
    batch = model.encode(mixed("llava_next"))
    layout = image_rows(model, batch)
    assert layout.layout == "tiled"
    pixel_tiles = [int((p.flatten(1).abs().sum(1) > 0).sum()) for p in batch.inputs["pixel_values"]]
    assert layout.sizes.tolist() == pixel_tiles
    assert len(set(pixel_tiles)) > 1


@pytest.mark.parametrize(
    "family", ["qwen2_vl", "mistral3", "llava_next", "llava_onevision", "internvl", "smolvlm"]
)
def test_batch_of_masks_on_mixed_sizes_equals_weight_masking(models, family):
    """A batch of masks repeats the batch once per mask; each copy's vision rows (packed or
    tiled, of mixed sizes) must meet its own mask only."""
    model = model_of(models, family)
    samples = mixed(family)
    sets = [pick(model, "out", 2, seed) for seed in range(3)]
    with masked(model, sets, mode="hook", backend="torch"):
        together = [e.ppl for e in evaluate(model, samples, batch_size=4, masks=len(sets))]
    alone = []
    for neurons in sets:
        with masked(model, neurons, mode="weight"):
            alone.append(evaluate(model, samples, batch_size=4)[0].ppl)
    assert together == pytest.approx(alone, rel=1e-5)
    assert len(set(round(p, 6) for p in alone)) == len(alone)


@pytest.mark.parametrize("family", ["qwen2_vl", "mistral3", "llava_next"])
def test_sweep_on_mixed_sizes_equals_weight_masking(models, family):
    model = model_of(models, family)
    samples = mixed(family)
    common = dict(targets="given", batch_size=4, backend="torch", progress=False)
    scores = canfast.score(model, samples, **common)
    result = canfast.sweep(
        model,
        samples,
        scores,
        schedule=[4, 16],
        tau=50.0,  # never reached: every k of the schedule is evaluated
        seeds=1,
        masks_per_pass=2,
        generations=0,
        **common,
    )
    for k in (4, 16):
        with masked(model, scores.top(k), mode="weight"):
            ppl = evaluate(model, samples, batch_size=4)[0].ppl
        assert result.curve.ppl[result.curve.k.index(k)] == pytest.approx(ppl, rel=1e-5)


@pytest.mark.parametrize(
    "layout, lead",
    [("tiled", (4, 7)), ("tiled", (5,)), ("packed", (9,)), ("packed", (1, 7))],
)
def test_rows_that_do_not_map_to_images_are_refused(models, layout, lead):
    """Rows that match neither the tiles nor a whole share of the packed patches: one line,
    never a guess."""
    site = model_of(models, "qwen2_vl").sites()[0]
    images = ImageRows(layout, torch.tensor([2, 3]), torch.arange(2))
    with pytest.raises(canfast.BadInput, match="cannot tell which sample") as error:
        images.split(site, torch.Size(lead))
    assert "\n" not in str(error.value)
    assert images.split(site, torch.Size((5, 6) if layout == "tiled" else (10,))).owner.tolist()
