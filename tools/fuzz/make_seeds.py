#!/usr/bin/env python3
"""Writes the seed corpora of the fastdet fuzz targets into tools/fuzz/seeds/<target>/.

Run from anywhere: `python3 tools/fuzz/make_seeds.py`. Needs only the Python standard library
(no torch): torch-style pickles are written with stand-in `torch` modules, so the bytes are what
`torch.save` writes for the same objects (protocol 2, persistent ids for storages).
"""
import collections
import io
import json
import os
import pickle
import struct
import sys
import types
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SEEDS = os.path.join(HERE, "seeds")


def out(target, name, data):
    d = os.path.join(SEEDS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# --- stand-in torch modules, just enough for pickle to name the globals torch uses -------------
torch = types.ModuleType("torch")
utils = types.ModuleType("torch._utils")
for cls_name in ["FloatStorage", "HalfStorage", "BFloat16Storage", "DoubleStorage", "LongStorage", "ByteStorage"]:
    c = type(cls_name, (), {})
    c.__module__ = "torch"
    setattr(torch, cls_name, c)


def _rebuild_tensor_v2(*args):
    raise NotImplementedError


def _rebuild_parameter(*args):
    raise NotImplementedError


for fn in (_rebuild_tensor_v2, _rebuild_parameter):
    fn.__module__ = "torch._utils"
    setattr(utils, fn.__name__, fn)
torch._utils = utils
sys.modules["torch"] = torch
sys.modules["torch._utils"] = utils


class Storage:
    def __init__(self, cls, key, numel):
        self.cls, self.key, self.numel = cls, key, numel


class Tensor:
    def __init__(self, storage, offset, shape, stride):
        self.args = (storage, offset, tuple(shape), tuple(stride), False, collections.OrderedDict())

    def __reduce__(self):
        return (_rebuild_tensor_v2, self.args)


class Parameter:
    def __init__(self, t):
        self.t = t

    def __reduce__(self):
        return (_rebuild_parameter, (self.t, True, collections.OrderedDict()))


class TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", obj.cls, obj.key, "cpu", obj.numel)
        return None


def torch_pickle(obj):
    b = io.BytesIO()
    TorchPickler(b, protocol=2).dump(obj)
    return b.getvalue()


def torch_zip(pkl, storages, prefix="archive", compression=zipfile.ZIP_STORED):
    b = io.BytesIO()
    entries = [(f"{prefix}/data.pkl", pkl), (f"{prefix}/byteorder", b"little")]
    entries += [(f"{prefix}/data/{key}", data) for key, data in storages.items()]
    entries.append((f"{prefix}/version", b"3\n"))
    with zipfile.ZipFile(b, "w", compression) as z:
        for name, data in entries:
            # A fixed timestamp, so that rerunning this script rewrites the same bytes.
            z.writestr(zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0)), data, compress_type=compression)
    return b.getvalue()


def f32(vals):
    return struct.pack(f"<{len(vals)}f", *vals)


