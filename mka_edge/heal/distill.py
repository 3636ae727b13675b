"""`mka-edge heal`: distil the merged model from the original on calibration text.

Loss: KL(reference || student) per position, averaged — the same quantity every quality figure
in mka-edge reports, so the heal optimises what is measured (on calibration windows; the
held-out text is never trained on).  Checkpoints (trainable tensors as safetensors, optimizer
state loaded with ``weights_only=True``, step and losses) are written to the cache every
``checkpoint_every`` steps, keyed by the settings, the model and the reference (not by --out: a
build heals into its temporary folder, which a killed build loses); a rerun with the same
settings resumes from the last one, and the data order is fixed by the seed, so a resumed heal
ends where an uninterrupted one would.
"""

from __future__ import annotations

import json
import shutil
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .. import __version__
from ..cache import atomic_dir, cache_root, entry_lock, stable_hash
from ..calibration import calibration_batch, heldout_chunks
from ..device import resolve_device
from ..errors import UserError
from ..evaluation import default_reference
from ..killpoints import killpoint
from ..merge_log import MergeLog, read_merge_log
from ..merging import check_out
from ..mka.output import save_merged
from ..models.loading import load_model
from ..models.recipes import recipe_behind
from .targets import MODES, select
from .teacher import CachedTeacher, LiveTeacher


@dataclass(frozen=True)
class HealConfig:
    steps: int
    train: str = "all"
    lr: float = 5e-5
    batch: int = 2
    seq_len: int = 256
    seed: int = 0
    lora_rank: int = 16
    checkpoint_every: int = 10
    calibration: str | None = None
    heldout_chunks: int = 2
    eval_every: int = 0  # also measure held-out quality every N steps (a quality-vs-steps curve)

    def check(self) -> None:
        if self.steps < 0:
            raise UserError(f"--steps must be 0 or more (got {self.steps})")
        if self.train not in MODES:
            raise UserError(f"unknown --train '{self.train}'; choose one of {', '.join(MODES)}")
        if self.batch < 1 or self.seq_len < 8 or self.lr <= 0 or self.checkpoint_every < 1 or self.heldout_chunks < 1:
            raise UserError(
                "--batch, --checkpoint-every and --heldout-chunks must be >= 1, --seq-len >= 8 and --lr > 0"
            )


def _pair_facts(lm) -> tuple[int, int, int]:
    """What a student and its teacher must share: vocabulary (config and tokenizer) and width."""
    return int(lm.model.config.vocab_size), len(lm.tokenizer), int(lm.model.config.hidden_size)


def _check_pair(student, ref_facts: tuple[int, int, int]) -> None:
    (sv, st, sh), (rv, rt, rh) = _pair_facts(student), ref_facts
    if sv != rv or st != rt:
        raise UserError(
            f"the reference's vocabulary ({rv} tokens) differs from the model's ({sv}); "
            f"heal against the model this one was merged from (--reference)"
        )
    if sh != rh:
        raise UserError(
            f"the reference's hidden size ({rh}) differs from the model's ({sh}); "
            f"heal against the model this one was merged from (--reference)"
        )


def _windows(tokenizer, cfg: HealConfig) -> torch.Tensor:

    need = cfg.steps * cfg.batch
    try:
        ids, _ = calibration_batch(tokenizer, cfg.calibration, need, cfg.seq_len, cfg.seed)
    except UserError as exc:
        raise UserError(
            f"{cfg.steps} steps x {cfg.batch} windows of {cfg.seq_len} tokens need {need} distinct "
            f"calibration windows, but {str(exc).split(';')[0].replace('calibration text has', 'the text has')}; "
            f"lower --steps, --batch or --seq-len, or give more text with --calibration"
        ) from None
    return ids


def recipe_heal_defaults(model_spec: str | None) -> dict:
    """The ``heal:`` defaults of the recipe behind ``model_spec`` (for a merged folder: the recipe
    its merge_log names as source), without loading weights; {} when there is none.  Why here and
    not after loading: the heal settings key checkpoints and caches before any model is read."""

    return dict(recipe_behind(model_spec).get("heal") or {})


