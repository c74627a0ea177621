"""Site maps of every family, unit ``mid`` sites, selectors and neuron ids."""

from __future__ import annotations

import pytest
import tiny_models as tm
import torch

from canfast import BadInput, Model, NeuronSet
from canfast.adapters import adapter_for, supported_model_types
from canfast.sites import parse_neuron, select

pytestmark = pytest.mark.usefixtures("one_thread")

H, F = tm.HIDDEN, tm.FFN
GATED = {"gate": ("gate_proj", F), "up": ("up_proj", F), "down": ("down_proj", H)}
CLIP = {"up": ("fc1", F), "down": ("fc2", H)}

# Per family: component -> (number of blocks, {kind: (module leaf name, output channels)},
# stream). Layers are numbered per component in module order.
EXPECTED = {
    "llava": {
        "vision": (3, CLIP, None),
        "projector": (1, {"up": ("linear_1", H), "down": ("linear_2", H)}, None),
        "language": (2, GATED, "language"),
    },
    "instructblip": {
        "vision": (2, CLIP, None),
        "qformer": (
            2,
            {"up": ("intermediate_query.dense", F), "down": ("output_query.dense", H)},
            None,
        ),
        "projector": (1, {"down": ("language_projection", H)}, None),
        "language": (2, GATED, "language"),
    },
    "llama": {"language": (2, GATED, "language")},
    "qwen2": {"language": (2, GATED, "language")},
    "gpt2": {"language": (2, {"up": ("c_fc", F), "down": ("c_proj", H)}, "language")},
    "opt": {"language": (2, CLIP, "language")},
    "gpt_neox": {
        "language": (2, {"up": ("dense_h_to_4h", F), "down": ("dense_4h_to_h", H)}, "language")
    },
    "bert": {
        "language": (2, {"up": ("intermediate.dense", F), "down": ("output.dense", H)}, "language")
    },
    # Two encoder blocks, then two decoder blocks.
    "t5": {"language": (4, {"up": ("wi", F), "down": ("wo", H)}, "language")},
}


@pytest.fixture(scope="module")
def models():
    return {family: tm.wrap(family) for family in tm.FAMILIES}


@pytest.mark.parametrize("family", tm.FAMILIES)
def test_site_map(models, family):
    model = models[family]
    sites = model.all_sites("out")
    expected = {}
    for component, (blocks, kinds, stream) in EXPECTED[family].items():
        for layer in range(blocks):
            for kind, (leaf, channels) in kinds.items():
                expected[f"{component}.{layer}.{kind}"] = (leaf, channels, stream)
    assert sorted(s.name for s in sites) == sorted(expected)
    assert len({s.name for s in sites}) == len(sites)
    for site in sites:
        leaf, channels, stream = expected[site.name]
        component, layer, kind = site.name.split(".")
        assert (site.component, site.layer, site.kind) == (component, int(layer), kind)
        assert site.unit == "out"
        assert site.module_path == leaf or site.module_path.endswith("." + leaf)
        assert model.hf.get_submodule(site.module_path) is site.module
        assert site.channels == channels
        weight = site.module.weight
        out_dim = weight.shape[1] if site.transposed else weight.shape[0]
        assert out_dim == channels
        if family == "t5":
            decoder = site.layer >= 2
            assert site.module_path.startswith("decoder." if decoder else "encoder.")
            assert site.stream == ("decoder" if decoder else "language")
        else:
            assert site.stream == stream
        assert site.neuron(5) == f"{site.name}:5"
        assert model.site(site.name) is site
    assert model.sites() == sites


@pytest.mark.parametrize("family", tm.FAMILIES)
def test_mid_sites(models, family):
    model = models[family]
    mids = model.all_sites("mid")
    downs = {s.name.rsplit(".", 1)[0]: s for s in model.all_sites("out") if s.kind == "down"}
    # Every FFN block has a mid site on its down projection; a lone projection has none.
    blocks = {
        name: site
        for name, site in downs.items()
        if not (family == "instructblip" and name.startswith("projector"))
    }
    assert sorted(s.name for s in mids) == sorted(f"{b}.mid" for b in blocks)
    for site in mids:
        down = blocks[site.name.removesuffix(".mid")]
        assert (site.kind, site.unit) == ("mid", "mid")
        assert site.module is down.module
        assert site.module_path == down.module_path
        assert site.stream == down.stream
        weight = site.module.weight
        in_dim = weight.shape[0] if site.transposed else weight.shape[1]
        assert site.channels == in_dim
        assert model.site(site.name) is site
        # The intermediate width of these models is always the FFN width, except LLaVA's
        # projector whose two Linears are both as wide as the text model.
        expected = H if site.component == "projector" else F
        assert site.channels == expected


def test_gpt2_conv1d_is_transposed(models):
    sites = models["gpt2"].all_sites("out")
    assert all(s.transposed for s in sites)
    assert not any(s.transposed for s in models["llama"].all_sites("out"))