def main():
    # ---- pickle: the real data.pkl of the golden checkpoints, plus small hand-made ones --------
    for ckpt in ["segresnetv2_w8.ckpt", "dynunet_w8.ckpt", "segresnetv2_w8.state_dict.pt"]:
        with zipfile.ZipFile(os.path.join(ROOT, "tests", "fixtures", "golden", ckpt)) as z:
            name = next(n for n in z.namelist() if n.endswith("/data.pkl"))
            out("pickle", ckpt.replace(".", "_") + ".data.pkl", z.read(name))
    for proto in range(0, 6):
        out("pickle", f"dict_p{proto}.pkl",
            pickle.dumps({"a": 1, "b": "x", "c": (1.5, None, True), "d": [1, 2, b"by"], "e": 1 << 40}, protocol=proto))

    # ---- checkpoint_zip: tiny torch.save-style zips --------------------------------------------
    s0 = Storage(torch.FloatStorage, "0", 6)
    s1 = Storage(torch.HalfStorage, "1", 4)
    sd = collections.OrderedDict()
    sd["w"] = Tensor(s0, 0, [2, 3], [3, 1])
    sd["wt"] = Tensor(s0, 0, [3, 2], [1, 3])  # a transposed view of the same storage
    sd["b"] = Tensor(s1, 1, [3], [1])
    sd["p"] = Parameter(Tensor(s0, 2, [2], [2]))
    storages = {"0": f32([0.0, 1.0, 2.0, 3.0, 4.0, 5.0]), "1": struct.pack("<4e", 1.0, 2.0, -3.0, 0.5)}
    pkl = torch_pickle(sd)
    out("pickle", "torch_state_dict.pkl", pkl)
    out("checkpoint_zip", "state_dict.pkl", pkl)  # the harness wraps a bare pickle in a zip
    out("checkpoint_zip", "state_dict.pt", torch_zip(pkl, storages))
    out("checkpoint_zip", "state_dict_deflate.pt", torch_zip(pkl, storages, "sd", zipfile.ZIP_DEFLATED))
    lightning = {"epoch": 3, "global_step": 10, "state_dict": collections.OrderedDict(
        (f"model.{k}", v) for k, v in sd.items())}
    pkl = torch_pickle(lightning)
    out("pickle", "torch_lightning.pkl", pkl)
    out("checkpoint_zip", "lightning.pkl", pkl)
    out("checkpoint_zip", "lightning.ckpt", torch_zip(pkl, storages, "lightning"))
    # The safetensors path of read_checkpoint.
    out("checkpoint_zip", "tiny.safetensors", safetensors({"w": ("F32", [2, 3], f32([0, 1, 2, 3, 4, 5]))}))

    # ---- safetensors_header: a complete, tiny fastdet weights file -----------------------------
    spec = {"arch": "segresnetv2", "in_channels": 1, "init_filters": 1, "blocks_down": [1, 1, 1],
            "blocks_up": [1], "norm_groups": 1, "head_in": 2, "cls_width": 1, "offset_width": 1,
            "num_classes": 1, "stride": 2}
    meta = {"fastdet.format_version": "1", "fastdet.name": "fuzz", "fastdet.spec": json.dumps(spec),
            "fastdet.classes": json.dumps(["apo-ferritin"]), "fastdet.arch": "segresnetv2"}
    tensors = {name: ("F16", shape, bytes(2 * prod(shape))) for name, shape in segresnet_tensors(spec)}
    out("safetensors_header", "tiny_segresnet.safetensors", safetensors(tensors, meta))
    dspec = {"arch": "dynunet", "in_channels": 1, "filters": [1, 1, 1], "deep_supervision_width": 1,
             "head_in": 1, "cls_width": 1, "offset_width": 1, "num_classes": 1, "stride": 2}
    dmeta = dict(meta, **{"fastdet.spec": json.dumps(dspec), "fastdet.arch": "dynunet"})
    tensors = {name: ("F16", shape, bytes(2 * prod(shape))) for name, shape in dynunet_tensors(dspec)}
    out("safetensors_header", "tiny_dynunet.safetensors", safetensors(tensors, dmeta))
    out("safetensors_header", "header_only.safetensors", safetensors({}, meta))

    # ---- zarr_metadata: .zarray documents matching the harness's 2x2x2 <f4 chunk ---------------
    base = {"zarr_format": 2, "shape": [2, 2, 2], "chunks": [2, 2, 2], "dtype": "<f4", "fill_value": 0.0,
            "order": "C", "filters": None, "compressor": None, "dimension_separator": "."}
    out("zarr_metadata", "f4.zarray", json.dumps(base).encode())
    out("zarr_metadata", "f4_slash.zarray", json.dumps(dict(base, dimension_separator="/")).encode())
    out("zarr_metadata", "f4_missing_chunks.zarray", json.dumps(dict(base, shape=[3, 4, 2], fill_value="NaN")).encode())
    out("zarr_metadata", "u1.zarray", json.dumps(dict(base, shape=[2, 2, 8], chunks=[2, 2, 8], dtype="|u1")).encode())
    out("zarr_metadata", "i2_F.zarray", json.dumps(dict(base, shape=[2, 2, 4], chunks=[2, 2, 4], dtype="<i2", order="F")).encode())
    out("zarr_metadata", "f8.zarray", json.dumps(dict(base, shape=[1, 2, 2], chunks=[1, 2, 2], dtype="<f8")).encode())
    out("zarr_metadata", "zlib.zarray", json.dumps(dict(base, compressor={"id": "zlib", "level": 1})).encode())
    out("zarr_metadata", "blosc.zarray", json.dumps(dict(base, compressor={"id": "blosc", "cname": "lz4", "clevel": 5, "shuffle": 1, "blocksize": 0})).encode())

    # ---- copick_json ---------------------------------------------------------------------------
    pts = [{"location": {"x": 1.5, "y": 2.0, "z": 3.25}, "transformation_": [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]],
            "instance_id": 0, "score": 0.75},
           {"location": {"x": 10, "y": 20, "z": 30}}]
    out("copick_json", "picks.json", json.dumps({"pickable_object_name": "ribosome", "user_id": "u", "session_id": "0",
                                                  "run_name": "TS_1", "voxel_spacing": None, "unit": "angstrom",
                                                  "trust_orientation": True, "points": pts}, indent=2).encode())
    out("copick_json", "null_points.json", b'{"pickable_object_name": "apo-ferritin", "points": null}')


