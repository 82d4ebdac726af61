"""``patchsearch`` command line: a thin layer over :mod:`patchsearch.pipeline` and :class:`PatchIndex`.

Errors a user can cause print one line ``error: ...`` on stderr and exit 1
(``--debug`` shows the traceback instead).
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from .errors import InputError, PatchsearchError

DEFAULT_INDEX_DIR = "./indexes"


def _fail(msg: str) -> None:
    click.echo(f"error: {msg}", err=True)
    sys.exit(1)


def _friendly(fn):
    """Turn PatchsearchError (and a few OS errors) into a one-line message and exit 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        ctx = click.get_current_context()
        if ctx.find_root().params.get("debug"):
            return fn(*args, **kwargs)
        try:
            return fn(*args, **kwargs)
        except PatchsearchError as exc:
            _fail(str(exc))
        except (OSError, MemoryError) as exc:
            _fail(f"{type(exc).__name__}: {exc}")

    return wrapper


def _data_root_option(fn):
    return click.option("--data-root", type=click.Path(path_type=Path), default=None,
                        help="MVTec AD root [default: $PATCHSEARCH_DATA_ROOT, else ./datasets/MVTecAD]")(fn)


def _index_dir_option(fn):
    return click.option("--index-dir", type=click.Path(path_type=Path), default=DEFAULT_INDEX_DIR,
                        show_default=True, help="where indexes live (<index-dir>/<category>/)")(fn)


