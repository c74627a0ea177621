"""CAN scoring: per site and sample, sums of ``|dL/da|**alpha * |a|`` taken during the backward
pass, so memory is bounded by one batch.

Two paths give the same numbers. The fused one (the default on the cpp and triton backends)
routes each site's Linear through ``canfast.ops.masked_linear`` with a score sink: its backward
adds the sums while it computes ``dL/dx``. The hook one (the reference, and the path of the
torch backend) collects ``a`` and ``dL/da`` with hooks and reduces them with ``score_accumulate``.

    S[i, j] = mean_t |dL_i/da[i, t, j]| ** alpha * |a[i, t, j]|      I[j] = mean_i S[i, j]

Gradients come from the sum of per-sample losses, so each sample's gradient is its own when
each sample's loss depends on that sample alone (the default NLL, and any objective that reads
one row at a time). A loss that compares the samples of a batch (an in-batch contrastive loss)
couples them: each sample's gradient then depends on the batch it shares. Parameters never
receive gradients.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from canfast import __version__, ops
from canfast.data import Sample, batches
from canfast.errors import BadInput
from canfast.io import check_finite, load_tensors, save_tensors
from canfast.mask import RouteLayer, route
from canfast.model import Batch, Model
from canfast.objective import Objective, mean_nll, with_targets
from canfast.sites import NeuronSet, Site

STATS = ("std", "act", "grad")
SITE_ORDER = "sites"  # metadata key of the site order in a score file


def check_alpha(alpha: float) -> float:
    """``alpha`` as a float; BadInput unless it lies in [0, 1] (the op's own check)."""
    try:
        return ops.check_alpha(alpha)
    except ValueError as error:
        raise BadInput(str(error)) from None


@dataclass
class Scores:
    """CAN scores of every neuron of some sites, with per-neuron statistics and provenance.

    ``scores["language.3.down"]`` is that site's float32 tensor of ``I``; ``stats[site]`` holds
    ``std`` (of ``S`` over samples), ``act`` (mean ``|a|``) and ``grad`` (mean ``|dL/da|``).
    """

    values: dict[str, Tensor]
    stats: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    meta: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, site: str) -> Tensor:
        return self.values[site]

    def __contains__(self, site: str) -> bool:
        return site in self.values

    @property
    def sites(self) -> list[str]:
        return list(self.values)

    def ranking(self) -> NeuronSet:
        """Every neuron, best first; ties keep site order, then channel order."""
        names = list(self.values)
        flat = torch.cat([self.values[n].float() for n in names])
        owner = torch.cat([torch.full((self.values[n].numel(),), i) for i, n in enumerate(names)])
        channel = torch.cat([torch.arange(self.values[n].numel()) for n in names])
        order = torch.sort(flat, descending=True, stable=True).indices
        neurons = tuple((names[owner[i]], int(channel[i])) for i in order.tolist())
        return NeuronSet(neurons, tuple(flat[order].tolist()))

    def top(self, k: int) -> NeuronSet:
        return self.ranking()[:k]

    def only(self, sites: Sequence[str]) -> Scores:
        """These scores narrowed to ``sites`` (in that order), with their statistics."""
        return Scores(
            {s: self.values[s] for s in sites},
            {s: self.stats[s] for s in sites if s in self.stats},
            dict(self.meta),
        )

    def save(self, path) -> None:
        tensors = dict(self.values)
        for site, stats in self.stats.items():
            for stat, tensor in stats.items():
                tensors[f"{site}@{stat}"] = tensor
        # safetensors stores keys sorted; the site order (which breaks ranking ties) is kept
        # in the metadata.
        meta = {**self.meta, SITE_ORDER: json.dumps(list(self.values))}
        save_tensors(path, {k: v.float() for k, v in tensors.items()}, meta)

    @classmethod
    def load(cls, path) -> Scores:
        tensors, meta = load_tensors(path)
        check_finite(path, tensors)
        if not meta.get("model_fingerprint"):
            raise BadInput(f"{path}: no model fingerprint, so no model can be checked against it")
        values = {k: v for k, v in tensors.items() if "@" not in k}
        order = meta.pop(SITE_ORDER, None)
        if order is not None:
            try:
                names = json.loads(order)
            except json.JSONDecodeError:
                names = []
            if isinstance(names, list) and sorted(names) == sorted(values):
                values = {name: values[name] for name in names}
        stats: dict[str, dict[str, Tensor]] = {}
        for key, tensor in tensors.items():
            if "@" in key:
                site, stat = key.split("@", 1)
                stats.setdefault(site, {})[stat] = tensor
        if not values:
            raise BadInput(f"{path}: holds no scores")
        return cls(values, stats, meta)

    def check_model(self, model: Model, source: str = "scores") -> None:
        """Refuse scores computed on a different model."""
        expected = self.meta.get("model_fingerprint")
        if expected and expected != model.fingerprint():
            raise BadInput(
                f"{source} were computed on another model ({self.meta.get('model', '?')}, "
                f"fingerprint {expected}); this is {model.name} ({model.fingerprint()})"
            )
        for site in self.values:
            if site.endswith(".mid"):
                known = [s for s in model.all_sites("mid") if s.name == site]
            else:
                known = [s for s in model.all_sites("out") if s.name == site]
            if not known or known[0].channels != self.values[site].numel():
                raise BadInput(f"{source} site {site} does not exist in {model.name}")


