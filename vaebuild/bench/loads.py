"""Engine load costs as a fresh process pays them: `load_ms` and `gpu_mb_held` per engine, measured by
`vaebuild.bench.load_probe` in subprocesses (one per static pair, encoder first: the first weight-free package
of a folder also reads the shared weights), and a folder's `resident_mb` (every engine loaded at once, weights
included, in one more process)."""

from pathlib import Path

from vaebuild.errors import VaebuildError

_PROBE_MODULE = "vaebuild.bench.load_probe"  # run with `python -m`


def measure_fresh_loads(runtime, device, info, log=print):
    """{engine: {"load_ms", "gpu_mb_held"}} from fresh processes (one per static pair, one for a multi-profile
    folder); `info` gets the folder's `resident_mb` (everything loaded at once, in one more process)."""
    import json
    import subprocess
    import sys
    import tempfile

    groups = {}
    for rel_path in runtime.engine_paths:
        groups.setdefault(Path(rel_path).parent.as_posix(), []).append(rel_path)
    # The encoder first, as a pipeline that encodes then decodes loads them.
    ordered = [sorted(group, key=lambda rel: "decoder" in rel) for group in groups.values()]

    def run_probe(engines):
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "probe.json"
            command = [sys.executable, "-m", _PROBE_MODULE, str(runtime.engine_dir), str(result),
                       "--device", str(device)]
            if engines:
                command += ["--engines", ",".join(engines)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode or not result.is_file():
                raise VaebuildError(f"load probe failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
            return json.loads(result.read_text())

    loads = {}
    try:
        for engines in ordered:
            loads.update(run_probe(engines)["engines"])
        info["resident_mb"] = run_probe(None)["resident_mb"]
    except VaebuildError as err:
        log(f"note: {err}")
        info["load_probe_error"] = str(err)
    return loads
