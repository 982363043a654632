"""`verify_build`: check and run every engine of a build folder, and collect the report.

It reads the manifest, binds Polygraphy to the engines' backend, loads the PyTorch reference
(`reference`), plans the rows (`plan`; `sizes` says which engines serve `--sizes` and the tiled rows' sizes), runs
the ones still to run (`compare.run_row`, `compare.run_tiled_row`) and returns a `report.VerifyReport`; it never
raises on a mismatch (`VerifyReport.raise_on_failures` does).
"""

import time
from pathlib import Path

from vaebuild.backends import get_backend
from vaebuild.errors import UserInputError, VaebuildError
from vaebuild.model import GRAPHS
from vaebuild.verify.compare import TiledRuntimes, run_row, run_tiled_row
from vaebuild.verify.plan import (
    VerifyOptions,
    check_engine_file,
    find_onnx_files,
    plan_rows,
    plan_tiled_rows,
    resolve_max_side,
    without_repeated_onnx_rows,
)
from vaebuild.verify.reference import ReferenceCache, load_reference, model_source, reference_device
from vaebuild.verify.report import PASS, VerifyReport
from vaebuild.verify.sizes import FolderSizes


def verify_build(folder, options: VerifyOptions = VerifyOptions(), log=print) -> VerifyReport:
    """Check and run every engine of the build in `folder`; return the report (never raises on a mismatch)."""
    start = time.perf_counter()
    folder = Path(folder)
    manifest = _read_build_manifest(folder)

    # Bind Polygraphy to the engines' backend before anything imports it (see backends.trt_import).
    backends = sorted({e["backend"] for e in manifest["engines"]})
    unavailable = {e["path"]: get_backend(e["backend"]).unavailable_reason(e, e.get("device", "cuda"))
                   for e in manifest["engines"]}
    installed = {b: _installed_version(b) for b in backends}

    device = reference_device(options.device)
    max_side = resolve_max_side(options, device)
    # Which engines serve the --sizes (a size none serves is an error before anything loads), and the tiled rows'.
    sizes = FolderSizes(folder) if options.sizes or manifest.get("tiles") else None
    extra = sizes.extra_rows(options.sizes) if sizes else {}
    source = model_source(manifest, options, folder)
    log(f"loading the PyTorch reference ({source.describe()['kind']}) ...")
    vae, weights_hash = load_reference(source, manifest["weights_sha256"])
    reference = ReferenceCache(vae, device)
    onnx_dir = options.onnx_dir or manifest["onnx_dir"]
    onnx_files = find_onnx_files(Path(onnx_dir), manifest) if onnx_dir else {}  # inductor builds have no ONNX

    report = VerifyReport(
        folder=folder,
        kind=manifest["kind"],
        model=manifest["model"],
        weights_sha256=weights_hash,
        reference={"api": "diffusers AutoencoderKLQwenImage.encode/decode (unfolded 3-D)", "dtype": "float32",
                   "device": device, "seed": options.seed},
        max_side=max_side,
        tolerances={},
        engines=[],
        onnx=[{"graph": g, "path": str(f.path), "sha256": f.sha256, "problem": f.problem} for g, f in onnx_files.items()],
    )
    plans, problems = [], {}
    for entry in manifest["engines"]:
        precision = entry.get("precision", manifest["precision"])
        report.tolerances.setdefault(precision, options.tolerances(precision))
        version_checked = get_backend(entry["backend"]).version_mismatch_fails
        problem = check_engine_file(folder, entry, installed.get(entry["backend"]) if version_checked else None,
                                    weights_hash)
        problems[entry["path"]] = problem
        report.engines.append({
            "path": entry["path"], "graph": entry["graph"], "backend": entry["backend"],
            "backend_version": entry.get("backend_version"), "installed_version": installed.get(entry["backend"]),
            "precision": precision, "check": problem,
        })
        if problem:
            log(f"error: engine {problem}")
        if entry["graph"] in GRAPHS:  # tile engines are checked through the tiled rows
            plans.extend(plan_rows(folder, entry, precision, problem, onnx_files, unavailable, max_side, options,
                                   extra.get(entry["path"], ())))
    if sizes and manifest.get("tiles"):
        plans.extend(plan_tiled_rows(folder, manifest, sizes, problems, unavailable, max_side, options))

    plans = without_repeated_onnx_rows(plans)
    weights = _folder_weights(folder, manifest)
    runtimes = TiledRuntimes(folder, manifest)
    try:
        for index, (row, context) in enumerate(plans, start=1):
            if row.status is None and context.get("tiled"):
                run_tiled_row(row, context, reference, options, runtimes)
            elif row.status is None:
                run_row(row, context, reference, options, weights)
            report.rows.append(row)
            detail = f": {row.reason}" if row.reason and row.status != PASS else ""
            log(f"[{index}/{len(plans)}] {row.where} {row.runner}: {row.status}{detail}")
    finally:
        runtimes.release()
    report.seconds = time.perf_counter() - start
    return report


def _read_build_manifest(folder):
    from vaebuild.manifest import MANIFEST_NAME, read_build_manifest

    manifest = read_build_manifest(folder)
    if manifest.get("kind") not in ("static", "multiprofile") or not manifest.get("engines"):
        raise UserInputError(f"{folder / MANIFEST_NAME} lists no engines; rebuild the folder")
    return manifest


def _installed_version(backend):
    """The installed version of `backend`, or None when it is not installed here."""
    try:
        return get_backend(backend).version()
    except VaebuildError:
        return None


def _folder_weights(folder, manifest):
    """The folder's shared weights for weight-free packages (loaded on first use), or None."""
    from vaebuild.weights_file import FolderWeights

    record = manifest.get("weights_file")
    return FolderWeights(folder, record) if record else None
