#!/usr/bin/env python3
"""Assemble benches/results.json (the latest device run's headline figures) from the JSON files a
device check writes:

  bench-fastdet.json   fastdet bench --device cuda:N --tile 192,128,128 --json
  bench-fastdet-batch2.json   the same with --batch 2 ("fastdet_batch2_ms", "fastdet_batch2_device_ms", per tile)
  bench-fastdet-tc.json   the same with FASTDET_CONV=tc (our tensor-core convs with their fusions;
                          "fastdet_fused_ms")
  bench-fastdet-measure.json   the same with FASTDET_CONV=measure (the path timed fastest on the card
                          among cuDNN and the tensor-core variants: "fastdet_measured_ms", "conv_choice",
                          "conv_variants_ms" = each variant's ms per walk of the measured batch)
  bench-fastdet-graph.json   the same on cuDNN's graph API, engines timed per conv ("fastdet_graph_ms")
  bench-tomogram.json  fastdet bench --device cuda:N --tomogram 184,630,630 --models 5,5 --json
  bench-tomogram-host-blend.json   the same with --host-blend (averaging and blending on the CPU)
  bench-tomogram-batch2.json   the same with --batch 2 (two tiles per walk)
  bench-tomogram-measure.json  the same with FASTDET_CONV=measure (each network on its fastest path)
  bench-torch.json     tools/bench_torch.py --device cuda:N --json   (eager, torch.compile, fp16 rate)
  criterion/           benches/cuda_ops.rs (CRITERION_HOME): median ms of each block_*, convt_* and
                       tile_* variant

Output (missing inputs give nulls, never invented numbers):
  {"card", "commit", "date",
   "tile": {"segresnetv2": {"torch_eager_ms", "torch_compile_ms", "fastdet_ms", "fastdet_fused_ms",
                            "fastdet_measured_ms", "fastdet_device_ms", "fastdet_fused_device_ms",
                            "fastdet_measured_device_ms", "fastdet_batch2_ms", "fastdet_batch2_device_ms",
                            "fastdet_graph_ms", "fastdet_graph_device_ms", "conv_choice", "conv_variants_ms", "floor_ms",
                            "torch_profile": {"eager"|"compile": {"batch", "ms_per_call": {"conv", "norm", "fused", "other"}}},
                            "fastdet_profile": {"default"|"cudnn_graph": [{"kind", "ms", "steps", "tflops", "gbps"}, ...]}},
            "dynunet": {...}},
   "blocks": {"32ch_192x128x128": {"cudnn_ms", "cudnn_graph_ms", "tc_unfused_ms", "tc_fused_ms", "tc_halo_fused_ms", "tc_store_fused_ms",
                                   "tc_store_fused_wide_ms", "tc_store_fused_async_ms"}, ...},
   "tile_criterion": {"segresnetv2": {"cudnn_ms", "cudnn_graph_ms", "tc_ms", "tc_norm_in_loads_ms", "tc_wide_ms", "tc_async_ms",
                                      "tc_halo_norm_in_loads_ms"},
                      "dynunet": {...}},
   "convt": {"320to256_12x8x8": {"fma_ms", "tc_ms"}, ...},
   "tomogram_s", "tomogram_host_blend_s", "tomogram_batch2_s", "tomogram_measured_s", "floor_s", "cold_start_s",
   "cold_start_kernels_compiled", "first_start_nvrtc_s", "peak_mem_gib", "tomogram_peak_mem_gib", "card_mem_gib",
   "fp16_matmul_tflops", "tile_shape", "sources"}

fastdet_ms, fastdet_fused_ms and fastdet_measured_ms are `fastdet bench`'s host-to-host figures
(f32 tile up, maps back to host memory); the *_device_ms figures are the same walks on a
device-resident input with the outputs left there (`ms_per_tile_device`), as PyTorch's figures
are timed: the speed-ups compare those when there are any. fastdet_measured_device_ms falls back
to the chosen variant's walk in conv_variants_ms (also device-resident) for benches that predate
`ms_per_tile_device`.

tomogram_s is the default pipeline, which averages and blends on the GPU (before 2026-12-02 the
default blended on the CPU: results.json files from then hold that under tomogram_s);
tomogram_host_blend_s is the same with --host-blend. first_start_nvrtc_s: NVRTC's seconds in the
check's first process (empty kernel cache); cold_start_s is a later start, with the kernels cached
(cold_start_kernels_compiled says how many it had to compile).

floor_s = FLOPs per tomogram (from the tomogram bench) / the card's fp16 rate measured by PyTorch's
large matmul (bench-torch.json "fp16_matmul_tflops"); a tile's floor_ms likewise from the per-tile
bench's FLOPs per tile. peak_mem_gib is fastdet's own device
buffers at batch 1 (the per-tile bench), the largest over the models; tomogram_peak_mem_gib the
same for the tomogram bench's worker (its whole ensemble); card_mem_gib the card's memory in use
(the driver's total less free: context, kernels, libraries and allocator reserve included, and
any other process's) at the end of the tomogram bench, its engines still open.

With --markdown it prints the RESULTS.md section for the run instead (tables of the same figures;
a missing figure is a dash).

Usage: python3 tools/results_json.py DIR [--commit SHA] [--date YYYY-MM-DD] [-o results.json] [--markdown]
"""
import argparse
import datetime
import json
import os
import re
import subprocess
import sys


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        print(f"results_json: {path}: unreadable ({e}); left out", file=sys.stderr)
        return None