def prod(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def k3(co, ci):
    return [co, ci, 3, 3, 3]


def k1(co, ci):
    return [co, ci, 1, 1, 1]


def head_tensors(spec):
    t = []
    ci, m, o = spec["head_in"], spec["cls_width"], spec["offset_width"]
    for stem, w in [("cls_stem", m), ("offset_stem", o)]:
        t += [(f"head2.{stem}.0.weight", k3(w, ci)), (f"head2.{stem}.0.bias", [w]),
              (f"head2.{stem}.3.weight", k3(w, w)), (f"head2.{stem}.3.bias", [w])]
    t += [("head2.cls_head.weight", k1(spec["num_classes"], m)), ("head2.cls_head.bias", [spec["num_classes"]]),
          ("head2.offset_head.weight", k1(3, o)), ("head2.offset_head.bias", [3])]
    return t


def segresnet_tensors(spec):
    """Mirrors ModelSpec::required_tensors for segresnetv2."""
    f, b, t = spec["init_filters"], "backbone", []
    t.append((f"{b}.convInit.conv.weight", k3(f, spec["in_channels"])))

    def resblock(p, c):
        for n in ["norm1", "norm2"]:
            t.extend([(f"{p}.{n}.weight", [c]), (f"{p}.{n}.bias", [c])])
        t.extend([(f"{p}.conv1.conv.weight", k3(c, c)), (f"{p}.conv2.conv.weight", k3(c, c))])

    for i, nb in enumerate(spec["blocks_down"]):
        c = f << i
        if i > 0:
            t.append((f"{b}.down_layers.{i}.0.conv.weight", k3(c, c // 2)))
        for j in range(nb):
            resblock(f"{b}.down_layers.{i}.{j + 1}", c)
    levels = len(spec["blocks_down"])
    for j, nb in enumerate(spec["blocks_up"]):
        c = f << (levels - 2 - j)
        t.append((f"{b}.up_samples.{j}.0.conv.weight", k1(c, 2 * c)))
        for k in range(nb):
            resblock(f"{b}.up_layers.{j}.{k}", c)
    return t + head_tensors(spec)


def dynunet_tensors(spec):
    """Mirrors ModelSpec::required_tensors for dynunet."""
    f, b, t = spec["filters"], "backbone", []
    n = len(f)

    def block(p, co, ci):
        t.extend([(f"{p}.conv1.conv.weight", k3(co, ci)), (f"{p}.conv2.conv.weight", k3(co, co))])

    block(f"{b}.input_block", f[0], spec["in_channels"])
    for i in range(n - 2):
        block(f"{b}.downsamples.{i}", f[i + 1], f[i])
    block(f"{b}.bottleneck", f[n - 1], f[n - 2])
    for k in range(n - 2):
        ci, co = f[n - 1 - k], f[n - 2 - k]
        t.append((f"{b}.upsamples.{k}.transp_conv.conv.weight", [ci, co, 2, 2, 2]))
        block(f"{b}.upsamples.{k}.conv_block", co, 2 * co)
    w = spec["deep_supervision_width"]
    t += [(f"{b}.deep_supervision_heads.0.conv.conv.weight", k1(w, f[1])),
          (f"{b}.deep_supervision_heads.0.conv.conv.bias", [w])]
    return t + head_tensors(spec)


def safetensors(tensors, metadata=None):
    header, blobs, off = {}, [], 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name in sorted(tensors):
        dtype, shape, data = tensors[name]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


if __name__ == "__main__":
    main()