def _index_options(fn):
    """--index, --ivf-layout, --nlist, --pq-m, --pq-bits, --nprobe, --rerank (build and rebuild)."""
    from .ivf import LAYOUTS

    opts = [
        click.option("--index", "index_type", type=click.Choice(["flat", "ivf", "ivfpq"]), default=None,
                     help="flat (exact L2) or ivf (compressed, re-ranked exactly; ivfpq: the same) "
                          "[build default: flat; rebuild: as before]"),
        click.option("--ivf-layout", "layout", type=click.Choice(list(LAYOUTS)), default=None,
                     help="IVF code layout [auto: rabitqfs; rebuild: as before]"),
        click.option("--nlist", type=click.IntRange(min=1), default=None, help="IVF lists [auto]"),
        click.option("--pq-m", type=click.IntRange(min=1), default=None,
                     help="PQ sub-quantizers (PQ layouts) [auto]"),
        click.option("--pq-bits", type=click.IntRange(min=1, max=16), default=None,
                     help="bits per PQ code (layout pq) [8; fast scan: 4]"),
        click.option("--nprobe", type=click.IntRange(min=1), default=None,
                     help="IVF lists visited per query [auto: the smallest with recall@9 >= 0.97 on held-aside patches]"),
        click.option("--rerank", type=click.IntRange(min=0), default=None,
                     help="IVF candidates per neighbour re-ranked exactly [8]; 0 = code distances"),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _device_option(fn):
    """--device cpu|cuda|cuda:N|auto (every command that embeds or searches)."""
    from .device import HELP

    return click.option("--device", default="auto", show_default=True, metavar="cpu|cuda|cuda:N|auto", help=HELP)(fn)


def _device(value: str) -> str:
    """The resolved --device (one-line InputError naming --device: malformed, or no such GPU)."""
    from .device import resolve_device

    return resolve_device(value, "--device")


def _index_params(nlist, pq_m, pq_bits, nprobe, rerank, layout=None) -> dict:
    given = {"nlist": nlist, "pq_m": pq_m, "pq_bits": pq_bits, "nprobe": nprobe, "rerank": rerank, "layout": layout}
    return {k: v for k, v in given.items() if v is not None}


def _summary(index) -> str:
    return json.dumps({"index": str(index.path), "type": index.index_type, "memory_bank": index.size,
                       "dim": index.dim, "shards": len(index.shards), "ivfpq": index.params or None,
                       "timings": index.manifest.timings})


def _data_root(value):
    from .data import default_data_root

    return value if value is not None else default_data_root()


@click.group()
@click.option("--debug", is_flag=True, help="show Python tracebacks on errors")
@click.version_option(package_name="patchsearch")
def main(debug):
    """FAISS-backed PatchCore memory banks: build, query, evaluate."""


@main.command()
@click.option("--category", required=True, help="MVTec AD category, e.g. bottle")
@_data_root_option
@_index_dir_option
@click.option("--backbone", default="efficientnet_lite1", show_default=True,
              help="efficientnet_lite0/1/2 or a torchvision model (wide_resnet50_2 = the paper's)")
@click.option("--layers", default=None, help="comma-separated feature nodes [default: stride-8 and 16 stages]")
@click.option("--weights", type=click.Path(path_type=Path), default=None,
              help="state-dict file instead of the default ImageNet weights")
@click.option("--embed-dim", type=click.IntRange(min=1), default=None, help="reduce embeddings to this dimension")
@click.option("--input-norm", type=click.Choice(["auto", "imagenet", "native"]), default="auto", show_default=True,
              help="backbone input normalisation: the weights' own (native; EfficientNet-Lite: (pixel - 127) / 128, "
                   "torchvision: ImageNet), ImageNet mean/std, or auto: ImageNet with --crop (the paper protocol), "
                   "else native; recorded in the manifest")
@click.option("--resize", type=click.IntRange(min=1), default=256, show_default=True,
              help="shorter side of the backbone input, pixels (the whole frame, aspect from the training frames)")
@click.option("--crop", type=click.IntRange(min=1), default=None,
              help="the paper's protocol instead: resize, then centre-crop CROP x CROP (borders unseen)")
@click.option("--orient", type=click.Choice(["auto", "fixed"]), default="fixed", show_default=True,
              help="auto: frames whose longer side lies across the input's are turned 90 degrees first "
                   "(their maps turned back); fixed: never turned")
@click.option("--tile", type=click.IntRange(min=16), default=None,
              help="cut the resized frame into TILE x TILE tiles, embedded separately and stitched back")
@click.option("--tile-overlap", type=click.IntRange(min=0), default=None, help="tile overlap, pixels [32]")
@click.option("--bit-depth", type=click.Choice(["8", "10", "12", "16"]), default=None,
              help="camera bit depth of frames over 8 bits [from the file: 16]")
@click.option("--calibration-fraction", type=float, default=0.1, show_default=True,
              help="share of train/good held aside to fit the threshold (unless the category has validation/good)")
@click.option("--target-fpr", type=float, default=None,
              help="share of good calibration frames allowed above the threshold [0]")
@click.option("--margin", type=float, default=None, help="threshold = (1 + margin) x that quantile [0.1]")
@click.option("--min-region-area", type=click.IntRange(min=0), default=0, show_default=True,
              help="smallest defect region reported, frame pixels")
@click.option("--coreset-ratio", type=float, default=0.1, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--shards", type=click.IntRange(min=1), default=1, show_default=True)
@_index_options
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="image-decoding worker processes")
@click.option("--ray", "ray_address", is_flag=False, flag_value="auto", default=None, metavar="[ADDRESS]",
              help="embed on a Ray cluster: the running one (no ADDRESS, or auto), 'local', or HOST:PORT "
                   "(the [ray] extra; the index dir must be on storage every node mounts)")
@click.option("--ray-workers", type=click.IntRange(min=1), default=None,
              help="Ray embedding actors [one per GPU, else one per CPU of the cluster]")
@_device_option
@_friendly
def build(category, data_root, index_dir, backbone, layers, weights, embed_dim, input_norm, resize, crop, orient, tile,
          tile_overlap, bit_depth, calibration_fraction, target_fpr, margin, min_region_area, coreset_ratio, seed, shards,
          index_type, layout, nlist, pq_m, pq_bits, nprobe, rerank, batch_size, workers, ray_address, ray_workers,
          device):
    """Build the memory-bank index of CATEGORY from its train/good images, and calibrate it."""
    from .data import train_images, validation_images
    from .pipeline import build as run_build

    device = _device(device)
    root = _data_root(data_root)
    paths = train_images(root, category)
    index = run_build(paths, index_dir / category, category=category, data_root=root / category, backbone=backbone,
                      layers=layers.split(",") if layers else None, weights=weights, embed_dim=embed_dim,
                      input_norm=input_norm, resize=resize, crop=crop, orient=orient, tile=tile,
                      tile_overlap=tile_overlap,
                      bit_depth=int(bit_depth) if bit_depth else None,
                      calibration_images=validation_images(root, category), calibration_fraction=calibration_fraction,
                      target_fpr=target_fpr, margin=margin, min_region_area=min_region_area,
                      coreset_ratio=coreset_ratio, seed=seed, shards=shards,
                      index=index_type or "flat", index_params=_index_params(nlist, pq_m, pq_bits, nprobe, rerank, layout),
                      batch_size=batch_size, workers=workers, ray_address=ray_address,
                      ray_options=None if ray_workers is None else {"num_workers": ray_workers},
                      progress=sys.stderr.isatty(),
                      log=lambda m: click.echo(m, err=True), device=device)
    click.echo(_summary(index))


@main.command()
@click.option("--category", required=True)
@_index_dir_option
@click.option("--coreset-ratio", type=float, default=None, help="[as before]")
@click.option("--seed", type=int, default=None, help="[as before]")
@click.option("--shards", type=click.IntRange(min=1), default=None, help="[as before]")
@_index_options
@_data_root_option
@click.option("--weights", type=click.Path(path_type=Path), default=None,
              help="the state-dict file the index was built with (to re-fit the thresholds)")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@_device_option
@_friendly
def rebuild(category, index_dir, coreset_ratio, seed, shards, index_type, layout, nlist, pq_m, pq_bits, nprobe,
            rerank, data_root, weights, batch_size, device):
    """Rebuild CATEGORY's index from its Arrow patch store (no training images).

    Where the memory bank changes, the thresholds are re-fitted on the recorded held-aside
    good frames (under --data-root, else where they were recorded), with the backbone; where
    they cannot be, nothing is installed and the error says why.
    """
    from .pipeline import rebuild as run_rebuild

    device = _device(device)
    index = run_rebuild(index_dir / category, coreset_ratio=coreset_ratio, seed=seed, shards=shards,
                        index=index_type, index_params=_index_params(nlist, pq_m, pq_bits, nprobe, rerank, layout),
                        data_root=_data_root(data_root) / category, weights=str(weights) if weights else None,
                        batch_size=batch_size, progress=sys.stderr.isatty(), log=lambda m: click.echo(m, err=True),
                        device=device)
    click.echo(_summary(index))


def _load(index_dir: Path, category: str, nprobe: int | None = None, backbone: str | None = None,
          embed_dim: int | None = None, weights: Path | None = None, device: str = "auto"):
    from .index import PatchIndex

    device = _device(device)
    index = PatchIndex.load(index_dir / category, nprobe=nprobe, backbone=backbone, embed_dim=embed_dim,
                            device=device)
    if weights is not None:  # an index built with --weights: its embedder needs the file
        from .embedders import embedder_for

        embedder_for(index, str(weights))
    return index


def _query_options(fn):
    """--nprobe, --weights, --device, and --backbone / --embed-dim as expectations checked against the index."""
    fn = _device_option(fn)
    fn = click.option("--weights", type=click.Path(path_type=Path), default=None,
                      help="the state-dict file the index was built with, if it was built with --weights")(fn)
    fn = click.option("--embed-dim", type=click.IntRange(min=1), default=None,
                      help="fail unless the index holds embeddings of this dimension")(fn)
    fn = click.option("--backbone", default=None, help="fail unless the index was built with this backbone")(fn)
    return click.option("--nprobe", type=click.IntRange(min=1), default=None,
                        help="IVF: lists visited per query [as built]")(fn)


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--category", required=True)
@_index_dir_option
@click.option("--maps", "maps_dir", type=click.Path(path_type=Path), default=None,
              help="write per frame a heatmap PNG over the frame and the raw map (.npy) into this folder")
@click.option("--threshold", type=float, default=None, help="image threshold (L2) instead of the calibrated one")
@click.option("--k", type=click.IntRange(min=1), default=9, show_default=True, help="neighbours per patch")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--max-pixels", type=click.IntRange(min=1), default=None,
              help="refuse frames of more pixels (width x height, from the header) [67108864 = 8192 x 8192]")
