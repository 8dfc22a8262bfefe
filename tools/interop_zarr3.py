"""Writes the bundled sample's two tomograms as OME-Zarr 0.5 stores with zarr-python 3 (zarr v3:
`zarr.json`, dimension names, the `ome` attribute), in the codec layouts such stores come in, for
tools/interop_check.py to read back through fastdet. Runs in its own venv (copick needs zarr 2).

Usage: python tools/interop_zarr3.py REPO_ROOT OUTDIR
Writes OUTDIR/{variant}/{run}.zarr.
"""

import os
import sys

import numpy as np
import zarr
from zarr.codecs import BloscCodec, GzipCodec, ZstdCodec

RUNS = ["TS_synth_1", "TS_synth_2"]
VARIANTS = {
    # Shards of 32³ chunks, blosc-zstd with bit shuffling.
    "sharded_blosc": dict(shards=(64, 128, 128), chunks=(32, 32, 32), compressors=BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")),
    # Plain chunks that do not divide the volume, zstd.
    "chunked_zstd": dict(chunks=(40, 64, 64), compressors=ZstdCodec(level=3)),
    # One shard holding the whole volume, gzip.
    "one_shard_gzip": dict(shards=(80, 160, 160), chunks=(16, 80, 80), compressors=GzipCodec(level=4)),
    # float16, sharded, uncompressed.
    "sharded_f16": dict(shards=(64, 64, 64), chunks=(16, 16, 16), compressors=None, dtype="float16"),
}


def main():
    repo, out = sys.argv[1], sys.argv[2]
    print(f"interop-check: zarr {zarr.__version__} writes {len(VARIANTS)} v3 layouts")
    for name in RUNS:
        source = f"{repo}/tests/fixtures/dataset/test/static/ExperimentRuns/{name}/VoxelSpacing10.000/denoised.zarr"
        volume = np.array(zarr.open_group(source, mode="r")["0"])
        for variant, settings in VARIANTS.items():
            settings = dict(settings)
            dtype = settings.pop("dtype", "float32")
            os.makedirs(f"{out}/{variant}", exist_ok=True)
            group = zarr.open_group(f"{out}/{variant}/{name}.zarr", mode="w", zarr_format=3)
            # The array at "s0", as some writers name levels: found through the multiscales list.
            array = group.create_array("s0", shape=volume.shape, dtype=dtype, dimension_names=("z", "y", "x"), **settings)
            array[:] = volume.astype(dtype)
            axes = [{"name": a, "type": "space", "unit": "angstrom"} for a in "zyx"]
            scale = [{"type": "scale", "scale": [10.012] * 3}]
            group.attrs["ome"] = {"version": "0.5", "multiscales": [{"name": name, "axes": axes, "datasets": [{"path": "s0", "coordinateTransformations": scale}]}]}


if __name__ == "__main__":
    main()