def data_fingerprint(samples: Sequence[Sample]) -> str:
    digest = hashlib.sha256()
    for s in samples:
        digest.update(repr((s.prompt, s.target, s.category)).encode())
        digest.update(s.image_digest())
    return digest.hexdigest()[:16]


def _on(t: Tensor, device: torch.device) -> Tensor:
    return t if t.device == device else t.to(device)


class _Totals:
    """Running per-channel sums over samples for every site of a run, in float64.

    A batch's per-sample sums wait in :meth:`add` until :meth:`flush` folds them in. The sites
    of one width share one table, so a batch costs a few tensor ops per width rather than per
    site (a run scores every FFN of a model: most of a small batch's bookkeeping was this). The
    tables stay on the device the sums come from (float64 permitting) and folding has no
    data-dependent step, so scoring never waits on the device between batches; the one copy to
    the host is in :meth:`results`.
    """

    def __init__(self, sites: Sequence[Site]) -> None:
        self.slot: dict[str, tuple[int, int]] = {}  # site -> (its width, its row in that table)
        widths: dict[int, int] = {}
        for site in sites:
            self.slot[site.name] = (site.channels, widths.get(site.channels, 0))
            widths[site.channels] = widths.get(site.channels, 0) + 1
        self.widths = widths
        # width -> samples seen [S], per-sample means of S, |a|, |g| summed [S, 3, C], and
        # per-sample means of S, squared, summed [S, C]
        self.tables: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        self.pending: list[tuple[str, Tensor, Tensor]] = []
        self.index: dict[tuple, Tensor] = {}  # table rows of a batch's layout, reused

    def add(self, site: str, sums: Tensor, counts: Tensor) -> None:
        """Per-sample sums ``[B, 3, C]`` of ``site`` over ``counts`` ``[B]`` rows each."""
        self.pending.append((site, sums, counts))

    def _table(self, width: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        if width not in self.tables:
            device = device if device.type != "mps" else torch.device("cpu")
            sites, f64 = self.widths[width], torch.float64
            self.tables[width] = (
                torch.zeros(sites, dtype=torch.int64, device=device),
                torch.zeros(sites, 3, width, dtype=f64, device=device),
                torch.zeros(sites, width, dtype=f64, device=device),
            )
        return self.tables[width]

    def flush(self) -> None:
        """Fold the pending sums in: one stack per (width, samples), and a site called twice in
        one batch lands in a later round, so each ``index_add_`` meets distinct rows (its result
        then does not depend on the order a device adds in)."""
        groups: dict[tuple[int, int, int], list[tuple[int, Tensor, Tensor]]] = {}
        calls: dict[str, int] = {}
        for site, sums, counts in self.pending:
            width, row = self.slot[site]
            turn = calls[site] = calls.get(site, -1) + 1
            groups.setdefault((width, sums.shape[0], turn), []).append((row, sums, counts))
        self.pending.clear()
        for (width, _, _), items in groups.items():
            n, means_sum, s2 = self._table(width, items[0][1].device)
            device = means_sum.device
            # [I, B, 3, C] and [I, B]; a model spread over devices sends its sums here
            sums = torch.stack([_on(s, device) for _, s, _ in items])
            counts = torch.stack([_on(c, device) for _, _, c in items])
            # A sample with no row at a site (no token routed to an expert) has no S. Nothing
            # was added to its sums, so it adds exactly 0 below; it is just not counted.
            means = sums.double() / counts.clamp_min(1).double()[..., None, None]
            key = (width, *(row for row, _, _ in items))
            index = self.index.get(key)
            if index is None:
                index = self.index[key] = torch.tensor(key[1:], device=device)
            n.index_add_(0, index, (counts > 0).sum(1))
            means_sum.index_add_(0, index, means.sum(1))
            s2.index_add_(0, index, means[:, :, 0].square().sum(1))

    def results(self) -> dict[str, tuple[Tensor, dict[str, Tensor]]]:
        """Per site, ``I`` and its statistics: float32 on the host, a tensor of its own each."""
        per_width = {}
        for width, (n, means_sum, s2) in self.tables.items():
            n = n.cpu().clamp_min(1).double()[:, None]
            totals = means_sum.cpu() / n[:, :, None]
            mean = totals[:, 0]
            std = (s2.cpu() / n - mean * mean).clamp_min(0).sqrt()
            # unbind: one call gives every site's row; each is cloned so no two share storage.
            per_width[width] = [
                t.float().unbind(0) for t in (mean, std, totals[:, 1], totals[:, 2])
            ]
        out = {}
        for site, (width, row) in self.slot.items():
            if width in per_width:
                mean, std, act, grad = (rows[row].clone() for rows in per_width[width])
            else:  # no batch reached this site
                mean, std, act, grad = (torch.zeros(width) for _ in range(4))
            out[site] = mean, {"std": std, "act": act, "grad": grad}
        return out


@dataclass(frozen=True)
class SampleRows:
    """How the rows of one call of a site's Linear split into samples.

    An activation ``[..., C]`` is read as ``[groups, steps, C]``; ``valid`` (bool
    ``[groups, steps]``) marks the real rows, or is None when every row is real. Each group is
    one sample unless ``owner`` (long ``[groups]``) names the sample of each group: a vision
    tower that packs a batch's images into one sequence, or runs each image's tiles as rows of
    their own, gives a sample several groups, of a number that varies with its image. This is the
    one place that decides it, for the fused and the hook path alike: a module that sees only
    some rows of each sample (experts of a mixture, fed the tokens their router picked) needs
    its own rule here.
    """

    samples: int
    steps: int
    valid: Tensor | None
    owner: Tensor | None = None
    counted: dict[torch.device, Tensor] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, lead: torch.Size, batch: Batch | None, stream: str | None) -> SampleRows:
        """For an activation whose leading (non-channel) shape is ``lead``."""
        rows = lead.numel()
        samples = batch.size if batch is not None else lead[0]
        # Some models (OPT) flatten [B, T, H] to [B*T, H] around their FFN: fold the rows back
        # per sample, so that S stays a per-sample mean and the padding mask applies.
        if len(lead) == 2 or samples == 0 or rows % samples:
            samples = lead[0]
        steps = rows // samples if samples else 0
        valid = batch.valid.get(stream) if batch is not None and stream else None
        if valid is not None and tuple(valid.shape) != (samples, steps):
            valid = None
        return cls(samples, steps, valid)

    def counts(self, device: torch.device) -> Tensor:
        """The number of real rows of each group (computed once per device: the sites of a
        batch share their SampleRows)."""
        counts = self.counted.get(device)
        if counts is None:
            if self.valid is not None:
                counts = self.valid.sum(1).to(device)
            else:
                counts = torch.full((self.samples,), self.steps, device=device)
            self.counted[device] = counts
        return counts