def git_commit():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


BLOCK_VARIANTS = ("cudnn", "cudnn_graph", "tc_unfused", "tc_fused", "tc_halo_fused", "tc_store_fused", "tc_store_fused_wide", "tc_store_fused_async")
TILE_VARIANTS = ("cudnn", "cudnn_graph", "tc", "tc_norm_in_loads", "tc_wide", "tc_async", "tc_halo_norm_in_loads")
CONVT_VARIANTS = ("fma", "tc")


def criterion_groups(d, prefix, variants):
    """{name: {variant_ms}} from criterion's <prefix><name>/<variant>/new/estimates.json (median)."""
    root = os.path.join(d, "criterion")
    out = {}
    if not os.path.isdir(root):
        return out
    for group in sorted(os.listdir(root)):
        if not group.startswith(prefix):
            continue
        for variant in variants:
            est = load(os.path.join(root, group, variant, "new", "estimates.json"))
            median = ((est or {}).get("median") or {}).get("point_estimate")
            if median is not None:
                out.setdefault(group[len(prefix):], {})[variant + "_ms"] = median / 1e6
    return out


def first_start_nvrtc_s(d):
    """NVRTC's seconds in the first process of the check (the quick self-test, empty kernel cache),
    from its "kernels: ... compiled by NVRTC in X s" note; None when it compiled nothing."""
    st = load(os.path.join(d, "selftest-quick.json")) or {}
    for n in st.get("notes", []):
        m = re.search(r"compiled by NVRTC in ([0-9.]+) s", n) if n.startswith("kernels:") else None
        if m:
            return float(m.group(1))
    return None


def card_from_selftest(d):
    """The GPU's name as the self-test describes its device ("cuda:0 NAME (sm_90, ...), driver ...")."""
    for f in ("selftest-full.json", "selftest-quick.json"):
        m = re.match(r"cuda:\d+ (.+?) \(sm_\d+", (load(os.path.join(d, f)) or {}).get("device") or "")
        if m:
            return m.group(1)
    return None


def model_of(bench, arch):
    """The entry of `arch` in a per-tile bench's "models" list, None when the bench or entry is missing."""
    return next((m for m in (bench or {}).get("models", []) if m.get("model") == arch), None)