@_query_options
@_friendly
def query(images, category, index_dir, maps_dir, threshold, k, batch_size, max_pixels, nprobe, weights, backbone,
          embed_dim, device):
    """Judge IMAGES (files or folders): one JSON line per frame.

    Each line has the decision (OK / NG / ERROR), image score (Eq. 7, L2), normalised
    score and threshold, defect regions in frame pixels, and the top patch's k nearest
    memory-bank L2 distances and locations (the training image and patch they came
    from). A frame that cannot be judged is ERROR with a "reason" (unreadable,
    too_large, unsupported_format, non_finite_pixels, out_of_range_pixels, uncalibrated,
    non_finite_score) and an "error" message; the exit status is then 1.
    """
    from .data import list_images
    from .query import iter_query
    from .report import record, write_maps

    index = _load(index_dir, category, nprobe, backbone, embed_dim, weights, device)
    if k > index.size:
        raise InputError(f"--k {k} is larger than the memory bank ({index.size} vectors)")
    paths = list_images(images)
    if maps_dir is not None:
        maps_dir.mkdir(parents=True, exist_ok=True)
    failed = 0
    written: set[Path] = set()
    uncalibrated = False
    for part in iter_query(index, paths, k=k, batch_size=batch_size, maps=maps_dir is not None,
                           threshold=threshold, max_pixels=max_pixels):
        for i, path in enumerate(part.paths):
            rec = record(index, part, i)
            if rec.get("reason") == "too_large":  # the library names its parameter, the CLI its flag
                rec["error"] = rec["error"].replace("(max_pixels)", "(--max-pixels)")
            failed += rec["decision"] == "ERROR"
            uncalibrated |= rec.get("reason") == "uncalibrated"
            if maps_dir is not None and i not in part.errors and rec.get("reason") != "non_finite_score":
                png = _unique(maps_dir / f"{Path(path).parent.name}_{Path(path).stem}_anomaly_map.png", written)
                write_maps(index, part, i, png, png.with_suffix(".npy"), max_pixels)
                rec["anomaly_map"], rec["raw_map"] = str(png), str(png.with_suffix(".npy"))
            click.echo(json.dumps(rec))
    if uncalibrated:
        click.echo(f"error: the index of {category} has no image threshold, so no frame was judged: run "
                   f"`patchsearch calibrate --category {category}` or pass --threshold", err=True)
        sys.exit(1)
    if failed:
        click.echo(f"error: {failed} of {len(paths)} images could not be scored", err=True)
        sys.exit(1)


