"""fastdet against the libraries its users' files come from and go to, on the bundled sample.

copick (its project layout, OME-Zarr writer and pick files):
1. copick writes a project: the sample's two tomograms (its OME-Zarr writer, a 3-level pyramid)
   and their ground truth (user `curation`), through its own API.
2. `fastdet run --copick-config` on that project gives the picks, byte for byte, of `fastdet run
   --data` on the sample's own files, and `fastdet score --copick-config` the score of `--truth`.
3. copick reads the picks fastdet wrote with `--copick-out`: one file per run and particle, found
   under user `fastdet`, session `0`, whose centres (`full_positions`) and scores are the CSV's.
4. Truth points that copick places by location plus transformation (a translation and a rotation,
   as subtomogram averaging leaves them) score as the plain points did, and the locations alone
   do not (the translations are larger than the match radii).
5. A tomogram of 5.006 Å voxels (the sample's, each voxel repeated 2x2x2), written by copick with
   its pyramid: `--voxel-size file --level auto` reads the 10.012 Å level and gives the sample's
   picks and score.

mrcfile (MRC2014) and starfile (RELION's STAR, as read in Python):
6. The sample written by mrcfile as float32 MRC files gives the sample's picks byte for byte;
   float16 (mode 12), int8 (0), int16 (1) and uint16 (6) the picks of the same values as float32
   (negative values and values above int16's range included); files stored in other axis orders
   (mapc/mapr/maps 3,2,1 and 2,3,1) those of the standard order.
7. starfile reads fastdet's `--star-out` files: per run the CSV's picks, in voxels and in Å from
   the centre as the README states, classes numbered as the header names them.

safetensors (numpy), fastdet's `--save-maps` files as their metadata describes them:
8. Each pick is a peak of its class's score map, with the score the CSV gives, at the position
   `((i + 0.5) * stride + offset) * voxel size` the layout note states.

zarr-python 3 (zarr v3, OME-Zarr 0.5), stores written by tools/interop_zarr3.py in its own venv:
9. `fastdet run --zarr --voxel-size file` on sharded (blosc, gzip) and plainly chunked (zstd)
   float32 stores (the array at `s0`, named by the `ome` metadata, which also gives the voxel size)
   gives the sample's picks byte for byte; a sharded float16 store those of the float16 MRC files
   (6). Skipped, saying so, when zarr-python 3 could not be installed.

Usage: python tools/interop_check.py FASTDET_BINARY REPO_ROOT [ZARR3_STORES]
Prints one line per check; exits non-zero at the first that fails.
"""

import csv
import json
import os
import subprocess
import sys
import tempfile

import copick
import mrcfile
import numpy as np
import starfile
import zarr
from safetensors.numpy import load_file

PARTICLES = ["apo-ferritin", "beta-amylase", "beta-galactosidase", "ribosome", "thyroglobulin", "virus-like-particle"]
RUNS = ["TS_synth_1", "TS_synth_2"]
# The quickstart's settings (tools/quickstart.sh; the sample is 80x160x160 voxels), on the CPU
# whatever the machine has: the checks compare files, not devices.
RUN_ARGS = ["--window", "64,96,96", "--tiles", "2,3,3", "--with-score", "--device", "cpu"]


def fastdet(binary, *args):
    p = subprocess.run([binary, *args], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"interop-check: fastdet {' '.join(args)} exited {p.returncode}:\n{p.stderr}")
    return p.stdout


def total_score(stdout):
    line = next(l for l in stdout.splitlines() if l.startswith("total"))
    return line.split()[-1]


def sample_truth(sample, run, particle):
    with open(f"{sample}/overlay/ExperimentRuns/{run}/Picks/{particle}.json") as f:
        pts = json.load(f)["points"]
    return np.array([[p["location"][a] for a in "xyz"] for p in pts], dtype=float).reshape(-1, 3)


def sample_volume(sample, run):
    return np.array(zarr.open(f"{sample}/static/ExperimentRuns/{run}/VoxelSpacing10.000/denoised.zarr", mode="r")["0"])


def expect_score(binary, cfg, picks, want, what):
    got = total_score(fastdet(binary, "score", "--copick-config", cfg, picks))
    if got != want:
        sys.exit(f"interop-check: F-beta {what} {got}, from the sample's own files {want}")
    return got


