#!/usr/bin/env python3
"""PyTorch GPU baseline for fastdet's per-tile benchmark (fp16, cuDNN, torch.compile).

Times the forward pass of the two reference detectors on one [B, 1, Z, Y, X] tile,
in eval mode under torch.inference_mode, with random weights. The models are the
ones of tools/bench_torch_cpu.py (the same module trees as
/work/shared/reference/models.py, imported from there, not copied):
  segresnetv2: SegResNetDet(init_filters=32, mid=48, omid=16)
  dynunet:     DynUNetDet(filters=[32, 64, 128, 256, 320, 320], out_channels=64, mid=48, omid=16)
both with the stride-2 detection head.

On CUDA: fp16 (model.half()), torch.backends.cudnn.benchmark = True, model and
input in torch.channels_last_3d. On CPU (--device cpu, to test the flow on a
machine without a GPU): fp32, contiguous layout, no memory statistics.

Modes (--modes):
  eager    the nn.Module as is.
  compile  torch.compile(model, mode="max-autotune", dynamic=False); if that
           raises, or its first (compiling) call at a batch size takes longer
           than --compile-timeout seconds, dynamo is reset and the default mode
           torch.compile(model, dynamic=False) is used from then on
           (--compile-mode auto, the default). --compile-mode default uses the
           default mode alone (on an H200, 2026-12-04, max-autotune had not
           finished either network after 90-120 s), --compile-mode
           max-autotune max-autotune alone. The mode
           used and the compile time (the first call at each batch size, failed
           attempts included) are recorded. Every batch size compiles its own
           graph (dynamic=False).

Timing, per (arch, mode, batch): --warmup untimed calls, then --repeats timed
calls, each one bracketed by CUDA events (torch.cuda.Event(enable_timing=True))
and synchronised before the next call starts (so this is the latency of one call,
kernel launches included); on CPU time.perf_counter. The median, min and max per
call are divided by the batch to give ms per tile. The output stays on the device
(fastdet's `bench` also copies its scores back to the host: a few MB per tile).
Peak GPU memory: torch.cuda.max_memory_allocated over the warm-up and timed
calls (reset_peak_memory_stats after the compile; weights and input included).

FLOPs: 2 x the multiply-adds of every Conv3d / ConvTranspose3d call that the
eager forward executes for one tile (bench_torch_cpu's forward-hook counter).
PyTorch runs decoder levels that fastdet prunes, so TFLOP/s here is "executed
work / time"; compare ms per tile against fastdet, not TFLOP/s.

MONAI: if `import monai` fails and --monai-wheel PATH (or $FASTDET_MONAI_WHEEL)
is given, the wheel is installed with `pip install --no-deps --target TMPDIR`
(or unpacked, if pip is unavailable: it is a pure-Python wheel) and TMPDIR is put
on sys.path. MONAI's wheel sits in ../shared/wheels/ beside the repository;
tools/device-check.sh carries a copy as .cache/wheels/monai-1.6.1-py3-none-any.whl.

Usage:
  python tools/bench_torch.py [--device cuda|cuda:N|cpu] [--tile 192,128,128]
                              [--batches 1,2,4] [--modes eager,compile]
                              [--arch segresnetv2,dynunet] [--warmup 5] [--repeats 20]
                              [--compile-timeout 120] [--compile-mode auto] [--budget SECONDS]
                              [--monai-wheel PATH] [--threads N] [--json PATH] [--profile]

--budget S: stop starting new (arch, mode, batch) cases once S seconds have
passed (the ones not run are listed under "skipped" and "complete" is false);
the JSON file is rewritten after every case, so it holds the results so far even
if the process is killed.

Human-readable lines go to stdout. --json PATH writes one JSON object:
  {"card", "device", "dtype", "memory_format", "torch_version", "cudnn_version",
   "monai_version", "fp16_matmul_tflops" (cuda only), "tile", "batches", "warmup", "repeats", "complete", "skipped",
   "results": {
     "segresnetv2": {
       "flops_per_tile": <executed conv FLOPs, one tile>,
       "eager":   {"1": {"ms_per_tile", "ms_min", "ms_max", "ms_per_call",
                         "wall_ms_per_tile", "tflops", "peak_mem_mib"}, "2": {...}, ...},
       "compile": {"1": {... same, plus "compile_mode", "compile_s"}, ...},
       "compile_mode": "max-autotune" | "default" | "max-autotune -> default" | null,
       "compile_s": <total seconds in compiling first calls>,
       "compile_notes": [...]},
     "dynunet": {...}},
   "best": {"segresnetv2": {"eager_ms", "eager_batch", "compile_ms", "compile_batch"}, ...}}
ms_min / ms_max are per tile too; peak_mem_mib is null on CPU; a case that failed
holds {"error": "..."} instead.

--profile: after the timed calls of each (arch, mode) at the first batch size, 3 more calls
run under torch.profiler, and the case gains
  "profile": {"calls": 3, "ms_per_call": {"conv", "norm", "fused", "other"},
              "top": [{"kernel", "class", "ms_per_call"}, ... the 10 costliest]}
where each CUDA kernel's own time is put in a class by its name (`kernel_class`): cuDNN's
convolutions (conv), normalisation kernels (norm), torch.compile's Triton kernels (fused), the
rest (other; normalisation fused into Triton kernels counts as norm); on CPU the aten ops' own
times. This says how much of a compiled walk is
convolution, to compare with `fastdet bench --profile`'s steps.

Exit status: 0 done (possibly partial under --budget), 1 a case failed,
2 --device cuda but no usable GPU, 3 torch or monai missing, 64 bad usage.
"""
import argparse
import atexit
import importlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
MODES = ("eager", "compile")
ARCH_NAMES = ("segresnetv2", "dynunet")
# Spatial divisor each tile dimension must respect (as in bench_torch_cpu.ARCHS).
ARCH_DIV = {"segresnetv2": 8, "dynunet": 32}


