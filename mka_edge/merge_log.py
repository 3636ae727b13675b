"""The merge log: typed records for ``merge_log.json``, its one reader, and the provenance both
exporters write from it.

``merge_log.json`` sits in every merged (and healed) model folder.  ``mka-edge merge`` writes it
(``merging.merge``), heal copies it forward with a ``heal`` entry added (``heal.distill``), and
eval, heal, the recipe lookup and the GGUF and ONNX exporters read it, all through
``read_merge_log``.  ``MergeStep.from_json`` / ``MergeLog.from_json`` and ``to_json`` round-trip
the file exactly: every key and value comes back, keys these records do not know are kept in
``extra``, so files written by older versions still load and nothing is lost on a rewrite.

JSON lists held in typed fields become tuples here (the records are frozen); ``to_json`` turns
them back into lists.  Dicts (``source``, ``heldout``, a layer map entry, ...) are kept as dicts.
"""

from __future__ import annotations

import json
from dataclasses import MISSING as _MISSING
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from . import __version__
from .errors import UserError

FILE = "merge_log.json"


def _frozen(v: Any) -> Any:
    """JSON lists -> tuples, recursively (dicts stay dicts, their values converted)."""
    if isinstance(v, list):
        return tuple(_frozen(x) for x in v)
    if isinstance(v, dict):
        return {k: _frozen(x) for k, x in v.items()}
    return v


def _plain(v: Any) -> Any:
    """The inverse of ``_frozen``, and records -> their JSON: what ``json.dumps`` writes as lists is lists."""
    if isinstance(v, (MergeStep, MergeLog)):
        return v.to_json()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


class _Record:
    """to_json / from_json for a frozen, keyword-only dataclass whose fields are JSON keys.

    Fields without a default are required.  A field with a default (None, or () for a list)
    left at that default is absent from the JSON; a key present in the JSON with exactly that
    value (an explicit null, an empty ``steps`` list) goes to ``extra``, so it round-trips too."""

    _KIND = "record"

    def to_json(self) -> dict:
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "extra":
                continue
            v = getattr(self, f.name)
            required = _required(f)
            if required or v != _default(f):
                out[f.name] = _plain(v)
        out.update(_plain(self.extra))
        return out

    @classmethod
    def _convert(cls, name: str, v: Any) -> Any:
        return _frozen(v)

    @classmethod
    def from_json(cls, d: dict):
        if not isinstance(d, dict):
            raise ValueError(f"a {cls._KIND} must be a JSON object, not {type(d).__name__}")
        known, extra = {}, {}
        names = set()
        for f in fields(cls):
            if f.name == "extra":
                continue
            names.add(f.name)
            required = _required(f)
            if f.name not in d:
                if required:
                    raise ValueError(f"{cls._KIND} lacks '{f.name}'")
                continue
            v = cls._convert(f.name, d[f.name])
            if not required and v == _default(f):
                extra[f.name] = d[f.name]  # written explicitly with the default: keep it as written
            else:
                known[f.name] = v
        extra.update({k: v for k, v in d.items() if k not in names})
        rec = cls(**known, extra=extra)
        rec._check()
        return rec

    def _check(self) -> None:
        pass


def _required(f) -> bool:
    return f.default is _MISSING and f.default_factory is _MISSING


def _default(f) -> Any:
    return f.default_factory() if f.default_factory is not _MISSING else f.default


def _int(rec, name: str) -> None:
    v = getattr(rec, name)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
        raise ValueError(f"{rec._KIND} field '{name}' must be an integer, not {v!r}")