def _unique(path: Path, taken: set) -> Path:
    """``path``, or ``path`` with _2, _3, ... before the suffix if already written this run."""
    out, n = path, 1
    while out in taken:
        n += 1
        out = path.with_name(f"{path.stem}_{n}{path.suffix}")
    taken.add(out)
    return out


@main.command()
@click.option("--category", required=True)
@_index_dir_option
@click.option("--good", multiple=True, required=True, type=click.Path(path_type=Path),
              help="good frames or folders (not training images); repeatable")
@click.option("--defect", multiple=True, type=click.Path(path_type=Path),
              help="defect frames or folders, for the F1-optimal threshold; repeatable")
@click.option("--fpr", "target_fpr", type=float, default=None,
              help="share of the good frames allowed above the threshold [0]")
@click.option("--margin", type=float, default=None, help="threshold = (1 + margin) x that quantile [0.1]")
@click.option("--pick", type=click.Choice(["fpr", "f1"]), default="fpr", show_default=True,
              help="fpr: the rule on good frames; f1: the F1-optimal threshold on --good and --defect")
@click.option("--min-region-area", type=click.IntRange(min=0), default=None, help="[as before]")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@_data_root_option
@_device_option
@_friendly
def calibrate(category, index_dir, good, defect, target_fpr, margin, pick, min_region_area, batch_size, data_root,
              device):
    """Re-fit CATEGORY's image and pixel thresholds from new good frames.

    The frames are recorded (relative to --data-root where below it, else absolute) so that
    add, remove and rebuild re-fit on them later.
    """
    from .data import list_images
    from .calibrate import calibrate as run_calibrate

    device = _device(device)
    index = run_calibrate(index_dir / category, list_images(good), defects=list_images(defect) if defect else None,
                          target_fpr=target_fpr, margin=margin, min_region_area=min_region_area, pick=pick,
                          batch_size=batch_size, data_root=_data_root(data_root) / category,
                          log=lambda m: click.echo(m, err=True), device=device)
    click.echo(json.dumps({"index": str(index.path), "version": index.version,
                           "calibration": {k: v for k, v in (index.manifest.calibration or {}).items()
                                           if k not in ("images", "images_root")}}))