def heal_config(values: dict, given: set[str], model_spec: str | None) -> HealConfig:
    """The heal settings, one precedence rule: a value the user gave (``given`` names them) wins,
    else the recipe's ``heal:`` default (steps, train, lr, lora_rank), else the value passed in
    (the option's default).  Checked before any model work."""
    values = dict(values)
    for key, default in recipe_heal_defaults(model_spec).items():
        if key not in given and key in values:
            values[key] = default
    values["lr"] = float(values["lr"])
    cfg = HealConfig(**values)
    cfg.check()
    return cfg


def effective_heal(cfg: HealConfig | None, profile) -> HealConfig | None:
    """The heal a plan or build runs: the one asked for (or the recipe's), else the profile's
    ``heal_steps``, else none."""

    if (cfg is None or cfg.steps == 0) and profile.heal_steps:
        cfg = replace(cfg or HealConfig(steps=0), steps=profile.heal_steps)
    return cfg if cfg is not None and cfg.steps > 0 else None


class Checkpoint:
    """Trainable tensors + optimizer state + progress, in the cache under the heal's key.  Why the
    cache and not beside --out: the key (settings, model, reference) is what makes a checkpoint
    valid, and --out can be a temporary folder (a build's) that a killed run loses.  Each save
    replaces the folder whole (``cache.atomic_dir``), under the entry's lock, so a reader or a
    SIGKILL never sees a step's tensors with another step's optimizer state."""

    def __init__(self, key: str):
        self.dir = cache_root() / "heal-checkpoints" / key
        self.key = key

    def load(self, model, opt) -> tuple[int, list[float]]:
        with entry_lock(self.dir, "a heal checkpoint"):
            meta_path = self.dir / "meta.json"
            if not meta_path.is_file():
                return 0, []
            meta = json.loads(meta_path.read_text())
            if meta.get("key") != self.key:
                return 0, []  # not this heal's: start over (the first save replaces it)
            state = load_file(str(self.dir / "trainable.safetensors"))
            params = dict(model.named_parameters())
            with torch.no_grad():
                for name, tensor in state.items():
                    params[name].copy_(tensor.to(params[name].device))
            opt.load_state_dict(torch.load(self.dir / "optimizer.pt", map_location="cpu", weights_only=True))
        return int(meta["step"]), list(meta["losses"])

    def save(self, model, opt, step: int, losses: list[float]) -> None:
        with entry_lock(self.dir, "a heal checkpoint"), atomic_dir(self.dir) as tmp:
            try:
                save_file(
                    {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad},
                    str(tmp / "trainable.safetensors"),
                )
                torch.save(opt.state_dict(), tmp / "optimizer.pt")
            except RuntimeError as exc:  # torch's and safetensors' writers fail without an OSError
                raise _write_failed(tmp, exc) from None
            (tmp / "meta.json").write_text(json.dumps({"key": self.key, "step": step, "losses": losses}))

    def remove(self) -> None:
        with entry_lock(self.dir, "a heal checkpoint"):
            shutil.rmtree(self.dir, ignore_errors=True)


def _write_failed(folder: Path, exc: Exception) -> Exception:
    """A checkpoint write that failed: ENOSPC (the CLI's one line) when the disk is nearly full,
    else one line naming the folder."""
    import errno

    try:
        full = shutil.disk_usage(folder).free < 256 * 2**20
    except OSError:
        full = False
    if full:
        return OSError(errno.ENOSPC, f"No space left on device (writing the heal checkpoint in {folder.parent})")
    first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return UserError(f"cannot write the heal checkpoint in {folder.parent} ({first}); check that the cache is writable")


def teacher_from(lm):
    """``lm``, an already loaded source, as the heal's teacher as loaded, whatever its dtype: the
    teacher is frozen and only gives logits (compared in float32 by the loss), so a 16-bit build's
    source teaches in 16 bits instead of a second, float32 copy beside it.  Not when --max-memory
    spread it over the disk: every step would read the offloaded weights back (None: heal loads
    its own)."""
    return None if getattr(lm, "offloaded", False) else lm