def test_selectors(models):
    model = models["llava"]
    names = lambda sites: [s.name for s in sites]  # noqa: E731
    assert names(model.sites(sites="language.*.down")) == ["language.0.down", "language.1.down"]
    assert names(model.sites(sites="vision.0.*, language.1.up")) == [
        "vision.0.up",
        "vision.0.down",
        "language.1.up",
    ]
    assert names(model.sites(sites=["projector.*"])) == ["projector.0.up", "projector.0.down"]
    assert names(model.sites(components=["vision"])) == [
        f"vision.{i}.{k}" for i in range(3) for k in ("up", "down")
    ]
    assert names(model.sites(kinds=["gate"])) == ["language.0.gate", "language.1.gate"]
    # Filters combine with AND.
    assert names(model.sites(sites="*.1.*", components=["language"], kinds=["up", "down"])) == [
        "language.1.up",
        "language.1.down",
    ]
    assert names(model.sites("mid", components=["language"])) == [
        "language.0.mid",
        "language.1.mid",
    ]
    # Globs match whole names, case-sensitively.
    assert names(model.sites(sites="language.1.d*")) == ["language.1.down"]
    with pytest.raises(BadInput, match="matches no site"):
        model.sites(sites="LANGUAGE.*")


@pytest.mark.parametrize(
    "selector",
    [
        {"sites": "language.9.*"},
        {"sites": "language.0"},  # a prefix is not a glob match
        {"components": ["qformer"]},  # a component LLaVA has not
        {"components": ["vision"], "kinds": ["gate"]},  # each matches, together nothing
        {"unit": "mid", "kinds": ["down"]},
    ],
)
def test_selector_matching_nothing_raises(models, selector):
    selector = dict(selector)
    unit = selector.pop("unit", "out")
    with pytest.raises(BadInput, match="matches no site"):
        models["llava"].sites(unit, **selector)


def test_unknown_names_raise(models):
    model = models["llama"]
    with pytest.raises(BadInput, match="unknown component"):
        model.sites(components=["decoder"])
    with pytest.raises(BadInput, match="unknown kind"):
        model.sites(kinds=["fc1"])
    with pytest.raises(BadInput, match="unknown unit"):
        model.sites("in")
    with pytest.raises(BadInput, match="no site named"):
        model.site("language.7.down")
    with pytest.raises(BadInput, match="no site named"):
        model.site("language.0.mid.x")
    # No filter at all keeps every site.
    assert select(model.all_sites(), None) == model.all_sites()
    assert select(model.all_sites(), []) == model.all_sites()


def test_unsupported_architecture():
    with pytest.raises(BadInput, match="unsupported architecture"):
        adapter_for("mamba")
    assert {"llava", "instructblip", "llama", "gpt2", "bert", "t5"} <= set(supported_model_types())

    class NoFFN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"model_type": "llama", "is_encoder_decoder": False})()
            self.proj = torch.nn.Linear(2, 2)

    with pytest.raises(BadInput, match="no feed-forward sites"):
        Model(NoFFN(), tm.tokenizer("llama"))


def test_repr_counts_neurons(models):
    model = models["gpt2"]
    assert f"{2 * (F + H)} FFN neurons" in repr(model)


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("language.12.down:2533", ("language.12.down", 2533)),
        ("vision.0.mid:0", ("vision.0.mid", 0)),
        ("qformer.5.down:007", ("qformer.5.down", 7)),
    ],
)
def test_parse_neuron(text, parsed):
    assert parse_neuron(text) == parsed


@pytest.mark.parametrize(
    "text",
    ["language.12.down", "language.12.down:", ":3", "language.1.down:x", "language.1.down:-1", ""],
)
def test_parse_neuron_rejects(text):
    with pytest.raises(BadInput, match="bad neuron id"):
        parse_neuron(text)


def test_neuron_set():
    ids = ["language.1.down:3", "vision.0.up:7", "language.1.down:1"]
    neurons = NeuronSet.from_ids(ids)
    assert len(neurons) == 3
    assert neurons.ids() == ids
    assert list(neurons) == [("language.1.down", 3), ("vision.0.up", 7), ("language.1.down", 1)]
    assert neurons.by_site() == {"language.1.down": [3, 1], "vision.0.up": [7]}
    scored = NeuronSet(neurons.neurons, (3.0, 2.0, 1.0))
    top = scored[:2]
    assert top.ids() == ids[:2] and top.scores == (3.0, 2.0)
    assert scored.to_records()[1] == {"neuron": "vision.0.up:7", "score": 2.0}
    assert neurons.to_records()[0] == {"neuron": ids[0], "score": None}
    with pytest.raises(TypeError):
        neurons[0]
    assert "3 in all" not in repr(neurons) and "language.1.down:3" in repr(neurons)
    many = NeuronSet.from_ids([f"language.0.up:{i}" for i in range(6)])
    assert "6 in all" in repr(many)
    with pytest.raises(BadInput):
        NeuronSet.from_ids(["language.0.up:1", "oops"])