def assemble(d, commit, date):
    fd = load(os.path.join(d, "bench-fastdet.json"))
    fd_tc = load(os.path.join(d, "bench-fastdet-tc.json"))
    fd_b2 = load(os.path.join(d, "bench-fastdet-batch2.json"))
    fd_measure = load(os.path.join(d, "bench-fastdet-measure.json"))
    fd_graph = load(os.path.join(d, "bench-fastdet-graph.json"))
    tomo = load(os.path.join(d, "bench-tomogram.json"))
    torch = load(os.path.join(d, "bench-torch.json"))
    tomo_hb = load(os.path.join(d, "bench-tomogram-host-blend.json"))
    tomo_b2 = load(os.path.join(d, "bench-tomogram-batch2.json"))
    tomo_m = load(os.path.join(d, "bench-tomogram-measure.json"))
    rate = torch.get("fp16_matmul_tflops") if torch else None
    tile = {}
    for arch in ("segresnetv2", "dynunet"):
        row = {"torch_eager_ms": None, "torch_compile_ms": None, "fastdet_ms": None, "fastdet_fused_ms": None,
               "fastdet_measured_ms": None, "fastdet_device_ms": None, "fastdet_fused_device_ms": None,
               "fastdet_measured_device_ms": None, "fastdet_batch2_ms": None, "fastdet_batch2_device_ms": None,
               "fastdet_graph_ms": None, "fastdet_graph_device_ms": None, "conv_choice": None, "conv_variants_ms": None, "floor_ms": None,
               "torch_profile": None, "fastdet_profile": None}
        # fastdet bench --profile: a walk's time by kind of step, on the default path and cuDNN's graph API.
        walk_kinds = {}
        for doc, api in ((fd, "default"), (fd_graph, "cudnn_graph")):
            p = (model_of(doc, arch) or {}).get("profile")
            if p:
                walk_kinds[api] = [{k: kind.get(k) for k in ("kind", "ms", "steps", "tflops", "gbps")} for kind in p.get("by_kind", [])]
        row["fastdet_profile"] = walk_kinds or None
        if torch:
            best = torch.get("best", {}).get(arch, {})
            row["torch_eager_ms"] = best.get("eager_ms")
            row["torch_compile_ms"] = best.get("compile_ms")
            # bench_torch.py --profile: each mode's time per call by kernel class, at the batch profiled.
            prof = {}
            for mode in ("eager", "compile"):
                for b, e in ((torch.get("results", {}).get(arch) or {}).get(mode) or {}).items():
                    if (e or {}).get("profile"):
                        prof[mode] = {"batch": int(b), "ms_per_call": e["profile"]["ms_per_call"]}
                        break
            row["torch_profile"] = prof or None
        # Each per-tile bench's host-to-host and device-resident figures, under its own names.
        for doc, prefix in ((fd, "fastdet"), (fd_b2, "fastdet_batch2"), (fd_tc, "fastdet_fused"), (fd_measure, "fastdet_measured"), (fd_graph, "fastdet_graph")):
            m = model_of(doc, arch)
            if m is not None:
                row[prefix + "_ms"] = m.get("ms_per_tile")
                row[prefix + "_device_ms"] = m.get("ms_per_tile_device")
        m = model_of(fd, arch)
        if m is not None and rate and m.get("gflop_per_tile"):
            row["floor_ms"] = m["gflop_per_tile"] / (rate * 1e3) * 1e3
        m = model_of(fd_measure, arch)
        if m is not None:
            choice = m.get("conv_choice") or {}
            row["conv_choice"] = choice.get("label")
            row["conv_variants_ms"] = choice.get("ms_per_walk")
            walk = (choice.get("ms_per_walk") or {}).get(choice.get("label"))
            if row["fastdet_measured_device_ms"] is None and walk is not None and choice.get("batch"):
                row["fastdet_measured_device_ms"] = walk / choice["batch"]
        tile[arch] = row
    if fd and torch and list(fd.get("tile", [])) != list(torch.get("tile", [])):
        print(f"results_json: tiles differ (fastdet {fd.get('tile')}, torch {torch.get('tile')}); the tile table is not a comparison", file=sys.stderr)
    # The commit the benchmarked binary names (its JSON), else git where this runs.
    commit = commit or next((j["fastdet_commit"] for j in (fd, fd_tc, fd_measure, fd_graph, tomo, tomo_hb) if j and j.get("fastdet_commit") not in (None, "unknown")), None) \
        or git_commit()
    flops = tomo.get("flops_per_tomogram") if tomo else None
    mems = [m.get("device_memory_peak_mib") for m in (fd or {}).get("models", []) if m.get("device_memory_peak_mib") is not None]
    gib = lambda mib: mib / 1024 if mib is not None else None
    return {
        "card": (torch or {}).get("card") or card_from_selftest(d),
        "commit": commit,
        "date": date,
        "tile": tile,
        "blocks": criterion_groups(d, "block_", BLOCK_VARIANTS),
        "tile_criterion": criterion_groups(d, "tile_", TILE_VARIANTS),
        "convt": criterion_groups(d, "convt_", CONVT_VARIANTS),
        "tomogram_s": tomo.get("s_per_tomogram") if tomo else None,
        "tomogram_host_blend_s": tomo_hb.get("s_per_tomogram") if tomo_hb else None,
        "tomogram_batch2_s": tomo_b2.get("s_per_tomogram") if tomo_b2 else None,
        "tomogram_measured_s": tomo_m.get("s_per_tomogram") if tomo_m else None,
        "tomogram_config": {k: tomo.get(k) for k in ("tomogram", "window", "tiles", "models", "upload_overlapped")} if tomo else None,
        "floor_s": flops / (rate * 1e12) if flops and rate else None,
        "cold_start_s": (fd or {}).get("cold_start_s"),
        "cold_start_kernels_compiled": ((fd or {}).get("kernel_load") or {}).get("compiled"),
        "first_start_nvrtc_s": first_start_nvrtc_s(d),
        "peak_mem_gib": max(mems) / 1024 if mems else None,
        "tomogram_peak_mem_gib": gib((tomo or {}).get("device_memory_peak_mib")),
        "card_mem_gib": gib((tomo or {}).get("card_memory_in_use_mib")),
        "fp16_matmul_tflops": rate,
        "tile_shape": (fd or torch or {}).get("tile"),
        "sources": {
            "bench_fastdet": fd is not None,
            "bench_fastdet_tc": fd_tc is not None,
            "bench_fastdet_batch2": fd_b2 is not None,
            "bench_fastdet_measure": fd_measure is not None,
            "bench_fastdet_graph": fd_graph is not None,
            "bench_tomogram": tomo is not None,
            "bench_tomogram_host_blend": tomo_hb is not None,
            "bench_tomogram_batch2": tomo_b2 is not None,
            "bench_tomogram_measure": tomo_m is not None,
            "bench_torch": torch is not None,
            "criterion": os.path.isdir(os.path.join(d, "criterion")),
            "fastdet_device": (fd or tomo or {}).get("device"),
        },
    }


