"""What a build needs of the host that runs it (not of the device it targets): RAM, GPU memory and
disk, from the model's parameter count (a meta-device model: no weight read), the device and
dtype the build computes in, and accelerate's --max-memory cap.  One rule serves the check that
refuses a too-small host before any weight loads and the table in docs/build-host.md, so the two
cannot disagree.

The terms, as the code holds memory today (issue 23 measures them; a term the code stops paying
leaves this table with it):

* the loaded model: parameters x the compute dtype's bytes (float32 on a CPU unless --dtype says
  otherwise or the float32 copy would not fit this host: then the checkpoint's own 16-bit type;
  bfloat16 on CUDA).  A 16-bit checkpoint widened to float32 is converted tensor by
  tensor (models/loading.py), which peaked at 1.23x the float32 bytes for a 1B model: x1.25.
* a merged model (K > 0), reloaded from the folder the build saved, in the dtype it was saved in,
  while the source stays loaded as the validation's reference: torch maps the safetensors file
  (file-backed pages the kernel drops and reads again under pressure; measured: the loaded weights
  show in RssFile, not RssAnon), so it adds no RAM need, and the export (which touches the merged
  pages) and the validation's reference (which touches the source's) never run at once.  (GGUF
  targets; onnxruntime-genai's builder, a child process, loads the folder into its own memory:
  not counted yet.)  Through
  accelerate's offload (a cap) the reload is placed by the cap: x (layers - K) / layers of the
  model's bytes, at most the CPU cap.
* a flat allowance for the interpreter, tokenizers and the llama.cpp children's compute buffers
  (their weights are memory-mapped files, pages the kernel can drop).

With a cap (--max-memory), what does not fit the caps goes to the disk (accelerate's offload
folder): RAM holds at most the CPU cap, each GPU at most its cap."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import UserError

MIB = 2**20
GIB = 2**30
ALLOWANCE = 1.5 * GIB  # interpreter, torch, tokenizers, llama.cpp children's compute buffers
WIDEN_PEAK = 1.25  # a 16-bit checkpoint loaded as float32, tensor by tensor (models/loading.py)


@dataclass(frozen=True)
class HostNeed:
    """Bytes a build needs at its peak: RAM, GPU memory (0 on a CPU build), disk beside the cache."""

    ram: float
    gpu: float
    disk: float
    terms: dict[str, float]


def host_need(
    n_params: float,
    *,
    stored_bytes: int = 2,
    device: str = "cpu",
    dtype_bytes: int | None = None,
    max_memory: dict | None = None,
    merged_fraction: float = 0.0,
) -> HostNeed:
    """The rule.  ``stored_bytes``: bytes per weight of the checkpoint (2 for bf16/f16 safetensors);
    ``dtype_bytes``: of the compute dtype (default: 4 on a CPU, 2 on CUDA); ``merged_fraction``:
    (layers - K) / layers of a merged model the build reloads (0: nothing merged)."""
    gpu_build = device.startswith("cuda")
    d = dtype_bytes or (2 if gpu_build else 4)
    model = n_params * d
    load = model * (WIDEN_PEAK if d > stored_bytes else 1.0)
    merged = 0.0  # reloaded as saved: mapped from its file, no RAM of its own (module docstring)
    cpu_cap = gpu_cap = None
    if max_memory:
        cpu_cap = float(max_memory.get("cpu", 0))
        gpu_cap = float(sum(v for k, v in max_memory.items() if k != "cpu"))
        merged = min(n_params * d * merged_fraction, cpu_cap)  # placed by accelerate under the same cap
    if gpu_build or (gpu_cap or 0) > 0:
        on_gpu = min(model, gpu_cap) if gpu_cap is not None else model
        gpu = 1.1 * on_gpu  # activations and the similarity's states
        ram_model = model if max_memory is None else min(model - on_gpu, cpu_cap or 0.0)
        # from_pretrained reads the checkpoint on the CPU before it is moved: one 16-bit copy
        ram_load = max(ram_model, n_params * min(d, stored_bytes) if max_memory is None else 0.0)
    else:
        gpu = 0.0
        ram_load = load if cpu_cap is None else min(load, cpu_cap)
    offloaded = max(0.0, model - (cpu_cap or 0) - (gpu_cap or 0)) if max_memory else 0.0
    ram = ram_load + merged + ALLOWANCE
    disk = (
        n_params * stored_bytes  # the download (a hub model) or the dequantized source
        + n_params * 2  # the 16-bit GGUF intermediate the quantizer reads
        + n_params * 1.1  # the artifact, at most Q8_0's 8.5 bits per weight
        + n_params * d * merged_fraction  # the merged folder, saved in the build's dtype
        + offloaded
    )
    terms = {"model": model, "load_peak": ram_load, "merged": merged, "allowance": ALLOWANCE, "offloaded": offloaded}
    return HostNeed(ram, gpu, disk, terms)


def available_ram() -> float:
    """MemAvailable of /proc/meminfo in bytes (what a process can take without swapping); inf where unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024.0
    except OSError:
        pass
    return float("inf")


def available_gpu() -> float:
    """Free memory of the first CUDA device in bytes (0 without one)."""
    if not torch.cuda.is_available():
        return 0.0
    free, _ = torch.cuda.mem_get_info()
    return float(free)