@main.command()
@click.option("--category", required=True)
@_data_root_option
@_index_dir_option
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@_query_options
@_friendly
def evaluate(category, data_root, index_dir, as_json, batch_size, nprobe, weights, backbone, embed_dim, device):
    """Image/pixel AUROC, AUPRO, and F1 at the calibrated threshold on CATEGORY's test split."""
    from .evaluate import evaluate as run_evaluate

    index = _load(index_dir, category, nprobe, backbone, embed_dim, weights, device)
    res = run_evaluate(index, _data_root(data_root), category, batch_size=batch_size, progress=sys.stderr.isatty())
    if as_json:
        click.echo(json.dumps(res))
        return
    c, t = res["counts"], res["at_threshold"]
    click.echo(f"category      {category} ({res['geometry']['mode']} {res['geometry']['input_size']})")
    click.echo(f"test images   {c['images']} ({c['good']} good, {c['anomalous']} anomalous)")
    click.echo(f"image AUROC   {res['image_auroc']:.4f}   pixel AUROC {res['pixel_auroc']:.4f}   "
               f"AUPRO@0.3 {res['aupro']:.4f}")
    if t is not None:
        click.echo(f"at threshold  {res['threshold']:.4f}: F1 {t['f1']:.4f} precision {t['precision']:.4f} "
                   f"recall {t['recall']:.4f} ({res['good_ng']} of {c['good']} good frames NG)")
    click.echo(f"F1-max        {res['f1_max']['f1']:.4f} at {res['f1_max']['threshold']:.4f} (oracle)")
    for d, v in res["per_defect"].items():
        ng = "" if v["ng"] is None else f", {v['ng']} of {v['images']} NG"
        click.echo(f"  {d:<20} image AUROC {v['image_auroc']:.4f}{ng}")
    click.echo(f"query time    {res['seconds']:.1f} s ({res['seconds_per_image'] * 1000:.0f} ms/image)")


@main.command()
@click.option("--category", required=True)
@_index_dir_option
@_friendly
def verify(category, index_dir):
    """Check every file of CATEGORY's current index version against the sizes and SHA-256
    in its manifest."""
    from .format import verify as run_verify
    from .index import PatchIndex
    from .versions import open_version

    path = index_dir / category
    with open_version(path) as lease:
        problems = run_verify(lease.path)
        for line in problems:
            click.echo(f"damaged: {line}", err=True)
        if problems:
            sys.exit(1)
    index = PatchIndex.load(path, device="cpu")  # and that it opens (nothing copied to a GPU for it)
    click.echo(f"ok: {path} intact ({lease.version or 'format 1'}, {len(index.manifest.files)} files, "
               f"memory bank {index.size} x {index.dim})")


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--category", required=True)
@_data_root_option
@_index_dir_option
@click.option("--weights", type=click.Path(path_type=Path), default=None,
              help="the state-dict file the index was built with, if it was built with --weights")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="image-decoding worker processes")