class UsageParser(argparse.ArgumentParser):
    """argparse exits with 2 on bad usage; 2 means "no GPU" here, so use 64."""

    def error(self, message):
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(64)


def parse_triple(s):
    parts = [int(p) for p in s.replace("x", ",").split(",") if p.strip()]
    if len(parts) != 3 or any(p <= 0 for p in parts):
        raise argparse.ArgumentTypeError("--tile must be three positive ints: z,y,x")
    return parts


def parse_list(s, what, allowed=None, conv=str):
    items = [p.strip() for p in s.split(",") if p.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"--{what} must not be empty")
    out = []
    for it in items:
        try:
            v = conv(it)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--{what}: bad value {it!r}")
        if allowed is not None and v not in allowed:
            raise argparse.ArgumentTypeError(f"--{what}: {it!r} is not one of {', '.join(allowed)}")
        if conv is int and v < 1:
            raise argparse.ArgumentTypeError(f"--{what}: values must be >= 1")
        if v not in out:
            out.append(v)
    return out


def die(msg, code):
    print(f"bench_torch: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


# --------------------------------------------------------------------------
# MONAI from a wheel when it is not installed
# --------------------------------------------------------------------------
def install_wheel(wheel, target):
    """Install a pure-Python wheel into `target` (pip --no-deps --target; unpack
    the zip when pip is not there or fails). Returns a short description."""
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index",
           "--disable-pip-version-check", "--no-warn-script-location", "--quiet",
           "--target", target, wheel]
    try:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, timeout=300)
        if r.returncode == 0:
            return "pip install --no-deps --target"
        why = f"pip exited {r.returncode}: {r.stdout.strip()[-300:]}"
    except (OSError, subprocess.TimeoutExpired) as e:
        why = f"pip did not run: {e}"
    # A py3-none-any wheel is a zip of the package tree: unpacking it is an install.
    print(f"bench_torch: {why}; unpacking the wheel instead", file=sys.stderr, flush=True)
    shutil.rmtree(target, ignore_errors=True)
    os.makedirs(target, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        z.extractall(target)
    return "unpacked"


def import_monai(wheel):
    """Import monai, installing it from `wheel` first when it is missing."""
    try:
        import monai  # noqa: F401
        return monai, None
    except ImportError as e:
        first_error = e
    if not wheel:
        die(f"cannot import monai ({first_error}); install it or pass --monai-wheel PATH "
            f"(or set FASTDET_MONAI_WHEEL), e.g. --monai-wheel "
            f".cache/wheels/monai-1.6.1-py3-none-any.whl (tools/build-for-device.sh copies it there)", 3)
    if not os.path.isfile(wheel):
        die(f"cannot import monai ({first_error}) and the --monai-wheel {wheel} does not exist", 3)
    target = tempfile.mkdtemp(prefix="fastdet-monai-")
    atexit.register(shutil.rmtree, target, ignore_errors=True)
    t0 = time.perf_counter()
    how = install_wheel(os.path.abspath(wheel), target)
    sys.path.insert(0, target)
    importlib.invalidate_caches()
    for k in [k for k in sys.modules if k == "monai" or k.startswith("monai.")]:
        del sys.modules[k]
    try:
        import monai
    except ImportError as e:
        die(f"monai from {wheel} ({how} into {target}) does not import: {e}", 3)
    note = f"monai {monai.__version__} from {os.path.basename(wheel)} ({how} into {target}, {time.perf_counter() - t0:.1f} s)"
    return monai, (note, target)


# --------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------
class CompileTimeout(BaseException):
    """BaseException, so that code catching Exception (dynamo, inductor's
    autotuner) lets it through."""


class Alarm:
    """SIGALRM after `seconds` (main thread, Unix), raising CompileTimeout and
    re-arming every 2 s until the with-block is left (in case something swallows
    it); `fired` tells afterwards whether it went off."""

    def __init__(self, seconds):
        self.seconds = max(1, int(seconds)) if seconds and seconds > 0 else 0
        self.fired = False
        self.old = None

    def _handler(self, signum, frame):
        self.fired = True
        signal.alarm(2)
        raise CompileTimeout(f"compile exceeded {self.seconds} s")

    def __enter__(self):
        if self.seconds and hasattr(signal, "SIGALRM"):
            self.old = signal.signal(signal.SIGALRM, self._handler)
            signal.alarm(self.seconds)
        return self

    def __exit__(self, *exc):
        if self.seconds and hasattr(signal, "SIGALRM"):
            signal.alarm(0)
            signal.signal(signal.SIGALRM, self.old)
        return False


def time_calls(torch, fn, x, n, cuda, step_begin=None):
    """n calls of fn(x); per call (event ms, wall ms). Each call is synchronised
    before the next starts."""
    ev, wall = [], []
    for _ in range(n):
        if step_begin is not None:
            step_begin()
        if cuda:
            s = torch.cuda.Event(enable_timing=True)
            e = torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            s.record()
            out = fn(x)
            e.record()
            e.synchronize()
            wall.append((time.perf_counter() - t0) * 1e3)
            ev.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            out = fn(x)
            wall.append((time.perf_counter() - t0) * 1e3)
            ev.append(wall[-1])
        del out
    return ev, wall


def kernel_class(name):
    """The class of a profiled kernel (or CPU op) by its name: "norm" (normalisation),
    "conv" (cuDNN's / CUTLASS convolutions, transposed ones included), "fused" (Triton kernels
    of torch.compile), else "other" (copies, pointwise ATen kernels)."""
    n = name.lower()
    if "norm" in n or "bn_fw" in n or "batch_norm" in n:
        return "norm"
    if n.startswith("triton") or "triton_" in n:
        return "fused"
    if any(k in n for k in ("conv", "fprop", "dgrad", "xmma", "implicit_gemm", "implicit_convolve", "winograd", "cudnn", "cutlass")):
        return "conv"
    return "other"


def summarize_profile(rows, calls, top=10):
    """(name, own microseconds over `calls` calls) rows -> the JSON "profile" entry."""
    per = {"conv": 0.0, "norm": 0.0, "fused": 0.0, "other": 0.0}
    for name, us in rows:
        per[kernel_class(name)] += us / 1e3 / calls
    costly = sorted(rows, key=lambda r: -r[1])[:top]
    return {"calls": calls, "ms_per_call": {k: round(v, 4) for k, v in per.items()},
            "top": [{"kernel": name[:160], "class": kernel_class(name), "ms_per_call": round(us / 1e3 / calls, 4)} for name, us in costly]}


def one_call(torch, fn, x, cuda, step_begin=None):
    """fn(x) once, finished (synchronised on CUDA), its output dropped."""
    if step_begin is not None:
        step_begin()
    out = fn(x)
    if cuda:
        torch.cuda.synchronize()
    del out


def profile_calls(torch, fn, x, calls, cuda, step_begin=None):
    """`calls` calls of fn(x) under torch.profiler: (name, own microseconds) of each CUDA kernel
    (on CPU: each aten op) that took any."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            one_call(torch, fn, x, cuda, step_begin)
    rows = []
    for ev in prof.key_averages():
        if cuda:
            t = getattr(ev, "self_device_time_total", None)
            if t is None:
                t = getattr(ev, "self_cuda_time_total", 0)
        else:
            t = ev.self_cpu_time_total
        if t and t > 0:
            rows.append((ev.key, float(t)))
    return rows


def err_text(e):
    s = f"{type(e).__name__}: {e}".strip().replace("\n", " ")
    return s[:400]


# --------------------------------------------------------------------------
def main(argv=None):
    ap = UsageParser(description=__doc__.split("\n\n")[0],
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog="See the module docstring (top of this file) for the JSON layout.")
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    ap.add_argument("--tile", type=parse_triple, default=[192, 128, 128],
                    help="tile shape z,y,x (default 192,128,128)")
    ap.add_argument("--batches", type=lambda s: parse_list(s, "batches", conv=int), default=[1, 2, 4],
                    help="batch sizes to time (default 1,2,4)")
    ap.add_argument("--modes", type=lambda s: parse_list(s, "modes", MODES), default=list(MODES),
                    help="eager, compile or both (default eager,compile)")
    ap.add_argument("--arch", type=lambda s: parse_list(s, "arch", ARCH_NAMES), default=list(ARCH_NAMES),
                    help="segresnetv2, dynunet or both (default both)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed calls per case (default 5)")
    ap.add_argument("--repeats", type=int, default=20, help="timed calls per case, median reported (default 20)")
    ap.add_argument("--compile-timeout", type=float, default=120.0,
                    help="seconds allowed for a max-autotune compile (first call at a batch size) before "
                         "falling back to the default mode; also bounds the default mode's compile (default 120)")
    ap.add_argument("--compile-mode", choices=("auto", "default", "max-autotune"), default="auto",
                    help="auto: max-autotune, the default mode where that fails or times out (default); "
                         "default or max-autotune: that mode alone")
    ap.add_argument("--budget", type=float, default=0.0,
                    help="start no new case after this many seconds (default 0: no limit)")
    ap.add_argument("--monai-wheel", default=os.environ.get("FASTDET_MONAI_WHEEL") or None,
                    help="monai wheel to install into a temp dir when `import monai` fails "
                         "(default $FASTDET_MONAI_WHEEL)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (CPU; default: torch's)")
    ap.add_argument("--json", metavar="PATH", help="write one JSON object to PATH")
    ap.add_argument("--profile", action="store_true",
                    help="profile 3 more calls of each (arch, mode) at the first batch size: time per kernel class")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.threads < 0 or args.compile_timeout <= 0:
        ap.error("--repeats must be >= 1, --warmup and --threads >= 0, --compile-timeout > 0")
    dev_s = args.device.strip().lower()
    if not (dev_s == "cpu" or dev_s == "cuda" or (dev_s.startswith("cuda:") and dev_s[5:].isdigit())):
        ap.error(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    for a in args.arch:
        div = ARCH_DIV[a]
        if any(s % div for s in args.tile) or (args.tile[0] // div) * (args.tile[1] // div) * (args.tile[2] // div) < 2:
            # InstanceNorm (DynUNet bottleneck) rejects a single spatial element.
            ap.error(f"{a}: every tile dimension must be a multiple of {div} and the bottleneck "
                     f"(tile/{div}) must hold more than one voxel, got {args.tile}")
    t_start = time.perf_counter()

    try:
        import torch
    except ImportError as e:
        die(f"cannot import torch: {e}", 3)
    cuda = dev_s != "cpu"
    if cuda:
        idx = int(dev_s[5:]) if ":" in dev_s else 0
        if not torch.cuda.is_available():
            die(f"--device {args.device}: no usable GPU (torch.cuda.is_available() is False; "
                f"torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
                f"use --device cpu to test the flow without a GPU", 2)
        if idx >= torch.cuda.device_count():
            die(f"--device {args.device}: only {torch.cuda.device_count()} GPU(s) visible", 2)
        device = torch.device("cuda", idx)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        dtype = torch.float16
        mfmt = torch.channels_last_3d
        card = torch.cuda.get_device_name(device)
    else:
        device = torch.device("cpu")
        dtype = torch.float32
        mfmt = torch.contiguous_format
        card = f"cpu: {platform.processor() or platform.machine()}"
    if args.threads:
        torch.set_num_threads(args.threads)

    monai, installed = import_monai(args.monai_wheel)
    if installed:
        print(installed[0], flush=True)
    sys.path.insert(0, HERE)
    sys.dont_write_bytecode = True  # no tools/__pycache__ in the work tree
    import bench_torch_cpu as ref  # the model definitions and the FLOP counter

    try:
        cudnn_version = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except Exception:
        cudnn_version = None
    mfmt_name = "channels_last_3d" if mfmt is torch.channels_last_3d else "contiguous"
    tile = list(args.tile)
    print(f"card: {card}; torch {torch.__version__} (CUDA {torch.version.cuda}), cuDNN {cudnn_version}, "
          f"monai {monai.__version__}; {str(dtype).replace('torch.', '')}, {mfmt_name}"
          + (", cudnn.benchmark" if cuda else f", {torch.get_num_threads()} threads"), flush=True)
    print(f"tile {'x'.join(map(str, tile))}, batches {args.batches}, modes {args.modes}, "
          f"warmup {args.warmup}, repeats {args.repeats}", flush=True)

    # The card's dense fp16 rate as PyTorch reaches it (cuBLAS, large square matmul): the
    # denominator of fastdet's FLOP floor per tomogram.
    matmul_tflops = None
    if cuda:
        try:
            n = 8192
            a = torch.randn(n, n, device=device, dtype=torch.float16)
            b = torch.randn(n, n, device=device, dtype=torch.float16)
            for _ in range(3):
                a @ b
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            reps = 20
            start.record()
            for _ in range(reps):
                a @ b
            end.record()
            torch.cuda.synchronize(device)
            matmul_tflops = 2 * n ** 3 * reps / (start.elapsed_time(end) * 1e-3) * 1e-12
            del a, b
            torch.cuda.empty_cache()
            print(f"fp16 matmul {n}^3: {matmul_tflops:.1f} TFLOP/s", flush=True)
        except Exception as e:  # the baseline goes on without it
            print(f"fp16 matmul rate not measured: {err_text(e)}", flush=True)

    results = {a: {} for a in args.arch}
    doc = {
        "fp16_matmul_tflops": matmul_tflops,
        "card": card, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "memory_format": mfmt_name, "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda, "cudnn_version": cudnn_version,
        "monai_version": monai.__version__, "tile": tile, "batches": list(args.batches),
        "modes": list(args.modes), "warmup": args.warmup, "repeats": args.repeats,
        "cpu_threads": torch.get_num_threads(), "complete": True, "skipped": [],
        "results": results, "best": {},
    }

    def write_json():
        best = {}
        for a, r in results.items():
            b = {}
            for m in MODES:
                ok = {k: v for k, v in r.get(m, {}).items() if "ms_per_tile" in v}
                if ok:
                    k = min(ok, key=lambda k: ok[k]["ms_per_tile"])
                    b[f"{m}_ms"] = ok[k]["ms_per_tile"]
                    b[f"{m}_batch"] = int(k)
                else:
                    b[f"{m}_ms"] = None
                    b[f"{m}_batch"] = None
            best[a] = b
        doc["best"] = best
        if args.json:
            tmp = args.json + ".tmp"
            with open(tmp, "w") as f:
                json.dump(doc, f, indent=1)
                f.write("\n")
            os.replace(tmp, args.json)

    def over_budget():
        return args.budget > 0 and time.perf_counter() - t_start > args.budget

    def left_s():
        return args.budget - (time.perf_counter() - t_start) if args.budget > 0 else float("inf")

    failed = False
    step_begin = None
    if cuda and hasattr(torch, "compiler") and hasattr(torch.compiler, "cudagraph_mark_step_begin"):
        step_begin = torch.compiler.cudagraph_mark_step_begin

    def make_model(a):
        ctor, _div, seed = ref.ARCHS[a]
        torch.manual_seed(seed)
        m = ref.randomize_(ctor(), seed).eval()
        m = m.to(device=device, dtype=dtype)
        if cuda:
            m = m.to(memory_format=mfmt)
        return m

    def make_input(b):
        g = torch.Generator().manual_seed(1234)
        x = torch.randn((b, 1) + tuple(tile), generator=g, dtype=torch.float32)
        x = x.to(device=device, dtype=dtype)
        return x.contiguous(memory_format=mfmt) if cuda else x

    def free():
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    # Eager for every arch first, then compile: under --budget the cheap numbers come first.
    for mode in args.modes:
        for a in args.arch:
            r = results[a]
            if over_budget():
                doc["skipped"] += [f"{a}/{mode}/{b}" for b in args.batches]
                doc["complete"] = False
                print(f"{a} {mode}: skipped (--budget {args.budget:g} s spent)", flush=True)
                write_json()
                continue
            try:
                model = make_model(a)
                if "flops_per_tile" not in r:
                    with torch.inference_mode():
                        r["flops_per_tile"] = ref.count_executed_flops(model, make_input(1))
                    print(f"{a}: executed conv FLOPs {r['flops_per_tile'] / 1e9:.1f} GFLOP per tile", flush=True)
            except Exception as e:
                failed = True
                r[mode] = {str(b): {"error": err_text(e)} for b in args.batches}
                print(f"{a} {mode}: FAILED building the model: {err_text(e)}", flush=True)
                write_json()
                continue
            flops = r["flops_per_tile"]
            r.setdefault(mode, {})
            fn = model
            cmode = None
            if mode == "compile":
                r["compile_mode"] = None
                r["compile_s"] = 0.0
                r["compile_notes"] = []
                modes_used = []
            for b in args.batches:
                key = str(b)
                if over_budget():
                    doc["skipped"].append(f"{a}/{mode}/{b}")
                    doc["complete"] = False
                    print(f"{a} {mode} batch {b}: skipped (--budget {args.budget:g} s spent)", flush=True)
                    continue
                entry = {}
                x = None
                try:
                    x = make_input(b)
                    if cuda:
                        free()
                    with torch.inference_mode():
                        if mode == "compile":
                            # The first call at this batch size compiles (dynamic=False: one graph per shape).
                            while True:
                                if fn is model:
                                    cmode = cmode or ("default" if args.compile_mode == "default" else "max-autotune")
                                    fn = (torch.compile(model, mode="max-autotune", dynamic=False)
                                          if cmode == "max-autotune" else torch.compile(model, dynamic=False))
                                limit = min(args.compile_timeout, max(1.0, left_s()))
                                t0 = time.perf_counter()
                                alarm = Alarm(limit)
                                try:
                                    with alarm:
                                        one_call(torch, fn, x, cuda, step_begin)
                                    dt = time.perf_counter() - t0
                                    r["compile_s"] += dt
                                    entry["compile_mode"] = cmode
                                    entry["compile_s"] = round(dt, 2)
                                    if alarm.fired:  # the timeout was swallowed but the compile finished
                                        r["compile_notes"].append(
                                            f"batch {b}: {cmode} compile took {dt:.0f} s (over the {limit:.0f} s limit)")
                                    if cmode not in modes_used:
                                        modes_used.append(cmode)
                                    break
                                except (Exception, CompileTimeout) as e:
                                    dt = time.perf_counter() - t0
                                    r["compile_s"] += dt
                                    why = (f"timed out after {dt:.0f} s (limit {limit:.0f} s)" if alarm.fired
                                           else f"failed after {dt:.0f} s: {err_text(e)}")
                                    note = f"batch {b}: {cmode} compile {why}"
                                    r["compile_notes"].append(note)
                                    print(f"{a} compile: {note}", flush=True)
                                    torch._dynamo.reset()
                                    fn = model
                                    if cmode == "max-autotune" and args.compile_mode == "auto" and not over_budget():
                                        cmode = "default"
                                        print(f"{a} compile: falling back to the default mode", flush=True)
                                        continue
                                    raise RuntimeError(note) from None
                            r["compile_mode"] = " -> ".join(modes_used) if modes_used else None
                        if cuda:  # after the compile: its autotuning buffers are not the model's
                            torch.cuda.reset_peak_memory_stats(device)
                        time_calls(torch, fn, x, args.warmup, cuda,
                                   step_begin if mode == "compile" else None)
                        ev, wall = time_calls(torch, fn, x, args.repeats, cuda,
                                              step_begin if mode == "compile" else None)
                        # Where the time goes, once per (arch, mode); a diagnosis: its failure is noted.
                        if args.profile and b == args.batches[0]:
                            try:
                                entry["profile"] = summarize_profile(
                                    profile_calls(torch, fn, x, 3, cuda, step_begin if mode == "compile" else None), 3)
                            except Exception as e:
                                entry["profile_error"] = err_text(e)
                    med = statistics.median(ev)
                    entry.update({
                        "ms_per_tile": med / b,
                        "ms_min": min(ev) / b,
                        "ms_max": max(ev) / b,
                        "ms_per_call": med,
                        "wall_ms_per_tile": statistics.median(wall) / b,
                        "tflops": flops / (med / b * 1e-3) / 1e12,
                        "peak_mem_mib": (torch.cuda.max_memory_allocated(device) / 2**20) if cuda else None,
                    })
                    mem = f", peak {entry['peak_mem_mib']:.0f} MiB" if cuda else ""
                    cm = f" [{entry['compile_mode']}, compile {entry['compile_s']:.1f} s]" if mode == "compile" else ""
                    print(f"{a:<12} {mode:<8} batch {b}: {entry['ms_per_tile']:8.2f} ms/tile "
                          f"(min {entry['ms_min']:.2f}, max {entry['ms_max']:.2f}; "
                          f"{med:.2f} ms/call, wall {entry['wall_ms_per_tile']:.2f} ms/tile) "
                          f"{entry['tflops']:.2f} TFLOP/s{mem}{cm}", flush=True)
                    if "profile" in entry:
                        p = entry["profile"]
                        print(f"{'':<12} {'':<8} profile: " + ", ".join(f"{k} {v:.2f}" for k, v in p["ms_per_call"].items())
                              + " ms per call", flush=True)
                    elif "profile_error" in entry:
                        print(f"{'':<12} {'':<8} profile failed: {entry['profile_error']}", flush=True)
                except Exception as e:
                    failed = True
                    entry = {"error": err_text(e)}
                    print(f"{a:<12} {mode:<8} batch {b}: FAILED: {err_text(e)}", flush=True)
                    if mode == "compile":
                        # The compiled callable may be broken; start over for the next batch.
                        torch._dynamo.reset()
                        fn = model
                finally:
                    x = None
                r[mode][key] = entry
                write_json()
            del fn, model
            if mode == "compile":
                torch._dynamo.reset()
            free()

    write_json()
    print("best ms/tile:", flush=True)
    for a, bst in doc["best"].items():
        parts = []
        for m in args.modes:
            if bst.get(f"{m}_ms") is not None:
                parts.append(f"{m} {bst[f'{m}_ms']:.2f} (batch {bst[f'{m}_batch']})")
            else:
                parts.append(f"{m} -")
        extra = ""
        if "compile" in args.modes and results[a].get("compile_mode"):
            extra = f" [compile mode {results[a]['compile_mode']}, {results[a]['compile_s']:.1f} s compiling]"
        print(f"  {a:<12} " + ", ".join(parts) + extra, flush=True)
    if not doc["complete"]:
        print(f"note: --budget {args.budget:g} s ran out; skipped: {', '.join(doc['skipped'])}", flush=True)
    if args.json:
        print(f"wrote {args.json}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
