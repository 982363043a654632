"""What loading a folder's shared weights costs a fresh process (issue 14: the 1328x1328 pair in <= 100 ms).

    python benchmarks/packages/weights_load.py DIR [--runs 5] [--device cuda] [--contiguous] [--warm-copy-kernels]

Writes DIR/weights.safetensors (the full-size Qwen-Image VAE's 2-D graph weights in bf16, random
weights of seed 0) unless it is there, then runs `FolderWeights(...).tensors(device)` (read, chunk
hashes checked, one device copy; convolution weights channels-last, as packages take them and as the file
stores them, or rearranged to contiguous with `--contiguous`) in `--runs` fresh processes, each after `import torch` and CUDA
initialisation, with the file in the page cache, and prints each time, the GPU memory it holds
(`mem_get_info` delta), the median, and a plain file read for comparison.
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, sys, time, torch
from vaebuild.weights_file import FolderWeights
folder, device, channels_last, warm = sys.argv[1], sys.argv[2], sys.argv[3] == "channels_last", sys.argv[4] == "1"
free = None
if device.startswith("cuda"):
    torch.zeros(1, device=device); torch.cuda.synchronize()
    if warm:  # load torch's strided-copy kernels, as any process that has copied a tensor has
        torch.empty(2, 3, 4, 5, device=device).contiguous(memory_format=torch.channels_last); torch.cuda.synchronize()
    free = torch.cuda.mem_get_info()[0]
record = json.load(open(folder + "/record.json"))
start = time.perf_counter()
with open(folder + "/" + record["path"], "rb") as f:
    f.read()
read = time.perf_counter() - start
start = time.perf_counter()
FolderWeights(folder, record).tensors(device, channels_last)
if device.startswith("cuda"):
    torch.cuda.synchronize()
load = time.perf_counter() - start
held = (free - torch.cuda.mem_get_info()[0]) / 2**20 if free is not None else None
print(json.dumps({"load_ms": 1e3 * load, "plain_read_ms": 1e3 * read, "gpu_mb_held": held}))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--contiguous", action="store_true", help="convolution weights contiguous (NCHW): rearranged on the GPU")
    parser.add_argument("--warm-copy-kernels", action="store_true",
                        help="run one channels-last copy before timing (its kernels' first load is ~20 ms)")
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    if not (args.folder / "record.json").is_file():
        import torch

        from vaebuild.model.graphs import build_graphs
        from vaebuild.model.source import ModelSource, load_vae
        from vaebuild.weights_file import WEIGHTS_NAME, write_weights_file

        graphs = [g.to(torch.bfloat16) for g in build_graphs(load_vae(ModelSource(random_init=True)))]
        record = write_weights_file(args.folder / WEIGHTS_NAME, graphs)
        (args.folder / "record.json").write_text(json.dumps(record))
    layout = "contiguous" if args.contiguous else "channels_last"
    runs = [json.loads(subprocess.run([sys.executable, "-c", CHILD, str(args.folder), args.device, layout,
                                      str(int(args.warm_copy_kernels))], check=True,
                                      capture_output=True, text=True).stdout) for _ in range(args.runs)]
    for run in runs:
        print(f"load {run['load_ms']:.1f} ms, GPU MB held {run['gpu_mb_held']} (plain read of the file: "
              f"{run['plain_read_ms']:.1f} ms)")
    print(f"median load {statistics.median(r['load_ms'] for r in runs):.1f} ms over {len(runs)} fresh processes ({layout})")


if __name__ == "__main__":
    main()
