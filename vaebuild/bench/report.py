"""`vaebuild bench`'s output: the Markdown tables (`render_markdown`: the seed guide's size | decoder | encoder
shape, with peak memory columns on CUDA, notes, the load costs per engine folder, every row) and the files
(`write_results`)."""

from pathlib import Path

from vaebuild.model import GRAPHS

TABLE_ORDER = tuple(reversed(GRAPHS))  # the tables' graph order, decoder first; the run measures in it too


def render_markdown(result, details=True):
    """The seed guide's table shape (size | decoder ... | encoder ...), notes, and optionally every row."""
    rows = result["rows"]
    folders = result["engines"]
    by_key = {(r["size"], r["graph"], r["kind"], r.get("folder")): r for r in rows}
    cpu = result["device"]["type"] != "cuda"
    title = f"VAE latency: {result['device']['name']}, {result['precision']}, batch {result['batch']}"
    lines = [f"## {title}", ""]
    if cpu:
        lines += ["**CPU run**: perf_counter timings on the CPU; not comparable with GPU results.", ""]
    lines += [
        f"{result['timer']} timing, {result['warmup']} warm-up calls, median of {result['runs']} runs; "
        f"torch {result['versions']['torch']}, diffusers {result['versions']['diffusers']}, "
        f"vaebuild {result['vaebuild_version']}; model {_model_text(result['model'])}; {result['timestamp_utc']}.",
        "",
    ]
    columns = [("3-D", "pytorch-3d", None), ("2-D", "pytorch-2d", None)]
    columns += [(f"E{i + 1}" if len(folders) > 1 else "engine", "engine", i) for i in range(len(folders))]
    names = [name for name, _, _ in columns]
    peaks = any(r.get("peak_mem_mib") is not None for r in rows)  # measured on CUDA only
    header = ["size WxH"]
    for graph in TABLE_ORDER:
        header += [
            f"{graph} TFLOP 3-D / 2-D",
            f"{graph} ms {' / '.join(names)}",
            f"{graph} speedup {' / '.join(names[1:])}",
        ]
        if peaks:
            header.append(f"{graph} peak MiB {' / '.join(names)}")
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for size in result["sizes"]:
        cells = [size["label"]]
        for graph in TABLE_ORDER:
            found = [by_key.get((size["label"], graph, kind, folder)) for _, kind, folder in columns]
            cells.append(" / ".join(_fmt(r and r["tflop"], 2) for r in found[:2]))
            cells.append(" / ".join(_fmt(r and r["median_ms"], 1) for r in found))
            cells.append(" / ".join(_fmt(r and r["speedup_vs_3d"], 2, "x") for r in found[1:]))
            if peaks:
                cells.append(" / ".join(_fmt(r and r["peak_mem_mib"], 0) for r in found))
        lines.append("| " + " | ".join(cells) + " |")
    reasons = {}
    for r in rows:
        if r["status"] != "ok":
            reasons.setdefault(r["reason"], []).append(f"{r['size']} {r['graph']} {r['row']}")
    if reasons:
        lines += ["", "Not run (shown as -):"]
        for reason, where in reasons.items():
            lines.append(f"- {reason} ({len(where)} row(s), e.g. {where[0]})")
    for index, e in enumerate(folders):
        if e.get("kind"):
            name = names[2 + index]
            graphs = ", replayed from CUDA graphs (first call captures)" if e.get("cuda_graphs") else ""
            if e.get("tiled"):
                tile = e["tiles"]
                graphs += f", every size through its exact tiles of {tile[0]}x{tile[1]} (HxW; tiling=True)"
            lines += [
                "",
                f"{name}: {e['dir']} ({e['kind']}, {e['precision']}, {', '.join(e['backends'])} "
                f"{', '.join(e['backend_versions'])}{graphs}; same weights as the PyTorch rows: {e['weights_match']}).",
            ]
            if not e.get("cuda_graphs") and not e.get("tiled"):
                lines += _load_table(result, index, e)
    if result.get("command"):
        lines += ["", f"Command: `{result['command']}`"]
    if details:
        lines += ["", "### All rows", "",
                  "| size WxH | graph | row | median ms | p90 ms | speedup vs 3-D | TFLOP | peak MiB | load s | note |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            note = r["reason"] if r["status"] != "ok" else (r.get("engine") or "")
            lines.append(
                f"| {r['size']} | {r['graph']} | {r['row']} | {_fmt(r['median_ms'], 2)} | {_fmt(r['p90_ms'], 2)} | "
                f"{_fmt(r['speedup_vs_3d'], 2, 'x')} | {_fmt(r['tflop'], 2)} | {_fmt(r['peak_mem_mib'], 0)} | "
                f"{_fmt(r['load_seconds'], 2)} | {note} |"
            )
    return "\n".join(lines) + "\n"


def _load_table(result, index, e):
    """Load and memory costs per engine of one folder, and its totals, beside LightX2V's TensorRT figures."""
    lines = ["", f"Loading and memory, {Path(e['dir']).name}:", "",
             "| engine | load ms (fresh process) | first call ms | GPU MB held after load |", "|---|---|---|---|"]
    seen = set()
    for r in result["rows"]:
        if r["kind"] != "engine" or r.get("folder") != index or r["status"] != "ok" or r.get("engine") in seen:
            continue
        seen.add(r.get("engine"))
        lines.append(f"| {r['engine']} | {_fmt(r['load_ms'], 1)} | {_fmt(r['first_call_ms'], 1)} | "
                     f"{_fmt(r['gpu_mb_held'], 1)} |")
    lines += ["", f"Folder: every engine resident at once: {_fmt(e.get('resident_mb'), 1)} MB of GPU memory "
              f"(weights included); on disk: {_fmt(e.get('disk_mb'), 1)} MB. For reference, LightX2V's Qwen-Image VAE "
              "TensorRT guide (static engines, H100): about 5 GB of GPU memory per engine pair, first load 178-344 ms."]
    return lines


def _fmt(value, digits, suffix=""):
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def _model_text(model):
    if not model:
        return "?"
    if model.get("kind") == "random-init":
        return f"random-init (seed {model.get('seed')})"
    return f"{model.get('kind')} {model.get('model', '')}".strip()


def write_results(result, json_path=None, markdown_path=None):
    """Write the JSON result and/or the Markdown tables (parent folders are created)."""
    from vaebuild.fileio import write_json, write_text

    if json_path:
        write_json(Path(json_path), result)
    if markdown_path:
        write_text(Path(markdown_path), render_markdown(result))