def check_host_memory(need: HostNeed, *, what: str, capped: bool) -> None:
    """Refuse, in one line with the need and the way out, a host whose RAM or GPU cannot hold
    ``need``; ``what`` says which stage (the plan's load, a merged build)."""
    ram = available_ram()
    if need.ram > ram:
        hint = (
            "lower the --max-memory caps (the rest goes to the disk)"
            if capped
            else "pass --max-memory cpu=<GB> to offload the rest to the disk (slower), or build on a larger machine"
        )
        raise UserError(
            f"this host has {ram / GIB:.1f} GiB of RAM available and {what} needs about {need.ram / GIB:.1f} GiB "
            f"({need.terms['model'] / GIB:.1f} GiB of weights in the build's dtype); {hint}"
        )
    if need.gpu > 0:
        gpu = available_gpu()
        if need.gpu > gpu:
            raise UserError(
                f"the GPU has {gpu / GIB:.1f} GiB free and {what} needs about {need.gpu / GIB:.1f} GiB; "
                "pass --max-memory 0=<GB>,cpu=<GB> to keep part of the model off it, or --device cpu"
            )


DOC_SIZES = {"1B (Llama-3.2-1B, 1.24B)": 1.236e9, "8B (Llama-3-8B, 8.03B)": 8.03e9, "70B (Llama-3-70B, 70.6B)": 70.55e9}
# (device, compute bytes per weight, label): a CPU build in float32, or in the checkpoint's 16-bit
# type where float32 does not fit (check_load), and a GPU build in bfloat16
BUILDS = (("cpu", 4, "cpu, float32"), ("cpu", 2, "cpu, 16-bit"), ("cuda", 2, "cuda"))
DOC_CAPS = {"none": None, "cpu=16GB": {"cpu": 16e9}, "0=20GB,cpu=16GB": {0: 20e9, "cpu": 16e9}}


def need_table(sizes: dict[str, float], caps: dict[str, dict | None]) -> list[dict]:
    """The docs' table: for each model size (parameters) and cap, RAM, GPU and disk, unmerged and
    with a third of the layers merged."""
    rows = []
    for label, params in sizes.items():
        for device, dtype_bytes, dev_label in BUILDS:
            for cap_label, cap in caps.items():
                names_gpu = cap is not None and any(k != "cpu" for k in cap)
                if cap is not None and names_gpu != (device == "cuda"):
                    continue  # a cap naming a GPU is a GPU build, one naming only the CPU a CPU build
                if cap is not None and device == "cpu" and dtype_bytes == 2:
                    continue  # --dtype auto computes in 16 bits on the CPU only uncapped
                for frac, merged in ((0.0, "K=0"), (2 / 3, "K=n/3")):
                    n = host_need(params, device=device, dtype_bytes=dtype_bytes, max_memory=cap, merged_fraction=frac)
                    rows.append(
                        {
                            "model": label,
                            "device": dev_label,
                            "cap": cap_label,
                            "merge": merged,
                            "ram_gib": round(n.ram / GIB, 1),
                            "gpu_gib": round(n.gpu / GIB, 1),
                            "disk_gib": round(n.disk / GIB, 1),
                        }
                    )
    return rows


def check_load(ms, device: str = "auto", dtype: str = "auto", max_memory: str | None = None) -> torch.dtype:
    """Before any weight loads: the plan's load of ``ms`` (solver.feasibility.ModelShape, from a
    meta-device model) on ``device``, in ``dtype`` and under the cap (``max_memory``, else the
    process's --max-memory), against this host's free RAM and GPU memory.  Returns the dtype the build computes in:
    with --dtype auto on the CPU, float32 where its copy fits this host, else the checkpoint's own
    16-bit type (an 8B model on a 24 GB host: 16 GB of bf16 instead of 32 GB of float32)."""
    from .device import current_max_memory, main_device, parse_max_memory, resolve_device, resolve_dtype
    from .models.loading import storage_dtype

    caps = parse_max_memory(max_memory) if max_memory is not None else current_max_memory()
    dev = main_device(caps) if caps else resolve_device(device or "auto")
    name = dtype or "auto"
    stored = storage_dtype(ms.config)
    n_params = sum(ms.block_params) + ms.other_params

    def need_in(dtype: torch.dtype) -> HostNeed:
        return host_need(
            n_params, stored_bytes=stored.itemsize, device=dev.type, dtype_bytes=dtype.itemsize, max_memory=caps
        )

    dtype = resolve_dtype(name, dev)
    if (
        name == "auto"
        and dev.type == "cpu"
        and not caps
        and stored.itemsize == 2
        and need_in(dtype).ram > available_ram()
    ):
        dtype = resolve_dtype(name, dev, sixteen_bit=stored)  # fits, or is refused with the least need
    check_host_memory(need_in(dtype), what=f"loading the model ({n_params / 1e9:.2f}B parameters)", capped=bool(caps))
    return dtype


def markdown_table() -> str:
    """docs/build-host.md's table (``python -m mka_edge.host_need``)."""
    rows = need_table(DOC_SIZES, DOC_CAPS)
    out = [
        "| model | build device | --max-memory | RAM, K=0 | RAM, K=n/3 | GPU | disk, K=0 | disk, K=n/3 |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for a, b in zip(rows[::2], rows[1::2]):
        gpu = f"{a['gpu_gib']} GiB" if a["gpu_gib"] else "-"
        out.append(
            f"| {a['model']} | {a['device']} | {a['cap']} | {a['ram_gib']} GiB | {b['ram_gib']} GiB | {gpu} | "
            f"{a['disk_gib']} GiB | {b['disk_gib']} GiB |"
        )
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown_table())