@dataclass(frozen=True, kw_only=True)
class MergeStep(_Record):
    """One step of a merge trajectory, as logged: the state after merging the ``k``-th layer away.

    Every step has ``k``, ``action`` ('fuse', 'remove' or, sleb-attn, 'remove-attention'),
    ``calib_kl`` and ``method``; the rest
    depend on the action and the method (see mka.methods) and on where the step was recorded
    (``elapsed_s`` from the trajectory, ``chosen_from`` from the auto method, ``heldout`` and
    ``layers`` from merging.merge)."""

    _KIND = "merge step"

    k: int
    action: str  # "fuse" | "remove" | "remove-attention"
    position: int | None = None  # fuse: index of the lower layer of the pair
    pair_sources: tuple[tuple[int, ...], ...] | None = None  # fuse: original layers in each of the pair
    alpha: float | None = None  # fuse: weight on the lower layer
    similarity: float | None = None  # fuse: NMI of the pair
    calib_kl: float
    composition: tuple | None = None  # trajectories only (merge_log.json has ``layers``)
    method: str
    edge: tuple[int, int] | None = None  # mka-oneshot: the similarity edge taken
    adjacent_similarity: tuple[float, ...] | None = None  # mka: NMI of every adjacent pair
    shortlist: dict | None = None  # mka-guided: {position: [calib KL, alpha]}; sleb-fast: {position: calib KL}
    removed_now: tuple[int, ...] | None = None  # sleb: the original layers removed at this step
    removed: tuple[int, ...] | None = None  # removal: all original layers removed so far
    unit: str | None = None  # sleb-attn: "attention" (the layer's attention sub-block) or "layer" (whole)
    layer: int | None = None  # sleb-attn: the original layer whose unit was removed at this step
    attn_removed: tuple[int, ...] | None = None  # sleb-attn: original layers kept without attention so far
    bytes_saved: int | None = None  # sleb-attn: reference bytes saved so far (F16 weights + f16 KV cache)
    ref_context: int | None = None  # sleb-attn: the context of those KV cache bytes
    block_influence: tuple[float, ...] | None = None  # shortgpt
    angular_distance: float | None = None  # angular
    elapsed_s: float | None = None  # trajectory wall time up to this step
    chosen_from: dict | None = None  # auto: {method: calib KL} at this K
    heldout: dict | None = None  # held-out quality after the step ({} when skipped)
    layers: tuple[dict, ...] | None = None  # layer map after the step
    extra: dict = field(default_factory=dict)  # keys not above, kept as read

    @classmethod
    def _convert(cls, name: str, v: Any) -> Any:
        if name == "composition":  # [{layer: weight}], keys ints or (from JSON) strings: as given
            return tuple(v) if isinstance(v, list) else v
        return _frozen(v)

    def _check(self) -> None:
        _int(self, "k")
        _int(self, "layer")
        if self.action == "remove-attention" and self.layer is None:
            raise ValueError(f"remove-attention step {self.k} lacks its layer")
        if self.action == "fuse" and (self.pair_sources is None or len(self.pair_sources) != 2 or self.alpha is None):
            raise ValueError(f"fuse step {self.k} lacks its pair_sources or alpha")

    def describe(self) -> str:
        """What the step did, in a few words: 'fuse [3]+[4] alpha 0.50' or 'remove [5]'."""
        if self.action == "fuse":
            a, b = (list(s) for s in self.pair_sources)
            return f"fuse {a}+{b} alpha {self.alpha:.2f}"
        if self.action == "remove-attention":
            return f"remove attention [{self.layer}]"
        gone = self.removed_now if self.removed_now is not None else self.removed
        return f"remove {list(gone) if gone is not None else None}"


