"""Reproduces the AOTInductor package-load crash seen on the lent H100 image (torch 2.11.0+cu130).

python3 benchmarks/aoti_load_crash.py compile|load [--link-stdcxx] [--cxx clang++-16]
"""
import faulthandler, sys, torch
faulthandler.enable()
class M(torch.nn.Module):
    def __init__(self):
        super().__init__(); self.l = torch.nn.Conv2d(4, 8, 3, padding=1)
    def forward(self, x):
        return self.l(x).relu()
torch.manual_seed(0)
m = M().cuda()
x = torch.randn(1, 4, 16, 16, device="cuda")
cxx = sys.argv[sys.argv.index("--cxx") + 1] if "--cxx" in sys.argv else None
path = f"/tmp/{'stdcxx' if '--link-stdcxx' in sys.argv else 'plain'}_{cxx or 'default'}.pt2"
if sys.argv[1] == "compile":
    if "--link-stdcxx" in sys.argv:
        torch._inductor.config.aot_inductor.custom_op_libs = ["stdc++"]
    if cxx:
        torch._inductor.config.cpp.cxx = (None, cxx)
    torch._inductor.aoti_compile_and_package(torch.export.export(m, (x,)), package_path=path)
    print("compiled", path, flush=True)
else:
    r = torch._inductor.aoti_load_package(path)
    print("loaded and ran", path, (r(x) - m(x)).abs().max().item(), flush=True)