@_device_option
@_friendly
def add(images, category, data_root, index_dir, weights, batch_size, workers, device):
    """Add good frames IMAGES (files or folders) to CATEGORY's index without a rebuild.

    The frames join the patch store as a new partition; greedy k-center continues until
    every store patch is within the coreset's covering radius again; the thresholds are
    re-fitted on the held-aside good frames (found under --data-root). Frames already in
    the store (same SHA-256) are skipped.
    """
    from .data import list_images
    from .update import add_images, history

    device = _device(device)
    index = add_images(index_dir / category, list_images(images), data_root=_data_root(data_root) / category,
                       weights=str(weights) if weights else None, batch_size=batch_size, workers=workers,
                       progress=sys.stderr.isatty(), log=lambda m: click.echo(m, err=True), device=device)
    click.echo(json.dumps({"index": str(index.path), "version": index.version, "memory_bank": index.size,
                           "last_update": (history(index.manifest) or [None])[-1]}))


@main.command()
@click.option("--category", required=True)
@click.option("--image", "images", multiple=True, required=True, type=click.Path(path_type=Path),
              help="a frame to take out: its path as recorded (relative to the data root) or its file; repeatable")
@_data_root_option
@_index_dir_option
@click.option("--weights", type=click.Path(path_type=Path), default=None,
              help="the state-dict file the index was built with (to re-fit the thresholds)")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@_device_option
@_friendly
def remove(category, images, data_root, index_dir, weights, batch_size, device):
    """Take frames out of CATEGORY's index (patch store and memory bank) without a rebuild."""
    from .update import history, remove_images

    device = _device(device)
    index = remove_images(index_dir / category, list(images), data_root=_data_root(data_root) / category,
                          weights=str(weights) if weights else None, batch_size=batch_size,
                          log=lambda m: click.echo(m, err=True), device=device)
    click.echo(json.dumps({"index": str(index.path), "version": index.version, "memory_bank": index.size,
                           "last_update": (history(index.manifest) or [None])[-1]}))


@main.command()
@click.option("--category", required=True)
@_index_dir_option
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@_friendly
def info(category, index_dir, as_json):
    """What CATEGORY's current index holds, and its update history."""
    from .index import PatchIndex
    from .update import history

    index = PatchIndex.load(index_dir / category, device="cpu")  # inspection only
    try:
        man = index.manifest
        cal = man.calibration or {}
        out = {"index": str(index.path), "version": index.version, "created": man.created,
               "backbone": (man.backbone or {}).get("name"), "dim": index.dim, "type": index.index_type,
               "memory_bank": index.size, "store_images": (man.store or {}).get("num_images"),
               "store_patches": (man.store or {}).get("num_patches"), "coreset": man.coreset,
               "image_threshold": (cal.get("image") or {}).get("threshold"),
               "pixel_threshold": (cal.get("pixel") or {}).get("threshold"), "history": history(man)}
    finally:
        index.close()
    if as_json:
        click.echo(json.dumps(out))
        return
    cs = out["coreset"] or {}
    radius = cs.get("radius")
    click.echo(f"index         {out['index']} ({out['version'] or 'format 1'}, created {out['created']})")
    click.echo(f"backbone      {out['backbone']} ({out['dim']}-d), {out['type']}")
    click.echo(f"patch store   {out['store_images']} frames, {out['store_patches']} patches")
    click.echo(f"memory bank   {out['memory_bank']} rows (coreset ratio {cs.get('ratio')}, seed {cs.get('seed')}, "
               f"covering radius {'not recorded' if radius is None else f'{radius:.4f}'}"
               f"{'' if radius is None else ' ' + str(cs.get('radius_space')) + ', L2'})")
    if out["image_threshold"] is not None:
        click.echo(f"thresholds    image {out['image_threshold']:.4f}, pixel {out['pixel_threshold']:.4f} (L2)")
    else:
        click.echo("thresholds    not calibrated")
    click.echo(f"history       {len(out['history'])} update(s)")
    for h in out["history"]:
        frames = h["frames"]
        click.echo(f"  {h['time']}  {h['action']:<6} {len(frames)} frame(s) ({', '.join(frames[:3])}"
                   f"{', ...' if len(frames) > 3 else ''})  bank {h['bank_rows'][0]} -> {h['bank_rows'][1]}  "
                   f"patches {h['store_patches'][0]} -> {h['store_patches'][1]}  radius {h['covering_radius']:.4f}  "
                   f"{h['calibration']}")


