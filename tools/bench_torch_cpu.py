#!/usr/bin/env python3
"""PyTorch CPU baseline for fastdet's per-tile benchmark.

Times one forward pass of the two reference detectors (the same module trees as
/work/shared/reference/models.py, re-defined below so this script only needs
torch + monai) on a single [1, 1, Z, Y, X] float32 tile, batch 1, in eval mode
under torch.inference_mode, with random weights.

Seed widths:
  segresnetv2: SegResNetDet(init_filters=32, mid=48, omid=16)
  dynunet:     DynUNetDet(filters=[32, 64, 128, 256, 320, 320], out_channels=64, mid=48, omid=16)

FLOPs: 2 x multiply-adds of every Conv3d / ConvTranspose3d call that the forward
pass actually executes (counted with forward hooks on a real run, bias adds
excluded). NOTE: PyTorch executes MORE than fastdet does: SegResNetFeatures runs
every decoder level including the full-resolution one (only feats[-2] is used)
and DynUNet runs its full-resolution decoder level too, while fastdet prunes
those. So the GFLOP/s printed here is "executed work / time" for PyTorch; for a
ratio against fastdet compare the ms figures (or use fastdet's pruned FLOP
count divided by these ms).

Usage:
  python tools/bench_torch_cpu.py [--threads N] [--repeats 5] [--warmup 2]
                                  [--tile 64,64,64] [--arch segresnetv2,dynunet] [--json]

With --json the human-readable lines go to stderr and stdout gets exactly one
JSON object:
  {"torch_version", "monai_version", "threads", "tile",
   "segresnetv2": {"ms", "flops_executed"}, "dynunet": {"ms", "flops_executed"}}
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch import nn

import monai
from monai.networks.nets import DynUNet, SegResNet


# --------------------------------------------------------------------------
# Model definitions (copied from /work/shared/reference/models.py so that the
# module tree, and so the state-dict keys, are identical).
# --------------------------------------------------------------------------
class DetHead(nn.Module):
    """Conv-SiLU-InstanceNorm stems, 1x1 class logits and tanh*stride offsets."""

    def __init__(self, cin, ncls, stride, mid, omid):
        super().__init__()

        def stem(c):
            return nn.Sequential(
                nn.Conv3d(cin, c, 3, padding=1), nn.SiLU(inplace=True), nn.InstanceNorm3d(c),
                nn.Conv3d(c, c, 3, padding=1), nn.SiLU(inplace=True), nn.InstanceNorm3d(c),
            )

        self.cls_stem = stem(mid)
        self.cls_head = nn.Conv3d(mid, ncls, 1)
        self.offset_stem = stem(omid)
        self.offset_head = nn.Conv3d(omid, 3, 1)
        self.stride = stride

    def forward(self, f):
        logits = self.cls_head(self.cls_stem(f))
        offsets = self.offset_head(self.offset_stem(f)).tanh() * self.stride
        return logits, offsets


class SegResNetFeatures(SegResNet):
    def forward(self, x):
        x = self.convInit(x)
        down = []
        for d in self.down_layers:
            x = d(x)
            down.append(x)
        down.reverse()
        feats = []
        for i, (up, upl) in enumerate(zip(self.up_samples, self.up_layers)):
            x = up(x) + down[i + 1]
            x = upl(x)
            feats.append(x)
        return feats


class SegResNetDet(nn.Module):
    """SegResNetForObjectDetectionV2 with use_stride2=True, use_stride4=False."""

    def __init__(self, init_filters=32, num_classes=6, mid=48, omid=16):
        super().__init__()
        self.backbone = SegResNetFeatures(
            spatial_dims=3, init_filters=init_filters, in_channels=1, out_channels=105,
            blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1), dropout_prob=0.2,
        )
        self.dropout = nn.Dropout3d(0.0)
        self.head2 = DetHead(init_filters * 2, num_classes, 2, mid, omid)

    def forward(self, x):
        feats = self.backbone(x)
        logits, offsets = self.head2(self.dropout(feats[-2]))
        return logits.sigmoid(), offsets


class DynUNetFeatures(DynUNet):
    def forward(self, x):
        self.skip_layers(x)
        return self.heads


def dynunet_kernels_strides(size=128):
    strides, kernels, s = [], [], size
    while s >= 8:
        strides.append([2, 2, 2])
        kernels.append([3, 3, 3])
        s //= 2
    strides.insert(0, [1, 1, 1])
    kernels.append([3, 3, 3])
    return kernels, strides


class DynUNetDet(nn.Module):
    """DynUNetForObjectDetection with use_stride2=True, use_stride4=False."""

    def __init__(self, num_classes=6, out_channels=64, filters=None, mid=48, omid=16):
        super().__init__()
        kernels, strides = dynunet_kernels_strides(128)
        self.backbone = DynUNetFeatures(
            spatial_dims=3, in_channels=1, out_channels=out_channels,
            kernel_size=kernels, strides=strides, upsample_kernel_size=strides[1:],
            filters=filters, norm_name="instance", deep_supervision=True, deep_supr_num=2,
            dropout=None, res_block=False, act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
        )
        self.head2 = DetHead(out_channels, num_classes, 2, mid, omid)

    def forward(self, x):
        fm2, _fm4 = self.backbone(x)
        logits, offsets = self.head2(fm2)
        return logits.sigmoid(), offsets


def randomize_(model, seed):
    """Give every parameter a non-trivial value (the heads are zero-initialised
    in the original code, which would make every output constant)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            elif name.endswith("weight"):  # norm affine scale
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