def markdown(doc):
    """The RESULTS.md section for one run: its figures as tables, a dash where one is missing."""
    def ms(v):
        return "–" if v is None else f"{v:.2f} ms"

    def ratio(a, b):
        return "–" if a is None or b is None or b == 0 else f"{a / b:.2f}x"

    out = [f"### {doc.get('date')}: {doc.get('card') or 'card unknown'}, commit {doc.get('commit')}", "",
           "Command: `tools/device-check.sh OUT` (figures from its JSON and criterion files, assembled by "
           "`tools/results_json.py OUT --markdown`).", "",
           f"Per {'x'.join(map(str, doc.get('tile_shape') or [])) or '?'} tile (fastdet: batch 1 unless named, median, host to host "
           "(tile up, maps back) / device-resident walk (outputs left on the device); "
           "PyTorch: its best batch, fp16, channels_last_3d, device-resident). Speed-up = PyTorch time / fastdet's best "
           "device-resident walk (host to host where no walk was timed); "
           "floor = FLOPs / the card's fp16 matmul rate.", "",
           "| arch | PyTorch eager | torch.compile | fastdet (cuDNN path) | fastdet (cuDNN graph API, timed) | fastdet (tensor-core path) | fastdet (measured choice) | fastdet (batch 2) | vs eager | vs compile | FLOP floor | % of floor |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    choices = []
    for arch, r in doc["tile"].items():
        walks = [v for v in (r.get("fastdet_device_ms"), r.get("fastdet_fused_device_ms"), r.get("fastdet_measured_device_ms"),
                             r.get("fastdet_batch2_device_ms"), r.get("fastdet_graph_device_ms")) if v is not None]
        best = min(walks or [v for v in (r.get("fastdet_ms"), r.get("fastdet_fused_ms"), r.get("fastdet_measured_ms"), r.get("fastdet_graph_ms")) if v is not None], default=None)
        pct = "–" if best is None or r.get("floor_ms") is None else f"{100 * r['floor_ms'] / best:.0f}%"

        def both(host, device):
            return ms(host) if device is None else f"{ms(host)} / {ms(device)}"
        measured = both(r.get("fastdet_measured_ms"), r.get("fastdet_measured_device_ms")) + (f" ({r['conv_choice']})" if r.get("conv_choice") else "")
        out.append(f"| {arch} | {ms(r.get('torch_eager_ms'))} | {ms(r.get('torch_compile_ms'))} | {both(r.get('fastdet_ms'), r.get('fastdet_device_ms'))} | "
                   f"{both(r.get('fastdet_graph_ms'), r.get('fastdet_graph_device_ms'))} | "
                   f"{both(r.get('fastdet_fused_ms'), r.get('fastdet_fused_device_ms'))} | {measured} | "
                   f"{both(r.get('fastdet_batch2_ms'), r.get('fastdet_batch2_device_ms'))} | {ratio(r.get('torch_eager_ms'), best)} | {ratio(r.get('torch_compile_ms'), best)} | "
                   f"{ms(r.get('floor_ms'))} | {pct} |")
        if r.get("conv_variants_ms"):
            cells = ", ".join(f"{k} {'failed' if v is None else f'{v:.2f} ms'}" for k, v in r["conv_variants_ms"].items())
            choices.append(f"- {arch}: {r.get('conv_choice')} chosen; {cells}")
    if choices:
        out += ["", "FASTDET_CONV=measure, each variant's median walk (the whole network on the batch measured):", ""] + choices
    profiles = [f"- {arch} {mode} (batch {p['batch']}): " + ", ".join(f"{k} {v:.2f} ms" for k, v in p["ms_per_call"].items())
                for arch, r in doc["tile"].items() for mode, p in (r.get("torch_profile") or {}).items()]
    if profiles:
        out += ["", "PyTorch's time per call by kernel class (torch.profiler, kernels' own time):", ""] + profiles

    def kind_cell(k):
        rates = [r for r in (f"{k['tflops']:.0f} TFLOP/s" if k.get("tflops") else None, f"≥ {k['gbps']:.0f} GB/s" if k.get("gbps") else None) if r]
        return f"{k['kind']} {k['ms']:.2f} ms" + (f" ({', '.join(rates)})" if rates else "")
    profiles = [f"- {arch}, {'default path' if api == 'default' else 'cuDNN graph API'}: " + "; ".join(kind_cell(k) for k in kinds)
                for arch, r in doc["tile"].items() for api, kinds in (r.get("fastdet_profile") or {}).items()]
    if profiles:
        out += ["", "fastdet's walk by kind of step (`bench --profile`, each step between timing events, no graph; "
                "≥ GB/s: its least memory traffic over its time):", ""] + profiles
    for title, key, variants in (("Tile variants (criterion medians)", "tile_criterion", TILE_VARIANTS),
                                 ("SegResNetV2 residual block per level (criterion medians)", "blocks", BLOCK_VARIANTS),
                                 ("DynUNet transposed convolutions, cin to cout at input dims (criterion medians)", "convt", CONVT_VARIANTS)):
        groups = doc.get(key) or {}
        if not groups:
            continue
        out += ["", title + ":", "", "| | " + " | ".join(variants) + " |", "| --- |" + " --- |" * len(variants)]
        for name, v in groups.items():
            out.append(f"| {name} | " + " | ".join(ms(v.get(x + "_ms")) for x in variants) + " |")

    def s(v, unit="s"):
        return "–" if v is None else f"{v:.2f} {unit}"

    t, f = doc.get("tomogram_s"), doc.get("floor_s")
    c = doc.get("tomogram_config") or {}
    shape = "x".join(map(str, c.get("tomogram") or [])) or "–"
    models = c.get("models") or {}
    config = (f"{models.get('segresnetv2', '?')} SegResNetV2 + {models.get('dynunet', '?')} DynUNet, "
              f"{'x'.join(map(str, c.get('tiles') or [])) or '?'} tiles of {'x'.join(map(str, c.get('window') or [])) or '?'}"
              f"{', volumes copied ahead' if c.get('upload_overlapped') else ''}")
    # Time / floor of the fastest GPU-blend configuration measured, named when not the default.
    best = min(((v, label) for v, label in ((t, ""), (doc.get("tomogram_batch2_s"), " (batch 2)"), (doc.get("tomogram_measured_s"), " (measured choice)"))
                if v is not None), default=(None, ""))
    out += ["", "| per tomogram | models and tiles | GPU blend | host blend | GPU blend, batch 2 | GPU blend, measured choice | FLOP floor | time / floor |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
            f"| {shape} | {config if c else '–'} | {s(t)} | {s(doc.get('tomogram_host_blend_s'))} | {s(doc.get('tomogram_batch2_s'))} | "
            f"{s(doc.get('tomogram_measured_s'))} | {s(f)} | "
            f"{'–' if best[0] is None or not f else f'{best[0] / f:.2f}x{best[1]}'} |",
            "", f"Cold start (kernels cached) {s(doc.get('cold_start_s'))}; first start's NVRTC compile {s(doc.get('first_start_nvrtc_s'))}; "
            f"peak device memory at batch 1 {s(doc.get('peak_mem_gib'), 'GiB')} (one model), "
            f"{s(doc.get('tomogram_peak_mem_gib'), 'GiB')} (the tomogram's ensemble; card in use {s(doc.get('card_mem_gib'), 'GiB')}); fp16 matmul rate {s(doc.get('fp16_matmul_tflops'), 'TFLOP/s')}."]
    return "\n".join(out) + "\n"


def selftest_section(d):
    """The self-test's log for RESULTS.md (the full one, else the quick one): every row, its header
    (build, device) and its command and start time, as the device check wrote them."""
    for name in ("selftest-full.log", "selftest-quick.log"):
        path = os.path.join(d, name)
        try:
            with open(path) as f:
                log = f.read().rstrip("\n")
        except OSError:
            continue
        return "\n".join(["", f"Self-test log ({name}, as the device check wrote it):", "", "```text", log, "```"]) + "\n"
    return ""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", help="the device check's output directory")
    ap.add_argument("--commit", help="fastdet commit the binary was built from (default: the one its bench JSON names, else git here)")
    ap.add_argument("--date", help="date of the run (default: today, UTC)")
    ap.add_argument("-o", "--out", help="write here (default: stdout)")
    ap.add_argument("--markdown", action="store_true", help="print the RESULTS.md section instead of JSON")
    a = ap.parse_args()
    if not os.path.isdir(a.dir):
        print(f"results_json: {a.dir} is not a directory", file=sys.stderr)
        return 64
    benches = ["bench-fastdet.json", "bench-fastdet-batch2.json", "bench-fastdet-tc.json", "bench-fastdet-measure.json", "bench-fastdet-graph.json", "bench-tomogram.json",
               "bench-tomogram-host-blend.json", "bench-tomogram-batch2.json", "bench-tomogram-measure.json", "bench-torch.json"]
    if not any(os.path.isfile(os.path.join(a.dir, f)) for f in benches) and not os.path.isdir(os.path.join(a.dir, "criterion")):
        print(f"results_json: no bench output in {a.dir} ({', '.join(benches)}, criterion/): nothing was measured "
              "there (see its summary.txt: a check without a GPU measures nothing)", file=sys.stderr)
        return 3
    doc = assemble(a.dir, a.commit, a.date or datetime.datetime.now(datetime.timezone.utc).date().isoformat())
    text = markdown(doc) + selftest_section(a.dir) if a.markdown else json.dumps(doc, indent=2) + "\n"
    if a.out:
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, a.out)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
