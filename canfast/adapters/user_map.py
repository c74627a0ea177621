"""FFN blocks described by the user, for model families canfast has no rule for.

A map is a small JSON object (or the same Python dict) naming the modules that are FFN blocks
and the kind of each of their Linears::

    {
      "task": "causal",
      "uses_images": false,
      "blocks": [
        {"path": "transformer.h.*.mlp", "linears": {"fc_in": "up", "fc_out": "down"}},
        {"path": "vision.blocks.*.ffn", "component": "vision",
         "linears": {"w1": "gate", "w3": "up", "w2": "down"}}
      ]
    }

- ``path``: a glob (``*`` matches any characters, dots included) over module paths as
  ``model.named_modules()`` lists them.
- ``linears``: child name (dotted for grandchildren) to kind, ``gate``, ``up`` or ``down``;
  ``down`` is the projection back into the residual stream and carries the ``mid`` unit.
- ``component``: ``vision``, ``projector``, ``qformer`` or ``language``; by default it is read
  from the path as for built-in families.
- ``task``: ``causal`` (default), ``seq2seq`` or ``masked``; ``uses_images``: whether every
  sample needs an image (default false).

Pass it as ``canfast.load(name, ffn_map="map.json")`` (or a dict), or ``Model(hf, processor,
ffn_map=...)``; on the command line, ``--sites-map map.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

from canfast.adapters.base import Adapter, Block, component_by_keyword
from canfast.errors import BadInput
from canfast.sites import COMPONENTS

TASKS = ("causal", "seq2seq", "masked")
LINEAR_KINDS = ("gate", "up", "down")


def read_ffn_map(ffn_map: dict | str | Path) -> dict:
    """The map as a dict: given as one, or read from a JSON file."""
    if isinstance(ffn_map, dict):
        return ffn_map
    path = Path(ffn_map).expanduser()
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise BadInput(f"sites map {path}: cannot read it ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise BadInput(f"sites map {path}: not JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise BadInput(f"sites map {path}: expected a JSON object with a 'blocks' list")
    return data


def adapter_from_map(model_type: str, ffn_map: dict | str | Path) -> Adapter:
    """An adapter whose FFN sites are exactly the blocks the map names."""
    where = ffn_map if not isinstance(ffn_map, dict) else "sites map"
    data = read_ffn_map(ffn_map)
    unknown = sorted(set(data) - {"task", "uses_images", "blocks", "prompt_template"})
    if unknown:
        raise BadInput(f"{where}: unknown key {unknown[0]!r}; expected blocks, task, uses_images")
    task = data.get("task", "causal")
    if task not in TASKS:
        raise BadInput(f"{where}: task {task!r}; choose {', '.join(TASKS)}")
    raw_blocks = data.get("blocks")
    if not isinstance(raw_blocks, list) or not raw_blocks:
        raise BadInput(f"{where}: 'blocks' must be a non-empty list of {{path, linears}}")
    blocks = []
    for i, raw in enumerate(raw_blocks):
        if not isinstance(raw, dict) or not isinstance(raw.get("path"), str):
            raise BadInput(f"{where}: block {i} needs a 'path' glob, e.g. model.layers.*.mlp")
        linears = raw.get("linears")
        if not isinstance(linears, dict) or not linears:
            raise BadInput(f'{where}: block {i} needs \'linears\', e.g. {{"fc1": "up"}}')
        bad = [k for k in linears.values() if k not in LINEAR_KINDS]
        if bad:
            raise BadInput(f"{where}: block {i}: kind {bad[0]!r}; choose gate, up or down")
        if len(set(linears.values())) != len(linears):
            raise BadInput(f"{where}: block {i}: each kind may appear once")
        component = raw.get("component")
        if component is not None and component not in COMPONENTS:
            raise BadInput(
                f"{where}: block {i}: component {component!r}; choose {', '.join(COMPONENTS)}"
            )
        blocks.append(Block(raw["path"], dict(linears), component))

    def stream_of(path: str) -> str | None:
        if component_by_keyword(path) != "language":
            return None
        if task == "seq2seq" and ".decoder." in f".{path}.":
            return "decoder"
        return "language"

    return Adapter(
        family=f"user map ({model_type})",
        model_types=(model_type,),
        task=task,
        component_of=component_by_keyword,
        stream_of=stream_of,
        prompt_template=data.get("prompt_template", "{prompt}"),
        uses_images=bool(data.get("uses_images", False)),
        blocks=tuple(blocks),
    )