def student_dtype(cfg: HealConfig, teacher, device: torch.device | None = None) -> torch.dtype:
    """The dtype the student is loaded in.  LoRA trains float32 adapters (peft keeps an adapter in
    float32 over a 16-bit base) on a frozen base, so the base stays in the teacher's dtype: 16 bits
    on a GPU or in a 16-bit CPU build, as heal/footprint.py counts a LoRA heal, merged back into
    those 16 bits at the end; with no teacher handed in, bf16 on a GPU (QLoRA's NF4 base
    dequantizes to it) and float32 on a CPU.  A full-parameter or changed-layers heal updates the
    weights themselves with AdamW, whose small steps vanish in bf16's 8-bit mantissa, so its
    student is float32 (footprint.py prices a 16-bit student plus a float32 master copy: more
    than a LoRA heal either way; the healed model is saved in the teacher's dtype, see ``heal``)."""
    if cfg.train in ("lora", "qlora"):
        if teacher is not None:
            return next(teacher.model.parameters()).dtype
        return teacher_dtype(device)
    return torch.float32


def teacher_dtype(device: torch.device | None) -> torch.dtype:
    """The dtype a heal loads its own teacher in: frozen, it only gives logits, so 16 bits on a GPU
    (what footprint.py counts; float32 would double an 8B teacher to 32 GB) and float32 on a CPU."""
    if device is None or device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _free() -> None:
    """Collect what the caller has dropped and return it from the GPU allocator as well."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextmanager
def _parked(lm, log: Callable[[str], None]):
    """``lm`` (a build's source, on one GPU) moved to host memory while the block runs, then back:
    a QLoRA heal inside a build, whose teacher is already reduced to cached targets, would
    otherwise share the GPU with 16 GB of an 8B model's weights.  A few seconds of PCIe each way.
    Left where it is when it is on the CPU, spread by --max-memory over several devices (one
    ``.to`` would undo accelerate's placement), or when the host lacks the RAM to hold it."""
    if lm is None or lm.device_map is not None or lm.offloaded:
        yield
        return
    device = next(lm.model.parameters()).device
    need = sum(t.numel() * t.element_size() for t in lm.model.state_dict().values())
    if device.type == "cpu" or need > 0.9 * psutil.virtual_memory().available:
        if device.type != "cpu":
            log(f"      the source ({need / 2**30:.1f} GiB) stays on {device}: host RAM is short for parking it")
        yield
        return
    lm.model.to("cpu")
    _free()
    try:
        yield
    except BaseException as exc:
        # the failed heal's frames (its student, its optimizer) go before the source returns
        traceback.clear_frames(exc.__traceback__)
        raise
    finally:
        _free()
        lm.model.to(device)


def _cached_teacher(cfg: HealConfig, ref_spec: str, reference_model, dev, progress: bool):
    """A QLoRA heal's teacher: its top-k targets from the cache (one pass of the teacher when
    absent), then the teacher leaves memory if this heal loaded it.  Returns the targets, the
    training windows and what the student must share with the teacher."""
    ref = reference_model if reference_model is not None else load_model(ref_spec, dev, teacher_dtype(dev))
    windows = _windows(ref.tokenizer, cfg) if cfg.steps else torch.zeros((0, cfg.seq_len), dtype=torch.long)
    teacher = CachedTeacher(ref, windows, cfg.heldout_chunks, progress=progress)
    facts = _pair_facts(ref)
    del ref
    _free()  # a teacher this heal loaded is gone before the student loads
    return teacher, windows, facts


def _merge_into_sixteen_bits(adapters: dict, model_spec: str, dev, dtype, cfg: HealConfig, merge_log):
    """QLoRA ``adapters`` (peft's state dict of the trained model, whose NF4 base the caller has
    dropped) merged into the merged folder's own 16-bit (or float32) weights, reloaded: the NF4
    rounding of the base stays out of the exported model."""
    from peft import set_peft_model_state_dict

    _free()
    base = load_model(model_spec, dev, dtype)
    again, _ = select(
        base.model,
        "lora",
        merge_log.layer_map if merge_log else None,
        cfg.lora_rank,
        merge_log.layers_before if merge_log else None,
    )
    loaded = set_peft_model_state_dict(again, adapters)
    if getattr(loaded, "unexpected_keys", None):
        raise RuntimeError(f"adapters that match no module: {loaded.unexpected_keys[:3]}")
    return again.merge_and_unload()


def heal(
    model_spec: str,
    out: str | Path,
    cfg: HealConfig,
    reference: str | None = None,
    device: str = "auto",
    progress: bool = True,
    log: Callable[[str], None] = print,
    on_step: Callable[[int, float], None] | None = None,
    reference_model=None,
) -> dict:
    """Heal ``model_spec`` (a merged folder) into ``out``; returns the heal log (also in heal_log.json).

    ``reference_model``: the reference already loaded (a LoadedModel on the heal's device, in
    any dtype, used read-only), so a caller healing many merges of one model loads it once; a
    LoRA student is then loaded in its dtype (``student_dtype``)."""

    cfg.check()
    out = Path(out)
    check_out(out)
    dev = resolve_device(device)
    ref_spec = reference or default_reference(model_spec)
    if not ref_spec:
        raise UserError(f"{model_spec} has no merge_log.json naming its source; pass --reference MODEL")
    dtype = student_dtype(cfg, reference_model, dev)
    if cfg.train != "qlora":
        return _heal(model_spec, out, cfg, ref_spec, dev, dtype, progress, log, on_step, reference_model)
    # the teacher's targets first, so that it never sits beside the student
    teacher = _cached_teacher(cfg, ref_spec, reference_model, dev, progress)
    with _parked(reference_model, log):
        return _heal(model_spec, out, cfg, ref_spec, dev, dtype, progress, log, on_step, reference_model, teacher)


def _heal(model_spec, out, cfg, ref_spec, dev, dtype, progress, log, on_step, reference_model, cached=None) -> dict:
    """``heal`` from the student's load on (``cached``: a QLoRA heal's teacher, targets and facts)."""
    if cached is not None:
        teacher, windows, ref_facts = cached
    student = load_model(model_spec, dev, dtype)
    if student.offloaded:  # accelerate's hooks swap offloaded weights in and out: nothing could train them
        raise UserError(
            f"--max-memory leaves part of {model_spec} offloaded, and healing trains its weights in memory; "
            f"give the devices room for the whole merged model in {str(dtype).removeprefix('torch.')}, or heal without --max-memory"
        )
    if cached is None:
        ref = reference_model if reference_model is not None else load_model(ref_spec, dev, teacher_dtype(dev))
        ref_facts = _pair_facts(ref)
        windows = _windows(student.tokenizer, cfg) if cfg.steps else None
        teacher = LiveTeacher(ref, heldout_chunks(student.tokenizer, cfg.heldout_chunks), dev)
    _check_pair(student, ref_facts)
    merge_log = read_merge_log(student.source.get("model_dir"))
    before = teacher.measure(student.model)
    log(
        f"held-out before healing: KL {before['kl']:.4f}, perplexity {before['ppl']:.2f} (reference {before['ref_ppl']:.2f})"
    )
    torch.manual_seed(cfg.seed)  # LoRA's A matrices start random: the same settings, the same heal
    model, what = select(
        student.model,
        cfg.train,
        merge_log.layer_map if merge_log else None,
        cfg.lora_rank,
        merge_log.layers_before if merge_log else None,
    )
    n_layers = student.num_layers
    student.model = None  # ``model`` is the one reference to the student now (QLoRA frees it before the merge)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)
    ckpt = Checkpoint(
        stable_hash(
            {
                "cfg": asdict(cfg),
                "model": student.fingerprint,
                "ref": teacher.fingerprint,
                "dtype": str(dtype),
                "teacher": teacher.key,
                "v": 2,
            }
        )
    )
    start, losses = ckpt.load(model, opt) if cfg.steps else (0, [])
    if start:
        log(f"resuming from the checkpoint at step {start} of {cfg.steps}")
    curve: list[dict] = [{"step": 0, **before}]
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(start, cfg.steps), desc="healing", disable=not progress, initial=start, total=cfg.steps)
    train_s, ids = 0.0, None
    for step in bar:
        t_step = time.perf_counter()
        rows = slice(step * cfg.batch, (step + 1) * cfg.batch)
        ids = windows[rows].to(dev)
        loss = teacher.loss(rows, ids, model(input_ids=ids, use_cache=False).logits)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        # the graph dies with ``loss``: bitsandbytes keeps its NF4 weights on the autograd context
        # (not save_for_backward), so a live last-step graph would hold the 4-bit base through the
        # 16-bit reload below
        del loss
        train_s += time.perf_counter() - t_step
        bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.4f}")
        done = step + 1
        if done % cfg.checkpoint_every == 0 and done < cfg.steps:
            ckpt.save(model, opt, done, losses)
        killpoint(f"heal:step-{done}")  # after the step's checkpoint, if it has one
        if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
            model.eval()
            curve.append({"step": done, **teacher.measure(model)})
            model.train()
        if on_step:
            on_step(done, losses[-1])
    bar.close()
    seconds = time.perf_counter() - t0
    model.eval()
    del opt, trainable, ids
    if cfg.train == "lora":
        model = model.merge_and_unload()
    elif cfg.train == "qlora":
        from peft import get_peft_model_state_dict

        # what the adapters give on the base they trained on, beside what they give merged into the
        # original weights (the saved model's figure, ``heldout_after``): the merge's own cost
        nf4_after = teacher.measure(model)

        adapters = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
        del model
        model = _merge_into_sixteen_bits(adapters, model_spec, dev, dtype, cfg, merge_log)
    healed = model
    for p in healed.parameters():
        p.requires_grad_(False)
    saved = next(reference_model.model.parameters()).dtype if reference_model is not None else dtype
    if saved != dtype:
        # a float32 student healed against a 16-bit build's source is saved in the build's 16 bits:
        # the build reloads it in that dtype, mapped from its file (host_need counts no RAM for it,
        # and disk_need_bytes counts its folder in those bits); the export's float GGUF rounds
        # to 16 bits anyway.  Measured after the cast: the figure is the model that is saved.
        healed = healed.to(saved)
    after = teacher.measure(healed)
    curve.append({"step": cfg.steps, **after})
    log(f"held-out after {cfg.steps} steps: KL {after['kl']:.4f}, perplexity {after['ppl']:.2f}")
    record = {
        "mka_edge": __version__,
        "model": model_spec,
        "reference": ref_spec,
        "config": asdict(cfg),
        "trained": what,
        "trainable_params": n_train,
        "device": str(dev),
        "dtype": str(dtype).removeprefix("torch."),
        "teacher": teacher.summary(),
        "steps_run_here": cfg.steps - start,
        "resumed_from": start,
        "seconds": round(seconds, 2),
        "seconds_per_step": round(train_s / max(1, cfg.steps - start), 4),
        "losses": [round(x, 6) for x in losses],
        "heldout_before": before,
        "heldout_after": after,
        **({"heldout_after_on_nf4_base": nf4_after} if cfg.train == "qlora" else {}),
        "curve": curve,
    }
    # the merge's log carried forward with the heal added (a model that was never merged gets a log of its own)
    base = merge_log or MergeLog(
        mka_edge=__version__,
        source=student.source,
        source_fingerprint=student.fingerprint,
        merge_layers=0,
        layers_before=n_layers,
    )
    new_log = replace(base, heal={k: v for k, v in record.items() if k not in ("losses", "curve")})
    # heal_log.json inside the folder before its rename: a healed folder is whole or absent
    save_merged(
        healed, student.tokenizer, new_log.to_json(), out, extra={"heal_log.json": json.dumps(record, indent=2)}
    )
    ckpt.remove()  # after the rename: a run killed before it resumes from the last checkpoint
    return record