def write_project(d, sample, voxel_size=10.012):
    """The sample as a copick project written by copick: tomograms and truth in the overlay. At a
    voxel size of 10.012 / k each voxel is repeated k times along each axis (the same Å)."""
    cfg = {
        "name": "fastdet copick check",
        "config_type": "filesystem",
        "overlay_root": f"local://{d}/overlay",
        "overlay_fs_args": {"auto_mkdir": True},
        "pickable_objects": [{"name": n, "is_particle": True, "label": i + 1, "radius": 60.0} for i, n in enumerate(PARTICLES)],
    }
    path = f"{d}/copick.json"
    with open(path, "w") as f:
        json.dump(cfg, f, indent=1)
    root = copick.from_file(path)
    for name in RUNS:
        volume = sample_volume(sample, name)
        k = round(10.012 / voxel_size)
        for axis in range(3):
            volume = np.repeat(volume, k, axis=axis)
        run = root.new_run(name)
        run.new_voxel_spacing(voxel_size).new_tomogram("denoised").from_numpy(volume)
        for particle in PARTICLES:
            picks = run.new_picks(particle, session_id="0", user_id="curation")
            picks.from_numpy(sample_truth(sample, name, particle))
            picks.store()
    return path


def rotation(rng):
    q = rng.normal(size=4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


def main():
    binary, repo = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
    zarr3 = os.path.abspath(sys.argv[3]) if len(sys.argv) > 3 else None
    data = f"{repo}/tests/fixtures/dataset"
    sample = f"{data}/test"
    weights = [f"{repo}/weights/demo_segresnetv2.safetensors", f"{repo}/weights/demo_dynunet.safetensors"]
    print(f"interop-check: copick {copick.__version__}, mrcfile {mrcfile.__version__}, zarr {zarr.__version__}, numpy {np.__version__}")
    with tempfile.TemporaryDirectory() as d:
        cfg = write_project(d, sample)

        # 2. The same picks and score as from the sample's own files.
        by_data, by_copick = f"{d}/data.csv", f"{d}/copick.csv"
        fastdet(binary, "run", "--data", data, "--split", "test", "--weights", *weights, *RUN_ARGS, "--out", by_data)
        overlay = f"{d}/overlay"
        fastdet(binary, "run", "--copick-config", cfg, "--weights", *weights, *RUN_ARGS, "--out", by_copick, "--copick-out", overlay)
        with open(by_data) as a, open(by_copick) as b:
            text = b.read()
            if a.read() != text:
                sys.exit("interop-check: the picks from copick's tomograms differ from the sample's")
        rows = list(csv.DictReader(text.splitlines()))
        # Every comparison below is against these picks: they must be there to compare (64 today).
        found = {(r["experiment"], r["particle_type"]) for r in rows}
        if len(rows) < 50 or len(found) != len(RUNS) * len(PARTICLES):
            sys.exit(f"interop-check: the sample gave {len(rows)} picks, of {len(found)} run-particle pairs: too few to compare")
        print(f"ok: fastdet reads copick's tomograms: {len(rows)} picks, byte-identical to --data's")
        want = total_score(fastdet(binary, "score", "--truth", data, "--split", "test", by_data))
        got = expect_score(binary, cfg, by_copick, want, "against copick's truth")
        print(f"ok: truth written by copick scores as the sample's: F-beta {got}")

        # 3. copick reads fastdet's picks.
        root = copick.from_file(cfg)
        if sorted(r.name for r in root.runs) != RUNS:
            sys.exit(f"interop-check: copick lists runs {[r.name for r in root.runs]}")
        files = 0
        for run in root.runs:
            for particle in PARTICLES:
                mine = [r for r in rows if r["experiment"] == run.name and r["particle_type"] == particle]
                picks = run.get_picks(object_name=particle, user_id="fastdet", session_id="0")
                if len(picks) != 1:
                    sys.exit(f"interop-check: {run.name} {particle}: copick finds {len(picks)} fastdet pick files")
                centres, scores = picks[0].full_positions(), picks[0].scores()
                if len(centres) != len(mine):
                    sys.exit(f"interop-check: {run.name} {particle}: copick reads {len(centres)} points, the CSV has {len(mine)}")
                if mine:
                    # The CSV keeps 3 decimals of Å and 6 of the score; copick reads the file's full values.
                    csv_centres = np.array([[float(r[a]) for a in "xyz"] for r in mine])
                    csv_scores = np.array([float(r["score"]) for r in mine])
                    order, csv_order = np.lexsort(centres.T), np.lexsort(csv_centres.T)
                    dx = np.abs(centres[order] - csv_centres[csv_order]).max()
                    ds = np.abs(scores[order] - csv_scores[csv_order]).max()
                    if dx > 0.0005 + 1e-9 or ds > 5e-7 + 1e-9:
                        sys.exit(f"interop-check: {run.name} {particle}: copick's points differ from the CSV's by {dx} Å, scores by {ds}")
                files += 1
        print(f"ok: copick reads fastdet's {files} pick files: centres and scores are the CSV's")

        # 4. Truth placed by location plus transformation scores the same. The translations (100 to
        # 200 Å along each axis, beyond every particle's match radius) must matter: the locations
        # alone, without them, score otherwise.
        rng = np.random.default_rng(7)
        moved = {}
        for run in root.runs:
            for particle in PARTICLES:
                centres = sample_truth(sample, run.name, particle)
                transforms = np.tile(np.eye(4), (len(centres), 1, 1))
                for t in transforms:
                    t[:3, :3] = rotation(rng)
                    t[:3, 3] = rng.uniform(100, 200, size=3) * rng.choice([-1, 1], size=3)
                moved[run.name, particle] = (centres, transforms)

        def write_truth(with_transforms):
            for (name, particle), (centres, transforms) in moved.items():
                picks = root.get_run(name).get_picks(object_name=particle, user_id="curation", session_id="0")[0]
                picks.from_numpy(centres - transforms[:, :3, 3], transforms if with_transforms else None)
                picks.store()

        write_truth(False)
        unmoved = total_score(fastdet(binary, "score", "--copick-config", cfg, by_copick))
        if unmoved == want:
            sys.exit(f"interop-check: the locations without their translations score as the truth does ({want}): the check below would prove nothing")
        write_truth(True)
        for (name, particle), (centres, _) in moved.items():
            back = copick.from_file(cfg).get_run(name).get_picks(object_name=particle, user_id="curation")[0]
            if np.abs(back.full_positions() - centres).max() > 1e-6:
                sys.exit("interop-check: copick does not place the moved points where they were")
        got = expect_score(binary, cfg, by_copick, want, "against truth moved by transformations")
        print(f"ok: truth placed by location + transformation scores as before: F-beta {got} (the locations alone: {unmoved})")

        # 5. A copick pyramid of a finer tomogram: --level auto reads the level at the models' voxel size.
        fine = f"{d}/fine"
        os.makedirs(fine)
        cfg = write_project(fine, sample, voxel_size=5.006)
        by_level = f"{d}/level.csv"
        out = fastdet(binary, "run", "--copick-config", cfg, "--voxel-size", "file", "--level", "auto", "--weights", *weights, *RUN_ARGS, "--out", by_level)
        with open(by_level) as f:
            level_rows = list(csv.DictReader(f))
        if len(level_rows) != len(rows):
            sys.exit(f"interop-check: {len(level_rows)} picks from the 5.006 Å pyramid, {len(rows)} from the sample\n{out}")
        key = lambda r: (r["experiment"], r["particle_type"], float(r["x"]), float(r["y"]), float(r["z"]))
        dx = ds = 0.0
        for a, b in zip(sorted(rows, key=key), sorted(level_rows, key=key)):
            if (a["experiment"], a["particle_type"]) != (b["experiment"], b["particle_type"]):
                sys.exit(f"interop-check: the 5.006 Å pyramid's picks are not the sample's: {a} / {b}")
            dx = max(dx, *(abs(float(a[c]) - float(b[c])) for c in "xyz"))
            ds = max(ds, abs(float(a["score"]) - float(b["score"])))
        # The level is copick's 2x2x2 mean of repeated voxels: the sample's values, to float rounding.
        if dx > 0.01 or ds > 1e-4:
            sys.exit(f"interop-check: the 5.006 Å pyramid's picks differ from the sample's by {dx} Å, scores by {ds}")
        got = expect_score(binary, cfg, by_level, want, "from the 5.006 Å pyramid")
        print(f"ok: a 5.006 Å copick pyramid with --level auto: the sample's picks (within {dx:.4f} Å, scores {ds:.1e}), F-beta {got}")

        # 6. MRC files written by mrcfile.
        mrc = f"{d}/mrc"
        os.makedirs(mrc)
        volumes = {name: sample_volume(sample, name) for name in RUNS}

        def write_mrc(folder, make):
            os.makedirs(f"{mrc}/{folder}")
            paths = []
            for name, volume in volumes.items():
                paths.append(f"{mrc}/{folder}/{name}.mrc")
                with mrcfile.new(paths[-1]) as m:
                    make(m, volume)
                    m.voxel_size = 10.012
            return paths

        def picks_of(paths, *extra):
            out = f"{mrc}/{os.path.basename(os.path.dirname(paths[0]))}.csv"
            fastdet(binary, "run", "--mrc", *paths, "--weights", *weights, *RUN_ARGS, "--out", out, *extra)
            with open(out) as f:
                return f.read()

        star = f"{mrc}/star"
        f32 = picks_of(write_mrc("f32", lambda m, v: m.set_data(v.astype(np.float32))), "--star-out", star)
        if f32 != text:
            sys.exit("interop-check: the picks from mrcfile's float32 files differ from the sample's")
        f16 = picks_of(write_mrc("f16", lambda m, v: m.set_data(v.astype(np.float16))))
        f16_as_f32 = picks_of(write_mrc("f16_as_f32", lambda m, v: m.set_data(v.astype(np.float16).astype(np.float32))))
        if f16 != f16_as_f32:
            sys.exit("interop-check: mode 12 (float16) is not read as the same values in mode 2")

        # Other storage orders: mapc/mapr/maps name the axis (1 x, 2 y, 3 z) of the columns, rows
        # and sections. 3,2,1 is its own inverse; 2,3,1 is not, so reading it inverted would fail.
        def stored(order):
            def make(m, v):
                # v is indexed [z][y][x]; the file's array is [section][row][column].
                zyx = {3: 0, 2: 1, 1: 2}
                m.set_data(np.ascontiguousarray(v.transpose(zyx[order[2]], zyx[order[1]], zyx[order[0]])))
                m.header.mapc, m.header.mapr, m.header.maps = order
            return make

        for order in ((3, 2, 1), (2, 3, 1)):
            if picks_of(write_mrc("order_" + "".join(map(str, order)), stored(order))) != text:
                sys.exit(f"interop-check: an MRC file stored with mapc/mapr/maps {order} gives other picks")
        # Integer modes 0 (int8), 1 (int16) and 6 (uint16), as IMOD and others write them: the sample
        # quantised to 255 levels, stored as -127..127 (int8, int16: negative values) and as
        # 30000..30254 (uint16: above int16's range), against float32 of 0..254. fastdet's [0, 1]
        # scaling, (v - min) / (max - min) in f64, makes a shift of whole numbers exact: the picks
        # must be the same, and a sign read wrongly would change them.
        def quantised(dtype, shift):
            def make(m, v):
                m.set_data((np.round((v - v.min()) / (v.max() - v.min()) * 254) + shift).astype(dtype))
            return make

        as_f32 = picks_of(write_mrc("q_f32", quantised(np.float32, 0)))
        for dtype, shift in ((np.int8, -127), (np.int16, -127), (np.uint16, 30000)):
            if picks_of(write_mrc(f"q_{np.dtype(dtype).name}", quantised(dtype, shift))) != as_f32:
                sys.exit(f"interop-check: an MRC file of {np.dtype(dtype).name} is not read as the same values in float32")
        print("ok: mrcfile's MRC files: float32 the sample's picks; float16, int8, int16, uint16 those of their values; two other storage orders the standard order's")

        # 7. starfile reads the STAR files.
        classes = ["apo-ferritin", "beta-galactosidase", "ribosome", "thyroglobulin", "virus-like-particle", "beta-amylase"]
        for name in RUNS:
            path = f"{star}/{name}.star"
            with open(path) as f:
                header = f.read()
            if "_rlnClassNumber " + ", ".join(f"{i + 1} {c}" for i, c in enumerate(classes)) not in header:
                sys.exit(f"interop-check: {path} does not name the classes as expected")
            table = starfile.read(path)
            mine = [r for r in rows if r["experiment"] == name]
            if len(table) != len(mine) or set(table["rlnTomoName"]) != {name}:
                sys.exit(f"interop-check: starfile reads {len(table)} rows of {set(table['rlnTomoName'])} from {path}, the CSV has {len(mine)} of {name}")
            depth, height, width = volumes[name].shape
            for (_, s_row), c_row in zip(table.iterrows(), mine):
                if classes[int(s_row["rlnClassNumber"]) - 1] != c_row["particle_type"] or abs(s_row["rlnAutopickFigureOfMerit"] - float(c_row["score"])) > 1e-6:
                    sys.exit(f"interop-check: {path}: {dict(s_row)} is not the CSV's {c_row}")
                for axis, size in zip("XYZ", (width, height, depth)):
                    a = float(c_row[axis.lower()])
                    in_voxels = s_row[f"rlnCoordinate{axis}"] * 10.012
                    centred = s_row[f"rlnCenteredCoordinate{axis}Angst"] + size / 2 * 10.012
                    if abs(in_voxels - a) > 0.0005 + 1e-4 or abs(centred - a) > 0.0005 + 1e-5:
                        sys.exit(f"interop-check: {path}: {axis} {in_voxels} / {centred} Å, the CSV's {a}")
        print(f"ok: starfile reads fastdet's STAR files: the CSV's picks in voxels and in Å from the centre")

        # 8. The maps fastdet saves, read with safetensors.
        maps = f"{d}/maps"
        fastdet(binary, "run", "--data", data, "--split", "test", "--weights", *weights, *RUN_ARGS, "--out", f"{d}/maps.csv", "--save-maps", maps)
        with open(f"{d}/maps.csv") as f:
            if f.read() != text:
                sys.exit("interop-check: --save-maps changed the picks")
        for name in RUNS:
            path = f"{maps}/{name}.safetensors"
            with open(path, "rb") as f:
                meta = json.loads(f.read(int.from_bytes(f.read(8), "little")))["__metadata__"]
            tensors = load_file(path)
            classes = json.loads(meta["fastdet.classes"])
            stride, voxel = int(meta["fastdet.stride"]), float(meta["fastdet.voxel_size_angstrom"])
            scores, offsets = tensors["scores"], tensors["offsets"]
            cells = [-(-n // stride) for n in json.loads(meta["fastdet.volume_shape"])]
            if meta["fastdet.run"] != name or scores.shape != (len(classes), *cells) or offsets.shape != (3, *cells):
                sys.exit(f"interop-check: {path}: {meta}, scores {scores.shape}, offsets {offsets.shape}")
            mine = [r for r in rows if r["experiment"] == name]
            for r in mine:
                c = classes.index(r["particle_type"])
                # The cell whose score is the pick's (6 decimals in the CSV) and whose position is the pick's.
                zs, ys, xs = np.nonzero(np.abs(scores[c] - float(r["score"])) <= 5e-7 + 1e-7)
                at = [np.array([(i + 0.5) * stride + offsets[a, z, y, x] for a, i in enumerate((x, y, z))]) * voxel for z, y, x in zip(zs, ys, xs)]
                want = np.array([float(r[a]) for a in "xyz"])
                near = [(np.abs(p - want).max(), (z, y, x)) for p, z, y, x in zip(at, zs, ys, xs)]
                if not near or min(near)[0] > 0.0005 + 1e-3:
                    sys.exit(f"interop-check: {path}: no cell of {r['particle_type']} holds the pick {r}")
                z, y, x = min(near)[1]
                window = scores[c, max(z - 1, 0):z + 2, max(y - 1, 0):y + 2, max(x - 1, 0):x + 2]
                if scores[c, z, y, x] < window.max():
                    sys.exit(f"interop-check: {path}: the pick {r} is not a peak of its score map")
        print(f"ok: safetensors reads the saved maps; each pick is a peak of its class's map, with its score, where the layout note places it")

        # 9. zarr v3 stores written by zarr-python 3.
        if zarr3 is None:
            print("interop-check: NOTE: zarr-python 3's stores not checked (not installed)")
            print("interop-check: passed")
            return
        variants = sorted(os.listdir(zarr3))
        if len(variants) < 4:
            sys.exit(f"interop-check: {zarr3} holds {variants}, not the stores of tools/interop_zarr3.py")
        for variant in variants:
            out = f"{d}/zarr3_{variant}.csv"
            # --voxel-size file: the voxel size must come from the OME 0.5 metadata (under "ome").
            fastdet(binary, "run", "--zarr", *(f"{zarr3}/{variant}/{name}.zarr" for name in RUNS), "--voxel-size", "file", "--weights", *weights, *RUN_ARGS, "--out", out)
            with open(out) as f:
                if f.read() != (f16 if "f16" in variant else text):
                    sys.exit(f"interop-check: the picks from zarr-python 3's {variant} stores are not those of the same values")
        print(f"ok: zarr-python 3's v3 stores ({', '.join(variants)}): the picks of the same values")
    print("interop-check: passed")


if __name__ == "__main__":
    main()
