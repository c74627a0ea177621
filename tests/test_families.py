"""Every family of issue 11 on a tiny random model: its site map, CAN scores against a float64
autograd reference, hook masking against weight masking, and a short sweep. Mixture-of-experts
models add: experts as views into the stacked weights (no copies), the rerouted forward equal to
transformers' own, per-expert scores averaged over the routed tokens, and batches of masks."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import tiny_models as tm
import torch
from test_score import reference_loss

import canfast
from canfast import NeuronSet, masked
from canfast.adapters.views import LinearView
from canfast.objective import evaluate
from canfast.sites import parse_site_name, select

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = tm.NEW_VLM_FAMILIES + tm.NEW_TEXT_FAMILIES + tm.MOE_FAMILIES

H, F, L, E = tm.HIDDEN, tm.FFN, tm.LAYERS, tm.EXPERTS
DENSE = {"out": (3 * L, L * (2 * F + H)), "mid": (L, L * F)}
# (sites, channels) per unit: E experts of FFN // 2 (Qwen-MoE) or FFN (Mixtral, OLMoE) per layer.
SITE_MAP = {
    "gemma2": DENSE,
    "gemma3_text": DENSE,
    "phi3": DENSE,
    "qwen3": DENSE,
    "mixtral": {"out": (3 * L * E, L * E * (2 * F + H)), "mid": (L * E, L * E * F)},
    "olmoe": {"out": (3 * L * E, L * E * (2 * F + H)), "mid": (L * E, L * E * F)},
    "qwen3_moe": {"out": (3 * L * E, L * E * (F + H)), "mid": (L * E, L * E * F // 2)},
    "qwen2_moe": {
        "out": (3 * L * (E + 1), L * E * (F + H) + L * (2 * F + H)),
        "mid": (L * (E + 1), L * E * F // 2 + L * F),
    },
}

# Vision-language families: per unit, per component, (sites, channels). Vision towers of two
# layers of FFN 32 (Mllama: two local layers and one global), a language model of two layers
# (Mllama: three, one of them a cross-attention layer), projectors as each family builds them.
TWO_LAYER = {"out": (4, 96), "mid": (2, 64)}  # fc1/fc2 of 32 -> 16
GATED = {"out": (6, 160), "mid": (2, 64)}  # gate/up/down of 32, 32, 16
LLAVA_PROJECTOR = {"out": (2, 32), "mid": (1, 16)}
ONE_LINEAR = {"out": (1, 16), "mid": (0, 0)}
VLM_SITE_MAP = {
    "blip-2": {
        "vision": TWO_LAYER,
        "qformer": TWO_LAYER,
        "projector": ONE_LINEAR,
        "language": TWO_LAYER,
    },
    "llava_next": {"vision": TWO_LAYER, "projector": LLAVA_PROJECTOR, "language": GATED},
    "llava_onevision": {"vision": TWO_LAYER, "projector": LLAVA_PROJECTOR, "language": GATED},
    # The merger: [4 * 16] -> 64 -> 16.
    "qwen2_vl": {
        "vision": TWO_LAYER,
        "projector": {"out": (2, 80), "mid": (1, 64)},
        "language": GATED,
    },
    "qwen2_5_vl": {
        "vision": GATED,
        "projector": {"out": (2, 80), "mid": (1, 64)},
        "language": GATED,
    },
    # The merger and one deepstack merger.
    "qwen3_vl": {
        "vision": TWO_LAYER,
        "projector": {"out": (4, 160), "mid": (2, 128)},
        "language": GATED,
    },
    "paligemma": {"vision": TWO_LAYER, "projector": ONE_LINEAR, "language": GATED},
    "gemma3": {"vision": TWO_LAYER, "language": GATED},
    "idefics3": {"vision": TWO_LAYER, "projector": ONE_LINEAR, "language": GATED},
    "smolvlm": {"vision": TWO_LAYER, "projector": ONE_LINEAR, "language": GATED},
    "mllama": {
        "vision": {"out": (6, 144), "mid": (3, 96)},
        "projector": ONE_LINEAR,
        "language": {"out": (9, 240), "mid": (3, 96)},
    },
    "internvl": {"vision": TWO_LAYER, "projector": LLAVA_PROJECTOR, "language": GATED},
    "mistral3": {"vision": GATED, "projector": LLAVA_PROJECTOR, "language": GATED},
}
for _family, _components in VLM_SITE_MAP.items():
    SITE_MAP[_family] = {
        unit: tuple(sum(c[unit][i] for c in _components.values()) for i in (0, 1))
        for unit in ("out", "mid")
    }


@pytest.fixture(scope="module")
def models():
    return {}


def model_of(cache, family, dtype=torch.float32):
    key = (family, dtype)
    if key not in cache:
        cache[key] = tm.wrap(family, dtype=dtype)
    return cache[key]


# ----- site map --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_site_map(models, family):
    model = model_of(models, family)
    for unit in ("out", "mid"):
        sites = model.all_sites(unit)
        count, channels = SITE_MAP[family][unit]
        assert (len(sites), sum(s.channels for s in sites)) == (count, channels), unit
        assert len({s.name for s in sites}) == len(sites)
        for site in sites:
            parsed = parse_site_name(site.name)
            assert (parsed.component, parsed.layer, parsed.kind) == (
                site.component,
                site.layer,
                site.kind,
            )
            assert parsed.expert == site.expert
    names = [s.name for s in model.all_sites("out")]
    if family in VLM_SITE_MAP:
        for component, expected in VLM_SITE_MAP[family].items():
            for unit in ("out", "mid"):
                chosen = [s for s in model.all_sites(unit) if s.component == component]
                got = (len(chosen), sum(s.channels for s in chosen))
                assert got == expected[unit], (component, unit)
                layers = sorted({s.layer for s in chosen})
                assert layers == list(range(len(layers)))
        assert sorted({s.component for s in model.all_sites("out")}) == sorted(VLM_SITE_MAP[family])
        assert sorted(VLM_SITE_MAP[family]) == sorted(model.adapter.components)
    elif family in tm.MOE_FAMILIES:
        assert f"language.{L - 1}.e{E - 1}.down" in names
        assert "language.0.e0.gate" in names
        downs = select(model.all_sites("out"), "language.*.down")
        extra = 1 if family == "qwen2_moe" else 0
        assert len(downs) == L * (E + extra)
        assert all(s.channels == H for s in downs)
        assert ("language.1.shared.up" in names) == (family == "qwen2_moe")
    else:
        assert names == [f"language.{i}.{k}" for i in range(L) for k in ("gate", "up", "down")]


def test_fused_gate_up_split_into_halves(models):
    """Phi-3's gate_up_proj: gate is the first half of its output rows, up the second, as the
    MLP's own ``chunk(2)`` reads them; both are views of the one weight."""
    model = model_of(models, "phi3")
    gate, up = model.site("language.0.gate"), model.site("language.0.up")
    fused = model.hf.model.layers[0].mlp.gate_up_proj
    assert gate.channels == up.channels == F
    assert gate.module_path.endswith("mlp.gate_up_proj.gate")
    assert torch.equal(gate.module.weight, fused.weight[:F])
    assert torch.equal(up.module.weight, fused.weight[F:])
    assert gate.module.weight.data_ptr() == fused.weight.data_ptr()