@dataclass(frozen=True, kw_only=True)
class MergeLog(_Record):
    """The top level of ``merge_log.json``.  A healed folder's log is its merge's log with
    ``heal`` added; a model healed without a merge gets one with only the required fields
    (``merge_layers`` 0) and ``heal``."""

    _KIND = "merge log"

    mka_edge: str  # version that wrote it
    source: dict  # the source model (LoadedModel.source: spec, kind, path, model_dir, ...)
    source_fingerprint: str
    method: str | None = None  # merge method asked for ("auto" included)
    alpha_rule: str | None = None
    alpha_rule_means: str | None = None
    merge_layers: int  # K
    layers_before: int
    layers_after: int | None = None
    calibration: dict | None = None
    settings: dict | None = None
    device: str | None = None
    trajectory_cached: bool | None = None
    trajectory_seconds: float | None = None
    layer_map: tuple[dict, ...] | None = None  # [{"layer", "sources", "weights"}] of the merged stack
    # layers of the merged stack (its numbering, as the config's mka_edge_attention_removed) that
    # run without attention (sleb-attn); absent from the file when none, so older logs read the same
    attention_removed: tuple[int, ...] = ()
    steps: tuple[MergeStep, ...] = ()
    timings: dict | None = None
    heal: dict | None = None  # added by heal (heal_log.json less losses and curve)
    extra: dict = field(default_factory=dict)  # keys not above, kept as read

    @classmethod
    def _convert(cls, name: str, v: Any) -> Any:
        if name == "steps":
            if not isinstance(v, list):
                raise ValueError("merge log field 'steps' must be a list")
            return tuple(MergeStep.from_json(s) for s in v)
        return _frozen(v)

    def _check(self) -> None:
        _int(self, "merge_layers")
        _int(self, "layers_before")
        if not isinstance(self.source, dict):
            raise ValueError("merge log field 'source' must be an object")
        if self.layer_map is not None and not all(isinstance(e, dict) and "sources" in e for e in self.layer_map):
            raise ValueError("merge log field 'layer_map' must list objects with 'sources'")
        if not isinstance(self.attention_removed, tuple) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in self.attention_removed
        ):
            raise ValueError("merge log field 'attention_removed' must list layer indices")

    def source_spec(self) -> str | None:
        """How the source model was named (recipe, hub id, path), else its path, else None."""
        return self.source.get("spec") or self.source.get("path")


def read_merge_log(folder: str | Path | None) -> MergeLog | None:
    """The merge log in ``folder``; None when there is no folder or it has no merge_log.json.
    A file that is not a merge log is a UserError naming it."""
    if not folder:
        return None
    path = Path(folder) / FILE
    if not path.is_file():
        return None
    try:
        return MergeLog.from_json(json.loads(path.read_text()))
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError) as exc:
        why = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise UserError(f"{path} is not a valid merge log ({why}); re-run the merge that wrote it") from None


def write_merge_log(log: MergeLog, folder: str | Path) -> Path:
    """Write ``log`` as ``folder``/merge_log.json (the caller handles atomicity)."""
    path = Path(folder) / FILE
    path.write_text(json.dumps(log.to_json(), indent=2))
    return path


def identity_layer_map(n_layers: int) -> list[dict]:
    return [{"layer": i, "sources": [i], "weights": [1.0]} for i in range(n_layers)]


def provenance(lm, log: MergeLog | None) -> dict:
    """The facts both exporters record about where a model came from (GGUF as ``mka_edge.*``
    metadata, ONNX in mka_edge.json and the model's metadata): from ``log`` when the model is a
    merge (or a heal), else from the loaded model itself (no merge: K 0, identity layer map)."""

    source = (log.source if log is not None else None) or lm.source
    return {
        "mka_edge": __version__,
        "method": str(log.method if log is not None and log.method is not None else "none"),
        "merge_layers": int(log.merge_layers if log is not None else 0),
        "layers_before": int(log.layers_before if log is not None else lm.num_layers),
        "layers": int(lm.num_layers),
        "layer_map": _plain(log.layer_map) if log is not None and log.layer_map else identity_layer_map(lm.num_layers),
        # a hub model's commit pins its files: "owner/name@commit", whether named by id or by a recipe
        # (a recipe's path is where it lies on one machine, not what the weights are)
        "source": str(source.get("hub_id") or source.get("spec", ""))
        + (f"@{source['revision']}" if source.get("revision") else ""),
        "source_sha256": str(log.source_fingerprint if log is not None else lm.fingerprint),
    }