# --------------------------------------------------------------------------
# Benchmark
# --------------------------------------------------------------------------
# name -> (constructor, spatial divisor the tile must respect, weight seed)
ARCHS = {
    "segresnetv2": (lambda: SegResNetDet(init_filters=32, mid=48, omid=16), 8, 0),
    "dynunet": (
        lambda: DynUNetDet(filters=[32, 64, 128, 256, 320, 320], out_channels=64, mid=48, omid=16),
        32,
        1,
    ),
}


def _conv_macs(module, inp, out):
    """Multiply-adds of one Conv3d / ConvTranspose3d call (bias excluded)."""
    x = inp[0]
    kvol = 1
    for k in module.kernel_size:
        kvol *= k
    if isinstance(module, nn.ConvTranspose3d):
        # every input element is scattered into out_channels/groups x kernel taps
        return x.numel() * (module.out_channels // module.groups) * kvol
    # every output element gathers in_channels/groups x kernel taps
    return out.numel() * (module.in_channels // module.groups) * kvol


def count_executed_flops(model, x):
    """Run one forward pass with hooks on every Conv3d/ConvTranspose3d and
    return 2 x the multiply-adds of the calls that actually happened."""
    total = [0]

    def hook(module, inp, out):
        total[0] += _conv_macs(module, inp, out)

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))
    ]
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return 2 * total[0]


def bench_arch(name, tile, warmup, repeats, log):
    ctor, div, seed = ARCHS[name]
    bottom = [s // div for s in tile]
    if any(s % div for s in tile) or bottom[0] * bottom[1] * bottom[2] < 2:
        # InstanceNorm (DynUNet bottleneck) rejects a single spatial element.
        raise SystemExit(
            f"{name}: every tile dimension must be a multiple of {div} and the "
            f"bottleneck (tile/{div}) must hold more than one voxel, got {tile}"
        )
    torch.manual_seed(seed)
    model = randomize_(ctor(), seed).eval().float()
    g = torch.Generator().manual_seed(1234)
    x = torch.randn((1, 1) + tuple(tile), generator=g, dtype=torch.float32)

    # Hook-counted pass (also serves as a first warm-up; hooks are removed afterwards
    # so they cannot affect the timed runs).
    flops = count_executed_flops(model, x)

    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        c0 = time.process_time()
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - t0) * 1e3)
        cpu_ms = (time.process_time() - c0) * 1e3 / repeats
    ms = statistics.median(times)
    gflops = flops / (ms * 1e-3) / 1e9
    log(
        f"{name}: median {ms:.1f} ms/tile over {repeats} runs "
        f"(min {min(times):.1f}, max {max(times):.1f}); "
        f"executed conv FLOPs {flops / 1e9:.2f} GFLOP -> {gflops:.1f} GFLOP/s; "
        f"process CPU {cpu_ms:.0f} ms/run (~threads x wall when the machine is idle) "
        f"[tile {'x'.join(map(str, tile))}, threads {torch.get_num_threads()}]"
    )
    return {"ms": ms, "flops_executed": flops}


def parse_tile(s):
    parts = [int(p) for p in s.replace("x", ",").split(",") if p.strip()]
    if len(parts) != 3 or any(p <= 0 for p in parts):
        raise argparse.ArgumentTypeError("--tile must be three positive ints: z,y,x")
    return parts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch.set_num_threads (default: os.cpu_count())")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per arch (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed warm-up runs per arch")
    ap.add_argument("--tile", type=parse_tile, default=[64, 64, 64], help="tile shape z,y,x (default 64,64,64)")
    ap.add_argument("--arch", default="segresnetv2,dynunet",
                    help="comma-separated subset of: " + ",".join(ARCHS))
    ap.add_argument("--json", action="store_true",
                    help="print one JSON object on stdout (human-readable lines go to stderr)")
    args = ap.parse_args(argv)

    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    for a in archs:
        if a not in ARCHS:
            ap.error(f"unknown arch {a!r}; choose from {', '.join(ARCHS)}")
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        ap.error("--repeats and --threads must be >= 1, --warmup >= 0")

    torch.set_num_threads(args.threads)
    out_stream = sys.stderr if args.json else sys.stdout

    def log(msg):
        print(msg, file=out_stream, flush=True)

    log(f"torch {torch.__version__}, monai {monai.__version__}, threads {torch.get_num_threads()}, "
        f"tile {args.tile}, warmup {args.warmup}, repeats {args.repeats}")

    result = {
        "torch_version": torch.__version__,
        "monai_version": monai.__version__,
        "threads": torch.get_num_threads(),
        "tile": list(args.tile),
    }
    for a in archs:
        result[a] = bench_arch(a, args.tile, args.warmup, args.repeats, log)

    # ms only: PyTorch executes unpruned decoder levels, so compare these ms
    # against fastdet (whose own FLOP count is for the pruned graph).
    log("ms only: " + ", ".join(f"{a}={result[a]['ms']:.1f}" for a in archs))

    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
