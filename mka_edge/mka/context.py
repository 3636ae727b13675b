"""Shared state of one merge run: the model, its original blocks, calibration data, and caches."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..calibration import calibration_batch
from ..device import check_placement, current_max_memory, main_device, parse_max_memory, resolve_device, resolve_dtype
from ..models.loading import LoadedModel, load_model
from . import activations as act
from .attention import REF_CONTEXT, stack
from .diffusion import diffusion_map
from .engine import CalibrationLoss
from .fusion import Composition, identity
from .layers import get_layers, set_layers
from .similarity import kmeans_batched, nmi_matrix
from .timing import PhaseTimer


@dataclass
class MergeSettings:
    """Everything that changes a merge decision; part of every cache key."""

    samples: int = 32  # calibration sequences for activations
    seq_len: int = 256
    positions: int = 512  # token vectors per layer for each diffusion map
    repeats: int = 8  # independent position subsamples whose NMI matrices are averaged
    loss_samples: int = 4  # of the calibration sequences, how many score candidate merges
    dims: int = 8  # diffusion-map dimensions
    clusters: int = 8  # k-means labels for the NMI
    seed: int = 0
    batch_size: int = 8
    candidates: int = 6  # mka-guided: shortlist of most similar pairs scored by loss
    alpha_grid: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    calibration: str | None = None
    # sleb-attn: the context at which a removal unit's KV cache bytes are counted.  Left out of
    # key(): it changes only the methods that choose by bytes (method_table's by_bytes), and their
    # cache keys add it (trajectory._key, quality.merge_curve), so the other methods' caches stay.
    ref_context: int = REF_CONTEXT

    def key(self) -> dict:
        d = asdict(self)
        d.pop("ref_context")
        return d


@dataclass
class Similarity:
    matrix: torch.Tensor  # [L, L] NMI, on the CPU
    embeddings: torch.Tensor  # [L, N, dims]
    labels: torch.Tensor  # [L, N]

    def adjacent(self) -> list[float]:
        return [float(self.matrix[i, i + 1]) for i in range(self.matrix.shape[0] - 1)]


class MergeContext:
    def __init__(self, lm: LoadedModel, settings: MergeSettings, device: torch.device) -> None:
        self.lm, self.settings, self.device = lm, settings, device
        self.model, self.arch = lm.model, lm.arch
        self.timer = PhaseTimer()
        self.ids, self.text_spec = calibration_batch(
            lm.tokenizer, settings.calibration, settings.samples, settings.seq_len, settings.seed
        )
        self.originals = list(get_layers(self.model, self.arch))
        self.names = self.arch.block_params(self.model.config)
        self.comp: Composition = identity(len(self.originals))
        self.attn_removed: frozenset[int] = frozenset()  # original layers running without attention
        self._engine: CalibrationLoss | None = None
        self.references: dict[int, object] = {}  # the original stack's held-out outputs by chunk count (merging)

    @property
    def n_original(self) -> int:
        return len(self.originals)

    @property
    def engine(self) -> CalibrationLoss:
        if self._engine is None:
            current, attn = self.comp, self.attn_removed  # the reference log-probs come from the original stack
            self.apply(identity(self.n_original), refresh=False)
            self._engine = CalibrationLoss(
                self.model,
                self.arch,
                self.ids[: self.settings.loss_samples],
                self.device,
                self.settings.batch_size,
                self.timer,
            )
            self.apply(current, refresh=True, attn_removed=attn)
        return self._engine

    def current_layers(self) -> list:
        return list(get_layers(self.model, self.arch))

    def stack(self, comp: Composition, attn_removed=()) -> list:
        """The blocks of ``comp``, the layers in ``attn_removed`` (original indices) without attention."""
        return stack(self.originals, comp, self.names, self.arch, attn_removed)

    def apply(self, comp: Composition, refresh: bool = True, attn_removed=()) -> None:
        """Make the working model's stack equal ``comp``, the original layers in ``attn_removed``
        running without attention (original blocks are never modified)."""
        with self.timer.phase("fusion", self.device):
            set_layers(self.model, self.arch, self.stack(comp, attn_removed))
        self.comp, self.attn_removed = comp, frozenset(int(i) for i in attn_removed)
        if refresh and self._engine is not None:
            self._engine.refresh()

    def reset(self) -> None:
        self.apply(identity(self.n_original))

    def activations(self, seed: int | None = None, repeats: int = 1, dtype=torch.float32) -> act.Activations:
        seed = self.settings.seed if seed is None else seed
        pos = act.sample_positions(*self.ids.shape, self.settings.positions * repeats, seed)
        return act.collect(
            self.model, self.arch, self.ids, pos, self.settings.batch_size, self.device, self.timer, dtype
        )

    def similarity(self, seed: int | None = None) -> Similarity:
        """NMI similarity of the current layers' diffusion embeddings (MKA steps 1-3).

        One forward pass per batch gathers ``repeats`` x ``positions`` token vectors per layer;
        each subsample of ``positions`` gets its own diffusion maps and k-means labels, and the
        NMI matrices are averaged. Why: adjacent-layer NMIs sit close together (0.75-1.0 on
        SmolLM2), and a single 512-sample estimate reorders them from seed to seed.  The k-means
        of all layers and subsamples is one batched call (``kmeans_batched``): one problem at a
        time it was most of an analyze's time on a GPU.
        """
        seed = self.settings.seed if seed is None else seed
        n, reps = self.settings.positions, self.settings.repeats
        acts = self.activations(seed, repeats=reps, dtype=torch.float16)
        layer_states = acts.states[1:].to(self.device)  # outputs of each block
        reps = max(1, min(reps, layer_states.shape[1] // n))
        n = min(n, layer_states.shape[1])  # fewer positions than asked: one subsample of them all
        n_layers = layer_states.shape[0]
        parts = layer_states[:, : reps * n].unflatten(1, (reps, n)).transpose(0, 1)  # [reps, L, n, hidden]
        with self.timer.phase("diffusion", self.device):
            emb = torch.stack([torch.stack([diffusion_map(x, self.settings.dims) for x in part]) for part in parts])
        with self.timer.phase("similarity", self.device):
            # Every layer of every subsample in one batched k-means (one seed per problem, so a
            # layer's labels do not depend on how many layers or repeats share the batch).
            seeds = [seed * 1009 + r * 31 + i for r in range(reps) for i in range(n_layers)]
            labels = kmeans_batched(emb.flatten(0, 1), self.settings.clusters, seeds).view(reps, n_layers, -1)
            s = torch.stack([nmi_matrix(lab, self.settings.clusters) for lab in labels]).mean(0)
        return Similarity(matrix=s.cpu(), embeddings=emb[0].cpu(), labels=labels[0].cpu())


def build_context(
    model=None,
    device="auto",
    dtype="auto",
    calibration=None,
    samples=None,
    seq_len=None,
    positions=None,
    repeats=8,
    seed=0,
    trust_remote_code=False,
    max_memory=None,
    **extra,
) -> MergeContext:
    """Load a model and its calibration batch; recipe calibration defaults fill what is not given.

    ``max_memory`` (accelerate's caps, or --max-memory's text; default: the process's --max-memory)
    places the model over the GPUs and CPU it names and the disk; the work then runs on its main
    device (the first GPU named, else the CPU)."""

    caps = parse_max_memory(max_memory) if max_memory is not None else current_max_memory()
    dev = resolve_device(device)  # refuses --device cuda without a GPU, with or without a cap
    check_placement(device, caps)
    dev = main_device(caps) if caps else dev
    lm = load_model(model, dev, resolve_dtype(dtype, dev), trust_remote_code=trust_remote_code, max_memory=caps)
    cal = lm.recipe.get("calibration", {}) if lm.recipe else {}
    settings = MergeSettings(
        samples=samples or cal.get("samples", 32),
        seq_len=seq_len or cal.get("seq_len", 256),
        positions=positions or cal.get("positions", 512),
        repeats=repeats,
        seed=seed,
        calibration=str(calibration) if calibration else None,
        **extra,
    )
    return MergeContext(lm, settings, dev)