@main.command()
@_index_dir_option
@_data_root_option
@click.option("--host", default="127.0.0.1", show_default=True, help="address to bind (loopback unless told otherwise)")
@click.option("--port", type=click.IntRange(min=0, max=65535), default=8000, show_default=True)
@_device_option
@click.option("--token", default=None, envvar="PATCHSEARCH_TOKEN", show_envvar=True,
              help="bearer token required on every endpoint but /healthz")
@click.option("--max-body-mb", type=click.FloatRange(min=0.001), default=32.0, show_default=True,
              help="largest request body, MiB")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="frames per backbone batch (1 = no dynamic batching)")
@click.option("--max-wait-ms", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="how long a batch waits for more frames after its first, ms")
@click.option("--max-queue", type=click.IntRange(min=1), default=64, show_default=True,
              help="frames in the service at once (body arriving, decoding, queued, judged); one more: 503 with "
                   "Retry-After, its body unread")
@click.option("--poll", "poll_s", type=click.FloatRange(min=0.05), default=1.0, show_default=True,
              help="seconds between checks of each category's CURRENT (hot reload)")
@click.option("--max-pixels", type=click.IntRange(min=256), default=None,
              help="largest frame, width x height pixels from its header; larger: 413  [default: 8192 x 8192]")
@click.option("--decode-memory-mb", type=click.FloatRange(min=16), default=1024.0, show_default=True,
              help="memory all concurrent frame decodes may take together, MiB")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="threads for image work (decode, maps); 0 = CPU count, 2 to 8")
@click.option("--queue-timeout", "queue_timeout_s", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              help="seconds a frame may wait for its backbone batch; beyond: 503")
@click.option("--header-timeout", "header_timeout_s", type=click.FloatRange(min=0.1), default=10.0,
              show_default=True, help="seconds for a request's headers; beyond: 408, closed")
@click.option("--body-timeout", "body_timeout_s", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
              help="seconds for a request's body; beyond: 408, closed")
@click.option("--max-connections", type=click.IntRange(min=1), default=256, show_default=True,
              help="open connections at most; one more closes the longest idle one (or gets 503)")
@click.option("--allow-host", "allow_hosts", multiple=True,
              help="another Host name to answer to (bound to loopback only loopback names are; repeatable)")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
@_friendly
def serve(index_dir, data_root, host, port, device, token, max_body_mb, max_batch, max_wait_ms, max_queue, poll_s,
          max_pixels, decode_memory_mb, workers, queue_timeout_s, header_timeout_s, body_timeout_s, max_connections,
          allow_hosts, log_level):
    """Serve every category under --index-dir over HTTP (needs the 'serve' extra).

    POST /v1/categories/<category>/inspect with a frame; GET / for the page; see the README.
    """
    try:
        from .service.app import Settings
        from .service.run import allowed_hosts, serve as run_serve
    except ImportError as exc:
        raise InputError(f"patchsearch serve needs its extra: pip install 'patchsearch[serve]' ({exc})") from None
    if not index_dir.is_dir():
        raise InputError(f"--index-dir {index_dir} does not exist")
    device = _device(device)
    limits = {"max_pixels": max_pixels} if max_pixels else {}
    run_serve(Settings(index_dir=index_dir, data_root=_data_root(data_root), device=device, token=token or None,
                       max_body_mb=max_body_mb, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
                       poll_s=poll_s, decode_memory_mb=decode_memory_mb, workers=workers,
                       queue_timeout_s=queue_timeout_s, header_timeout_s=header_timeout_s,
                       body_timeout_s=body_timeout_s, max_connections=max_connections,
                       allowed_hosts=allowed_hosts(host, tuple(allow_hosts)), **limits), host, port, log_level)


if __name__ == "__main__":
    main()