@dataclass(frozen=True)
class ImageRows:
    """Which sample each image's rows in a vision tower belong to.

    ``packed``: the tower runs every image of the batch as one sequence, image after image, and
    ``sizes`` holds each image's rows at the patch embedding (a merger downstream divides them
    all by one factor). ``tiled``: the tower runs each image's tiles as rows of a batch of
    tiles, and ``sizes`` holds each image's tile count. ``owner`` holds each image's sample.
    """

    layout: str
    sizes: Tensor
    owner: Tensor

    def split(self, site: Site, lead: torch.Size) -> SampleRows:
        """The rows of one call of a vision-tower site, grouped per image."""
        total = int(self.sizes.sum())
        if self.layout == "tiled":
            if len(lead) < 2 or lead[0] != total:
                raise BadInput(
                    f"cannot tell which sample each row of {site.name} belongs to: it runs over "
                    f"{tuple(lead)} rows for {total} image tiles; score with batch_size=1"
                )
            return SampleRows(
                total, lead.numel() // total, None, self.owner.repeat_interleave(self.sizes)
            )
        rows = lead.numel()
        per_image = self.sizes * rows
        if total == 0 or bool((per_image % total).any()):
            raise BadInput(
                f"cannot tell which sample each row of {site.name} belongs to: {rows} rows do not "
                f"split over images of {self.sizes.tolist()} patches; score with batch_size=1"
            )
        per_image = per_image // total
        # Equal groups of the largest size that divides every image's rows keep the fused
        # sink's [groups, steps] layout; each group sums into its image's sample afterwards.
        step = math.gcd(*per_image.tolist())
        return SampleRows(rows // step, step, None, self.owner.repeat_interleave(per_image // step))


def image_rows(model: Model, batch: Batch) -> ImageRows | None:
    """The image layout of a batch whose vision tower does not run one row block per sample."""
    config = model.hf.config
    vision = getattr(config, "vision_config", None)
    grid = batch.inputs.get("image_grid_thw")
    sizes = batch.inputs.get("image_sizes")
    if grid is not None:
        layout, counts = "packed", grid.long().prod(-1).cpu()
    elif sizes is not None and getattr(config, "image_grid_pinpoints", None) is not None:
        counts = torch.tensor(
            [_tiles_of(config, tuple(int(v) for v in size)) for size in sizes.tolist()]
        )
        layout = "tiled"
    elif getattr(config, "model_type", None) in ("idefics3", "smolvlm"):
        return _real_tiles(batch)
    elif getattr(config, "model_type", None) == "internvl":
        return _internvl_tiles(model, batch)
    elif sizes is not None and vision is not None and hasattr(vision, "patch_size"):
        patch = int(vision.patch_size)
        sizes = sizes.long().cpu()
        layout, counts = "packed", (sizes[:, 0] // patch) * (sizes[:, 1] // patch)
    else:
        return None
    return ImageRows(layout, counts, _image_owners(model, batch, counts.shape[0]))


def _image_owners(model: Model, batch: Batch, images: int) -> Tensor:
    """The sample of each image of a batch, in order: every sample when each has one; else the
    samples whose prompt holds the image token (a sample holds at most one image)."""
    if images == batch.size:
        return torch.arange(batch.size)
    config = model.hf.config
    token = getattr(config, "image_token_id", None)
    if token is None:
        token = getattr(config, "image_token_index", None)
    ids = batch.inputs.get("input_ids")
    if token is not None and ids is not None:
        holders = (ids == token).any(1).nonzero()[:, 0].cpu()
        if holders.shape[0] == images:
            return holders
    raise BadInput(
        f"cannot tell which sample each of the {images} images of a batch of {batch.size} "
        "belongs to; score with batch_size=1"
    )


def _real_tiles(batch: Batch) -> ImageRows | None:
    """Idefics3 and SmolVLM run the tiles of ``pixel_values [B, tiles, 3, H, W]`` that are not
    all zero (the processor's padding), so a sample's tiles are its tiles with a nonzero value:
    the model's own rule, including its keeping of the first tile when every one is zero."""
    pixels = batch.inputs.get("pixel_values")
    if pixels is None or pixels.dim() != 5:
        return None
    real = (pixels != 0).flatten(2).any(-1).cpu()
    if not bool(real.any()):
        real.view(-1)[0] = True
    counts = real.sum(1)
    owner = counts.nonzero()[:, 0]
    return ImageRows("tiled", counts[owner], owner)


def _internvl_tiles(model: Model, batch: Batch) -> ImageRows | None:
    """InternVL runs every tile of every image (its processor may cut an image into several) as
    rows of one batch of tiles, and each tile fills the same number of image tokens: a sample's
    tiles are its share of the image tokens."""
    pixels = batch.inputs.get("pixel_values")
    ids = batch.inputs.get("input_ids")
    if pixels is None or ids is None:
        return None
    tokens = (ids == model.hf.config.image_token_id).sum(1).long().cpu()
    tiles, total = pixels.shape[0], int(tokens.sum())
    if total == 0 or bool((tokens * tiles % total).any()):
        raise BadInput(
            f"cannot tell which sample each of {tiles} image tiles belongs to from {total} "
            "image tokens; score with batch_size=1"
        )
    counts = tokens * tiles // total
    owner = counts.nonzero()[:, 0]
    return ImageRows("tiled", counts[owner], owner)


def _tiles_of(config, image_size: tuple[int, int]) -> int:
    """The tiles LLaVA-NeXT / OneVision run through the vision tower for one image: the
    model's own count (base image plus the grid that best fits its aspect ratio)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    return int(
        image_size_to_num_patches(
            image_size, config.image_grid_pinpoints, config.vision_config.image_size
        )
    )


class _Collector:
    """Per-site running totals of one scoring run, fed batch by batch by one of two paths."""

    def __init__(self, sites: Sequence[Site], alpha: float, backend: str) -> None:
        self.sites = list(sites)
        self.alpha = alpha
        self.backend = backend
        self.totals = _Totals(sites)
        self.batch: Batch | None = None
        self.images: ImageRows | None = None
        self.known_rows: dict[tuple, SampleRows] = {}
        self.removers: list = []

    def __enter__(self) -> _Collector:
        return self

    def __exit__(self, *exc) -> None:
        for remove in reversed(self.removers):
            remove()
        self.removers.clear()

    def start_batch(self, batch: Batch, images: ImageRows | None) -> None:
        """Called before each batch's forward pass."""
        self.batch = batch
        self.images = images
        self.known_rows.clear()

    def rows(self, site: Site, lead: torch.Size) -> SampleRows:
        # Every site of a batch with the same leading shape and stream splits alike: decided
        # once per batch, not once per call.
        vision = self.images is not None and site.component in ("vision", "projector")
        key = (vision, lead, None if vision else site.stream)
        rows = self.known_rows.get(key)
        if rows is None:
            if vision:
                # Packed (Qwen-VL, Pixtral) or tiled (LLaVA-NeXT, InternVL, ...) image rows.
                rows = self.images.split(site, lead)
            else:
                rows = SampleRows.of(lead, self.batch, site.stream)
            self.known_rows[key] = rows
        # Only an expert view has the attribute; a Linear would raise and catch to say so.
        routed = site.module.__dict__.get("routed_rows")
        if not vision and routed is not None and lead.numel() == site.module.routed_total:
            # An expert (canfast.adapters.views) runs over every row of the batch while it is
            # watched, but only the rows its router picked count, each in its own sample.
            mask = torch.zeros(lead.numel(), dtype=torch.bool, device=routed.device)
            mask[routed] = True
            mask = mask.reshape(rows.samples, rows.steps)
            valid = mask if rows.valid is None else rows.valid.to(mask.device) & mask
            rows = SampleRows(rows.samples, rows.steps, valid)
        return rows

    def add(self, site: Site, sums: Tensor, rows: SampleRows) -> None:
        counts = rows.counts(sums.device)
        if rows.owner is not None:
            owner = rows.owner.to(sums.device)
            size = self.batch.size if self.batch is not None else int(owner.max()) + 1
            sums = sums.new_zeros(size, *sums.shape[1:]).index_add_(0, owner, sums)
            counts = counts.new_zeros(size).index_add_(0, owner, counts)
        self.totals.add(site.name, sums, counts)

    def reduce(self, site: Site, a: Tensor, g: Tensor, rows: SampleRows | None = None) -> None:
        """Score one activation and its gradient with the ``score_accumulate`` op; ``rows``:
        how they split into samples, when already known."""
        if rows is None:
            rows = self.rows(site, a.shape[:-1])
        a3 = a.reshape(rows.samples, rows.steps, a.shape[-1])
        g3 = g.reshape(a3.shape)
        out = torch.zeros(rows.samples, 3, a.shape[-1], dtype=torch.float32, device=a.device)
        ops.score_accumulate(a3, g3, self.alpha, out, rows.valid, backend=self.backend)
        self.add(site, out, rows)

    def finish_batch(self) -> None:
        """Called after each batch's backward pass."""


class _HookCollector(_Collector):
    """The reference path: hooks keep each site's activation and make it report its gradient,
    and ``score_accumulate`` reduces the pair."""

    def __init__(self, sites: Sequence[Site], alpha: float, backend: str) -> None:
        super().__init__(sites, alpha, backend)
        self.pending: dict[int, tuple[Site, Tensor]] = {}

    def __enter__(self) -> _HookCollector:
        for site in self.sites:
            if site.unit == "out":
                handle = site.module.register_forward_hook(self._output_hook(site))
            else:
                handle = site.module.register_forward_pre_hook(self._input_hook(site))
            self.removers.append(handle.remove)
        return self

    def _watch(self, site: Site, a: Tensor) -> Tensor:
        # Parameters need no gradient, so the first site on the path may see an input that does
        # not require one; a fresh leaf starts the graph there.
        if not a.requires_grad:
            a = a.detach().requires_grad_()
        kept = a.detach()
        key = id(kept)
        self.pending[key] = (site, kept)

        def on_grad(g: Tensor) -> None:
            self.pending.pop(key, None)
            self.reduce(site, kept, g)

        a.register_hook(on_grad)
        return a

    def _output_hook(self, site: Site):
        def hook(module, args, output):
            return self._watch(site, output)

        return hook

    def _input_hook(self, site: Site):
        def hook(module, args):
            return (self._watch(site, args[0]), *args[1:])

        return hook

    def finish_batch(self) -> None:
        """Sites whose activation got no gradient (unused by the loss) count with g = 0."""
        for site, a in list(self.pending.values()):
            self.reduce(site, a, torch.zeros_like(a))
        self.pending.clear()
        self.totals.flush()


@dataclass(eq=False)
class _Call:
    """One call of a routed site, and its sink."""

    site: Site
    rows: SampleRows
    sink: ops.ScoreSink


class _SiteSinks:
    """The sink source of one site on the fused path (see :class:`canfast.mask.SinkSource`)."""

    def __init__(self, collector: _FusedCollector, site: Site) -> None:
        self.collector = collector
        self.site = site
        self.unit = site.unit

    def open(self, x: Tensor) -> ops.ScoreSink:
        rows = self.collector.rows(self.site, x.shape[:-1])
        channels = self.site.channels
        out = torch.zeros(rows.samples, 3, channels, dtype=torch.float32, device=x.device)
        sink = ops.ScoreSink(self.collector.alpha, out, rows.valid, self.unit)
        self.collector.calls.append(_Call(self.site, rows, sink))
        return sink


class _FusedCollector(_Collector):
    """The fused path: each site's Linear runs through ``masked_linear`` with a score sink, so
    the backward pass computes the CAN sums while it computes ``dL/dx``."""

    def __init__(self, sites: Sequence[Site], alpha: float, backend: str) -> None:
        super().__init__(sites, alpha, backend)
        self.calls: list[_Call] = []

    def __enter__(self) -> _FusedCollector:
        try:
            for site in self.sites:
                layer = RouteLayer(sinks=_SiteSinks(self, site), backend=self.backend)
                self.removers.append(route(site, layer))
        except BaseException:
            self.__exit__()
            raise
        return self

    def finish_batch(self) -> None:
        for call in self.calls:
            unused = call.sink.pending
            if unused is not None:
                # The loss never used this call's output: scored with g = 0, as the hook path
                # scores it.
                self.reduce(call.site, unused, torch.zeros_like(unused), call.rows)
                call.sink.pending = None
            else:
                self.add(call.site, call.sink.out, call.rows)
        self.calls.clear()
        self.totals.flush()


PATHS = ("auto", "fused", "hooks")


def _collector_class(path: str, backend: str, model: Model) -> type[_Collector]:
    """``auto``: fused where a compiled backend runs, the hook reference on the torch one."""
    if path not in PATHS:
        raise BadInput(f"unknown scoring path {path!r}; choose one of {', '.join(PATHS)}")
    if path == "auto":
        compiled = model.dtype in ops.KERNEL_DTYPES and ops.resolve(backend, model.device.type)
        path = "fused" if compiled not in (False, "torch") else "hooks"
    return _FusedCollector if path == "fused" else _HookCollector


def check_signal(values: dict[str, Tensor], nll: bool, tokens: int, loss: float) -> None:
    """Refuse scores that rank nothing: every one of them would be 0, and a ranking of ties."""
    if nll and tokens == 0:
        raise BadInput(
            "no sample has a target token to score (a masked LM scores its [MASK] tokens: "
            "no prompt has one); give targets, or a custom objective="
        )
    if loss == 0.0:
        raise BadInput("the loss is exactly 0 on every sample: there is no gradient to score")
    if all(not bool(v.any()) for v in values.values()):
        raise BadInput(
            "every gradient at the chosen sites is 0: the loss does not depend on them, so "
            "every score is 0"
        )


def score(
    model: Model,
    samples: Sequence[Sample],
    alpha: float = 0.5,
    unit: str = "out",
    sites: Sequence[str] | str | None = None,
    components: Sequence[str] | None = None,
    kinds: Sequence[str] | None = None,
    targets: str = "self",
    batch_size: int = 8,
    max_new_tokens: int = 32,
    objective: Objective | None = None,
    backend: str = "auto",
    progress: bool = True,
    path: str = "auto",
) -> Scores:
    """CAN scores of every neuron of the chosen sites (all FFN sites by default).

    ``targets="self"`` scores the model's own greedy answers; ``"given"`` the data's targets.
    ``objective`` replaces the default per-sample NLL with any ``(outputs, batch) -> [B]``;
    ``S[i, j]`` is sample ``i``'s own only when its loss depends on no other sample of its batch.
    ``path``: ``"fused"`` computes the scores inside the backward pass of each site's Linear
    (routed through ``canfast.ops.masked_linear``); ``"hooks"`` collects activations and
    gradients with hooks and reduces them with ``score_accumulate`` (the reference); ``"auto"``
    takes the fused path on the cpp and triton backends.

    A run that cannot rank anything is bad input, naming why: no target token to score, a loss
    that is zero on every sample, or a gradient that is zero at every chosen site.
    """
    alpha = check_alpha(alpha)
    collector_class = _collector_class(path, backend, model)
    chosen = model.sites(unit, sites, components, kinds)
    if not samples:
        raise BadInput("no samples to score")
    started = time.perf_counter()
    samples = with_targets(model, samples, targets, max_new_tokens, batch_size, objective)
    loss_fn = objective or mean_nll
    mask_token = model.tokenizer.mask_token if model.task == "masked" else None
    if objective is None and mask_token and not any(mask_token in s.prompt for s in samples):
        check_signal({}, True, 0, 0.0)  # before any work: nothing would be scored
    # Taken before the passes, not after: the weights are the same, and right after a
    # backward pass the host is cold (bench/host_after_gemm.py), where this costs twice as much.
    fingerprint = model.fingerprint()
    trainable = [p for p in model.hf.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    # Target tokens and the sum of |loss|, kept as tensors on the model's device and read
    # once at the end: reading them per batch would make the host wait for each forward pass.
    tokens: Tensor | int = 0
    loss: Tensor | float = 0.0
    try:
        with collector_class(chosen, alpha, backend) as collector, torch.enable_grad():
            bar = tqdm(total=len(samples), desc="scoring", unit="sample", disable=not progress)
            for chunk in batches(samples, batch_size):
                batch = model.encode(chunk).to(model.device)
                collector.start_batch(batch, image_rows(model, batch))
                losses = loss_fn(model.forward(batch), batch)
                tokens = tokens + batch.target_mask.sum()
                loss = loss + losses.detach().abs().sum()
                total = losses.sum()
                if total.requires_grad:
                    total.backward()
                collector.finish_batch()
                bar.update(len(chunk))
            bar.close()
    finally:
        for p in trainable:
            p.requires_grad_(True)
    values, stats = {}, {}
    results = collector.totals.results()
    for site in chosen:
        values[site.name], stats[site.name] = results[site.name]
    check_signal(values, objective is None, int(tokens), float(loss))
    meta = {
        "alpha": repr(alpha),
        "unit": unit,
        "targets": targets,
        "model": model.name,
        "model_fingerprint": fingerprint,
        "data_fingerprint": data_fingerprint(samples),
        "n_samples": str(len(samples)),
        "objective": "mean_nll" if objective is None else getattr(objective, "__name__", "custom"),
        "canfast_version": __version__,
        "seconds": f"{time.perf_counter() - started:.3f}",
    }
    return Scores(values, stats, meta)