@pytest.mark.parametrize("family", ["phi3", *tm.MOE_FAMILIES])
def test_views_change_nothing(family):
    """Exposing views adds no parameter and copies no weight, and the model computes the same
    logits as transformers' own forward."""
    hf, tok = tm.build(family)
    params = {n: p.data_ptr() for n, p in hf.named_parameters()}
    keys = sorted(hf.state_dict())
    sample = tm.samples(family, 2)
    before = copy.deepcopy(hf)
    model = canfast.Model(hf, tok)
    assert {n: p.data_ptr() for n, p in hf.named_parameters()} == params
    assert sorted(hf.state_dict()) == keys
    views = [s.module for s in model.all_sites("out") if isinstance(s.module, LinearView)]
    assert views
    storages = {p.untyped_storage().data_ptr() for p in hf.parameters()}
    assert all(v.weight.untyped_storage().data_ptr() in storages for v in views)
    batch = model.encode(sample)
    with torch.no_grad():
        ours = model.forward(batch).logits
        theirs = before(**batch.inputs, use_cache=False).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # A deep copy keeps working on its own weights.
    twin = copy.deepcopy(hf)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
        assert torch.equal(model.forward(batch).logits, ours)


# ----- scoring against float64 -----------------------------------------------------------------


def capture(model, samples, unit):
    """Per sample, per site that ran: |a| and |dL_i/da| in float64, rows of that sample alone
    (for an expert: the rows its router sent it; a watched expert runs over every row)."""
    sites = model.sites(unit)
    records = []
    for sample in samples:
        batch = model.encode([sample])
        seen, handles = {}, []
        for site in sites:
            if unit == "out":

                def hook(module, args, output, name=site.name, seen=seen):
                    seen[name] = (output, getattr(module, "routed_rows", None))

                handles.append(site.module.register_forward_hook(hook))
            else:

                def pre(module, args, name=site.name, seen=seen):
                    seen[name] = (args[0], getattr(module, "routed_rows", None))

                handles.append(site.module.register_forward_pre_hook(pre))
        try:
            with torch.enable_grad():
                outputs = model.forward(batch)
                loss = reference_loss(model, sample, batch.inputs, outputs.logits)
                names = list(seen)
                grads = torch.autograd.grad(loss, [seen[n][0] for n in names], allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()
        record = {}
        for name, grad in zip(names, grads, strict=True):
            a, routed = seen[name]
            a = a.detach()
            g = torch.zeros_like(a) if grad is None else grad
            a, g = a.reshape(-1, a.shape[-1]).abs(), g.reshape(-1, a.shape[-1]).abs()
            if routed is not None:
                a, g = a[routed], g[routed]
            record[name] = (a, g)
        records.append(record)
    return records


def reduce(records, alpha, names):
    """I per site: the mean over the samples that reached the site of their mean over rows."""
    out = {}
    for name in names:
        rows = [r[name] for r in records if name in r and r[name][0].shape[0]]
        if not rows:
            continue
        out[name] = torch.stack([(g.pow(alpha) * a).mean(0) for a, g in rows]).mean(0)
    return out


@pytest.mark.parametrize("unit", ["out", "mid"])
@pytest.mark.parametrize("family", FAMILIES)
def test_scores_match_float64_reference(models, family, unit):
    model = model_of(models, family, torch.float64)
    model.hf.requires_grad_(True)
    samples = tm.samples(family, 3)
    records = capture(model, samples, unit)
    alpha = 0.5
    names = [s.name for s in model.sites(unit)]
    # The gradient reaches every site: a tiny model whose images never reached the loss would
    # test its vision rows against zeros on every path. Experts are the exception: one may get
    # no token, or (in the last layer) prompt tokens alone, whose outputs no target reads.
    reached = {name for r in records for name, (_, g) in r.items() if g.numel() and g.max() > 0}
    unreached = [n for n in names if n not in reached and not re.search(r"\.e\d+\.", n)]
    assert not unreached, unreached
    expected = reduce(records, alpha, names)
    if family in tm.MOE_FAMILIES:
        # Every expert of the tiny model gets some tokens, and some sample misses some expert,
        # so the average over routed tokens is what is tested.
        assert sorted(expected) == sorted(names)
        assert any(len(r) < len(names) for r in records) or family == "qwen2_moe"
    for batch_size in (1, 2):
        scores = canfast.score(
            model,
            samples,
            alpha=alpha,
            unit=unit,
            targets="given",
            batch_size=batch_size,
            backend="torch",
            progress=False,
        )
        assert sorted(scores.sites) == sorted(names)
        for name, value in expected.items():
            got = scores[name].double()
            scale = value.abs().max().item()
            torch.testing.assert_close(
                got, value, rtol=1e-5, atol=1e-7 * scale, msg=f"{family} {name} bs={batch_size}"
            )


# ----- masking ---------------------------------------------------------------------------------


def pick(model, unit, per_site=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    neurons = []
    for site in model.all_sites(unit):
        for c in torch.randperm(site.channels, generator=generator)[:per_site].tolist():
            neurons.append((site.name, c))
    return NeuronSet(tuple(neurons))


@pytest.mark.parametrize("unit", ["out", "mid"])
@pytest.mark.parametrize("family", FAMILIES)
def test_hook_masking_equals_weight_masking(models, family, unit):
    model = model_of(models, family)
    batch = model.encode(tm.samples(family, 3))
    neurons = pick(model, unit)
    with torch.no_grad():
        plain = model.forward(batch).logits
        with masked(model, neurons, mode="hook", backend="torch"):
            hooked = model.forward(batch).logits
        with masked(model, neurons, mode="weight"):
            zeroed = model.forward(batch).logits
        after = model.forward(batch).logits
    torch.testing.assert_close(hooked, zeroed, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(hooked, plain, atol=1e-3)
    assert torch.equal(after, plain)


@pytest.mark.parametrize("family", tm.MOE_FAMILIES)
def test_batch_of_masks_on_experts(models, family):
    """Routed rows lose the block order of a batch of masks; each mask must still reach only
    its own copy of the batch."""
    model = model_of(models, family)
    samples = tm.samples(family, 3)
    sets = [pick(model, "out", 1, seed) for seed in range(3)]
    with masked(model, sets, mode="hook", backend="torch"):
        together = [e.ppl for e in evaluate(model, samples, batch_size=3, masks=len(sets))]
    alone = []
    for neurons in sets:
        with masked(model, neurons, mode="weight"):
            alone.append(evaluate(model, samples, batch_size=3)[0].ppl)
    assert together == pytest.approx(alone, rel=1e-5)
    assert len(set(round(p, 6) for p in alone)) == len(alone)


# ----- a short sweep ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_short_sweep(models, family):
    model = model_of(models, family)
    samples = tm.samples(family, 2)
    scores = canfast.score(model, samples, targets="given", backend="torch", progress=False)
    result = canfast.sweep(
        model,
        samples,
        scores,
        schedule=[1, 8, len(scores.ranking())],
        tau=50.0,  # never reached: every k of the schedule is evaluated
        seeds=1,
        targets="given",
        batch_size=2,
        masks_per_pass=2,
        generations=0,
        backend="torch",
        progress=False,
    )
    assert result.curve.k[-1] == result.n_neurons
    top = scores.top(8)
    with masked(model, top, mode="weight"):
        ppl8 = evaluate(model, samples, batch_size=2)[0].ppl
    assert result.curve.ppl[result.curve.k.index(8)] == pytest.approx(ppl8, rel=1e-5)


# ----- a family canfast does not know, described by the user -----------------------------------

GPTJ_MAP = {
    "blocks": [{"path": "transformer.h.*.mlp", "linears": {"fc_in": "up", "fc_out": "down"}}]
}


def test_unknown_family_is_one_clear_line():
    hf, tok = tm.build("gptj")
    with pytest.raises(canfast.BadInput) as error:
        canfast.Model(hf, tok)
    message = str(error.value)
    assert "\n" not in message
    assert "'gptj'" in message and "--sites-map" in message


@pytest.mark.parametrize("as_file", [False, True])
def test_user_map_describes_ffn_blocks(tmp_path, as_file):
    hf, tok = tm.build("gptj")
    ffn_map = GPTJ_MAP
    if as_file:
        ffn_map = tmp_path / "map.json"
        ffn_map.write_text(json.dumps(GPTJ_MAP))
    model = canfast.Model(hf.double(), tok, ffn_map=ffn_map)
    names = [s.name for s in model.all_sites("out")]
    assert names == [f"language.{i}.{k}" for i in range(L) for k in ("up", "down")]
    assert [s.channels for s in model.all_sites("out")] == [F, H] * L
    assert [s.channels for s in model.all_sites("mid")] == [F] * L
    assert model.site("language.1.down").module is hf.transformer.h[1].mlp.fc_out
    # It scores like any family: against the float64 reference.
    hf.requires_grad_(True)
    samples = tm.samples("gptj", 3)
    records = capture(model, samples, "out")
    expected = reduce(records, 0.5, names)
    scores = canfast.score(
        model, samples, targets="given", batch_size=2, backend="torch", progress=False
    )
    for name, value in expected.items():
        torch.testing.assert_close(scores[name].double(), value, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize(
    ("ffn_map", "words"),
    [
        ({}, "'blocks'"),
        ({"blocks": [{"linears": {"fc_in": "up"}}]}, "'path'"),
        ({"blocks": [{"path": "x", "linears": {"fc_in": "middle"}}]}, "'middle'"),
        ({"blocks": [{"path": "x", "linears": {"a": "up"}, "component": "eye"}]}, "'eye'"),
        ({"blocks": [{"path": "x", "linears": {"a": "up"}}], "task": "vqa"}, "'vqa'"),
        ({"blocks": [{"path": "nothing.*", "linears": {"fc_in": "up"}}]}, "no feed-forward"),
        ("missing.json", "cannot read"),
    ],
)
def test_bad_user_maps(tmp_path, ffn_map, words):
    hf, tok = tm.build("gptj")
    if isinstance(ffn_map, str):
        ffn_map = tmp_path / ffn_map
    with pytest.raises(canfast.BadInput, match=words):
        canfast.Model(hf, tok, ffn_map=ffn_map)


def test_sites_map_on_the_command_line(tmp_path, capsys):
    from canfast.cli import main

    hf, tok = tm.build("gptj")
    hf.save_pretrained(tmp_path / "gptj")
    tok.save_pretrained(tmp_path / "gptj")
    (tmp_path / "map.json").write_text(json.dumps(GPTJ_MAP))

    def run(*args):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code
        return code, *capsys.readouterr()

    code, out, _ = run("sites", "--model", tmp_path / "gptj", "--sites-map", tmp_path / "map.json")
    assert code == 0
    assert "language.1.down" in out and "transformer.h.1.mlp.fc_out" in out
    code, _, err = run("sites", "--model", tmp_path / "gptj")
    assert code == 2 and err.count("\n") == 1 and "'gptj'" in err


# ----- site maps of real configurations, from the config alone ----------------------------------

CONFIGS = Path(__file__).resolve().parent.parent / "bench" / "configs"


def test_config_builds_on_the_meta_device():
    model = canfast.load(str(CONFIGS / "mixtral-8x7b.json"))
    assert all(p.is_meta for p in model.hf.parameters())
    sites = model.all_sites("out")
    assert len(sites) == 32 * 8 * 3
    assert sum(s.channels for s in sites) == 32 * 8 * (2 * 14336 + 4096)
    assert model.site("language.31.e7.down").channels == 4096
    assert sum(s.channels for s in model.all_sites("mid")) == 32 * 8 * 14336


def test_every_family_has_a_real_config():
    """bench/configs holds one real configuration per family of the issue; each loads and
    reaches the components its adapter declares."""
    from canfast.adapters import adapter_for

    wanted = set(tm.NEW_VLM_FAMILIES + tm.NEW_TEXT_FAMILIES + tm.MOE_FAMILIES)
    seen = set()
    for path in sorted(CONFIGS.glob("*.json")):
        model_type = json.loads(path.read_text())["model_type"]
        seen.add(model_type)
        model = canfast.load(str(path))
        components = {s.component for s in model.all_sites("out")}
        assert components == set(adapter_for(model_type).components), path.name
    assert wanted <= seen


def test_sites_cli_reads_a_config(tmp_path, capsys):
    from canfast.cli import main

    def run(*args):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code
        out, err = capsys.readouterr()
        return code, out, err

    code, out, _ = run("sites", "--model", CONFIGS / "phi-3-mini-4k.json")
    assert code == 0
    assert "language.31.gate" in out and "gate_up_proj.gate" in out
    bad = tmp_path / "config.json"
    bad.write_text('{"model_type": "no_such_model"}')
    code, _, err = run("sites", "--model", bad)
    assert code == 2 and err.count("\n") == 1 and "no_such_model" in err


@pytest.mark.parametrize("command", ["score", "sweep"])
def test_a_config_maps_sites_but_does_not_run(tmp_path, capsys, monkeypatch, command):
    """A config.json gives the architecture alone: a run is refused in one line, by name,
    and writes nothing."""
    from canfast.cli import main

    monkeypatch.chdir(tmp_path)
    config = CONFIGS / "phi-3-mini-4k.json"
    with pytest.raises(SystemExit) as stop:
        main([command, "--model", str(config), "--out", "run"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1, err
    assert "phi-3-mini-4k.json" in err and "no tokenizer" in err
    assert list(tmp_path.iterdir()) == []


# ----- the README's families table ------------------------------------------------------------


def test_readme_families_table_is_generated_from_the_adapters():
    from canfast.adapters.table import families_table, readme_table

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert readme_table(readme) == families_table(), "run: python -m canfast.adapters"
    for model_type in tm.NEW_VLM_FAMILIES + tm.NEW_TEXT_FAMILIES + tm.MOE_FAMILIES:
        assert f"`{model_type}`" in families_table()


# ----- the report counts top neurons per expert -----------------------------------------------


def test_report_counts_top_neurons_per_expert(models, tmp_path):
    from canfast.report.html import placement_section
    from canfast.report.placement import placement
    from canfast.report.run import Run

    model = model_of(models, "qwen2_moe")
    samples = tm.samples("qwen2_moe", 2)
    scores = canfast.score(model, samples, targets="given", backend="torch", progress=False)
    ranking = scores.ranking()
    k = 40
    top = [(s, c, v) for (s, c), v in zip(ranking.neurons, ranking.scores, strict=True)]
    run = Run(tmp_path, SimpleNamespace(k_star=k), scores, top)
    place = placement(run)
    groups = [c.group for c in place.by_expert]
    assert groups == [f"e{e}" for e in range(E)] + ["shared"]
    expected = {g: 0 for g in groups}
    for site, _ in ranking.neurons[:k]:
        expected[parse_site_name(site).expert] += 1
    assert {c.group: c.count for c in place.by_expert} == expected
    per_expert = L * ((F // 2) * 2 + H)
    assert [c.total for c in place.by_expert] == [per_expert] * E + [L * (2 * F + H)]
    assert "per expert" in placement_section(run, place, [])
    # Dense models get no per-expert table.
    dense = placement(Run(tmp_path, SimpleNamespace(k_star=4), scores_of(models, "qwen3"), []))
    assert dense.by_expert == []


def scores_of(models, family):
    model = model_of(models, family)
    return canfast.score(
        model, tm.samples(family, 2), targets="given", backend="torch", progress=False
    )


# ----- prompts through the model's chat template ----------------------------------------------

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
    "{{ m.content }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
LLAVA_CHAT = (
    "{% for m in messages %}{{ m.role | upper }}: {% for c in m.content %}"
    "{% if c.type == 'image' %}<image>\n{% else %}{{ c.text }}{% endif %}{% endfor %} "
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
GEMMA_CHAT = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m.role }}\n"
    "{% for c in m.content %}{% if c.type == 'image' %}<start_of_image>{% else %}{{ c.text }}"
    "{% endif %}{% endfor %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
MARKERS = ("<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def chat_model(template: str):
    """A tiny model whose processor or tokenizer carries ``template``; returns the model and
    the template's last tokens before the answer."""
    if template in (CHATML, LLAMA3):
        hf, tok = tm.build("qwen3")
        from tokenizers import AddedToken

        tok = copy.deepcopy(tok)
        tok.add_tokens([AddedToken(m, special=True) for m in MARKERS], special_tokens=True)
        tok.chat_template = template
        hf.resize_token_embeddings(len(tok))
        opener = "<|end_header_id|>" if template == LLAMA3 else "<|im_start|>"
        return canfast.Model(hf, tok), opener
    family = "llava" if template == LLAVA_CHAT else "gemma3"
    hf, processor = tm.build(family)
    processor = copy.deepcopy(processor)
    processor.chat_template = template
    return canfast.Model(hf, processor), ":" if family == "llava" else "<start_of_turn>"


@pytest.mark.parametrize("template", [CHATML, LLAMA3, LLAVA_CHAT, GEMMA_CHAT])
def test_chat_template_target_mask_covers_the_answer_alone(template):
    model, opener = chat_model(template)
    assert model.chat_template
    tok = model.tokenizer
    samples = tm.samples("llava" if model.adapter.uses_images else "qwen3", 3)
    batch = model.encode(samples)
    ids = batch.inputs["input_ids"]
    for i, sample in enumerate(samples):
        answer = tok.convert_tokens_to_ids(sample.target.split()) + [tok.eos_token_id]
        assert ids[i][batch.target_mask[i]].tolist() == answer
        first = int(batch.target_mask[i].nonzero()[0])
        before = tok.convert_ids_to_tokens(ids[i, :first].tolist())
        # The template's user turn and the opening of the assistant's turn precede the answer.
        assert opener in before
        assert tok.convert_tokens_to_ids(sample.prompt.split()[0]) in ids[i, :first].tolist()
        assert before.count(tok.bos_token) <= 1
        if model.adapter.uses_images:
            image_id = model.hf.config.image_token_id
            assert (ids[i, :first] == image_id).sum() > 1  # the placeholder, expanded
    with torch.no_grad():
        assert torch.isfinite(model.forward(batch).logits).all()


def test_chat_template_overrides():
    model, _ = chat_model(CHATML)
    sample = tm.samples("qwen3", 1)[0]
    assert model.encoder.prompt_text(sample) == (
        f"<|im_start|>user\n{sample.prompt}<|im_end|>\n<|im_start|>assistant\n"
    )
    llama3, _ = chat_model(LLAMA3)
    assert llama3.encoder.prompt_text(sample).startswith(
        f"<|start_header_id|>user<|end_header_id|>\n\n{sample.prompt}<|eot_id|>"
    )
    hf, tok = tm.build("qwen3")
    tok = copy.deepcopy(tok)
    tok.chat_template = CHATML
    plain = canfast.Model(hf, tok, chat_template=False)
    assert plain.encoder.prompt_text(sample) == sample.prompt
    custom = canfast.Model(hf, tok, prompt_template="USER : {prompt} ASSISTANT :")
    assert not custom.chat_template
    assert custom.encoder.prompt_text(sample) == f"USER : {sample.prompt} ASSISTANT :"
    with pytest.raises(canfast.BadInput, match="no {prompt}"):
        canfast.Model(hf, tok, prompt_template="USER : ASSISTANT :")


@pytest.mark.skipif(not canfast.ops.available("cpp"), reason="canfast._C is not built")
@pytest.mark.parametrize("family", ["phi3", "mixtral", "qwen2_moe"])
def test_views_on_the_cpp_backend(models, family):
    """The C++ kernels read a view's weight (a slice of the stacked or fused parameter) like any
    Linear's: scores and hook masking agree with the torch backend."""
    model = model_of(models, family)
    samples = tm.samples(family, 3)
    common = dict(targets="given", batch_size=2, progress=False)
    ours = canfast.score(model, samples, backend="cpp", **common)
    ref = canfast.score(model, samples, backend="torch", **common)
    for name in ref.sites:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-4, atol=1e-6)
    batch = model.encode(samples)
    neurons = pick(model, "out")
    with torch.no_grad():
        with masked(model, neurons, mode="hook", backend="cpp"):
            hooked = model.forward(batch).logits
        with masked(model, neurons, mode="weight"):
            zeroed = model.forward(batch).logits
    torch.testing.assert_close(hooked, zeroed, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen2_vl", "mistral3"])
def test_images_of_different_sizes_in_one_batch_are_scored(models, family):
    """Packed vision rows go each to its own sample whatever the images' sizes (no refusal any
    more): one batch scores as one sample at a time does (tests/test_vision_rows.py checks it
    against the float64 reference)."""
    model = model_of(models, family)
    samples = tm.samples(family, 2)
    wide = tm.image(7).resize((2 * tm.IMAGE_SIZE, tm.IMAGE_SIZE))
    samples[1] = canfast.Sample(wide, samples[1].prompt, samples[1].target)
    common = dict(targets="given", backend="torch", progress=False)
    together = canfast.score(model, samples, batch_size=2, **common)
    alone = canfast.score(model, samples, batch_size=1, **common)
    for name in alone.sites:
        torch.testing.assert_close(together[name], alone[name], rtol=1e-4, atol=1e-6)
