"""Replaying a runner's calls from CUDA graphs: one capture per input shape, with static input and output.

A package's call launches about 100-120 kernels; replaying them from a graph removes the launch gaps between
them (on an H100 0.1-0.5 ms per call where it shows, most at the small sizes: docs/design/speed_notes.md, steps
12-13). The price: each captured shape keeps its intermediate tensors in the graph's private memory pool for as
long as the graph lives.
"""


class GraphedCall:
    """`run(x) -> tensor` replayed from a CUDA graph captured on the first call of each input shape and dtype.

    `run` must be capturable: no host synchronisation and no CUDA event queries (an AOTInductor loader made
    with `single_threaded=True`). The returned tensor is the graph's static output, overwritten by the next
    call of the same shape: copy it to keep it.
    """

    def __init__(self, run, warmup=2):
        self.run = run
        self.warmup = warmup
        self._graphs = {}  # (shape, dtype, device) -> (graph, static input, static output)

    def __call__(self, x):
        key = (tuple(x.shape), x.dtype, x.device)
        if key not in self._graphs:
            self._graphs[key] = self._capture(x)
        graph, static_x, static_out = self._graphs[key]
        static_x.copy_(x)
        graph.replay()
        return static_out

    def _capture(self, x):
        import torch

        if x.device.type != "cuda":
            raise ValueError(f"CUDA graphs need CUDA tensors, got one on {x.device}")
        with torch.cuda.device(x.device):
            static_x = x.clone()
            # Warm-ups on a side stream: first-call work (folded constants, lazy allocations) stays out of the graph.
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(self.warmup):
                    self.run(static_x)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self.run(static_x)
        return graph, static_x, static_out
