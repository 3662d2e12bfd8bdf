"""Every Linear product of one GPT-2 124M decode step, by each CPU kernel PyTorch ships: which streams fastest.

For each weight shape of the model (a block's c_attn, attn c_proj, c_fc, mlp c_proj, 12 copies each so
that they stream from memory as in the model, and the LM head) and for 1 and 8 rows, the median of
repeated calls of:

- float32: `F.linear` (MKL) and the weight packed in oneDNN's layout (what `cpu_inference` uses);
- bfloat16: `F.linear`, and oneDNN-packed for 1 and for 64 expected rows;
- int8 weight-only: `torch.ops.aten._weight_int8pack_mm` (what `--precision int8` uses);
- int8 x int8, the activations quantized on each call: oneDNN's `qlinear_pointwise` (unsigned 8-bit
  activations, one scale per call) and fbgemm's `quantized.linear_dynamic` (`quantize_dynamic`'s product).

Printed per shape: microseconds per product, GB/s of weight read, the error against float32; then each
kernel's total for the whole step. Weights read alone may sit in a large L3 cache: these are the products'
own speeds, which a whole decode step (`bench_generate.py`) may not reach.

    OMP_NUM_THREADS=2 taskset -c 4,5 python benchmarks/bench_linear_kernels.py
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from machine import describe_machine, read_bandwidth_gbs  # benchmarks/machine.py, beside this script

Product = Callable[[torch.Tensor], torch.Tensor]

# (out, in) of GPT-2 124M's Linears, and how many of each one decode step reads
SHAPES = [((2304, 768), 12), ((768, 768), 12), ((3072, 768), 12), ((768, 3072), 12), ((50257, 768), 1)]
SMALL_SHAPES = [((192, 64), 2), ((256, 64), 2), ((64, 256), 2), ((50257, 64), 1)]  # --small: the suite's run


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 weight (out, in) and a float32 scale per row (out,), as `quantize.Int8Linear` rounds them."""
    scales = (weight.abs().amax(dim=1) / 127).clamp(min=1e-8)
    return torch.round(weight / scales[:, None]).clamp(-128, 127).to(torch.int8), scales


def products(weight: torch.Tensor) -> dict[str, tuple[Product, int]]:
    """name -> (product of x (rows, in), bytes per weight element it reads), for those this build and CPU run."""
    out_features, in_features = weight.shape
    quantized, scales = int8_rows(weight)
    bf16 = weight.to(torch.bfloat16)
    found: dict[str, tuple[Product, int]] = {"fp32 F.linear": (lambda x: F.linear(x, weight), 4)}
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, 64)
    found["fp32 packed"] = (lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""), 4)
    found["bf16 F.linear"] = (lambda x: F.linear(x.to(torch.bfloat16), bf16), 2)
    for hint in (1, 64):
        try:  # oneDNN packs bf16 only on CPUs with AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT
            packed_bf16 = torch.ops.mkldnn._reorder_linear_weight(bf16, hint)
        except RuntimeError:
            continue
        found[f"bf16 packed ({hint}-row layout)"] = (
            lambda x, p=packed_bf16: torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), p, None, "none", [], ""),
            2,
        )
    bf16_scales = scales.to(torch.bfloat16)
    found["int8 weight-only"] = (
        lambda x: torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), quantized, bf16_scales),
        1,
    )
    onednn = torch.ops.onednn.qlinear_prepack(quantized, [1, in_features])
    zero_points = torch.zeros(out_features, dtype=torch.int64)

    def onednn_int8(x: torch.Tensor) -> torch.Tensor:
        scale = x.abs().amax().item() / 127 + 1e-12
        x_u8 = torch.clamp(torch.round(x / scale) + 128, 0, 255).to(torch.uint8)  # zero point 128
        return torch.ops.onednn.qlinear_pointwise(
            x_u8, scale, 128, onednn, scales, zero_points, None, 1.0, 0, torch.float32, "none", [], ""
        )

    found["int8 x int8 oneDNN"] = (onednn_int8, 1)
    per_channel = torch._make_per_channel_quantized_tensor(quantized, scales.double(), zero_points, 0)
    fbgemm = torch.ops.quantized.linear_prepack(per_channel, None)
    found["int8 x int8 fbgemm"] = (lambda x: torch.ops.quantized.linear_dynamic(x, fbgemm, True), 1)
    return found


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--small", action="store_true", help="a 64-wide model's shapes (a quick check)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # torch.ao's deprecation notes
    torch.manual_seed(0)
    print(describe_machine())
    print(f"read bandwidth {read_bandwidth_gbs(gib=0.5):.1f} GB/s")
    print("| weight (out x in) x copies | rows | product | us per product | GB/s of weight | error vs fp32 |")
    print("|---|---:|---|---:|---:|---:|")
    totals: dict[tuple[str, int], float] = {}
    for (out_features, in_features), copies in SMALL_SHAPES if args.small else SHAPES:
        weights = [torch.randn(out_features, in_features) * 0.02 for _ in range(copies)]
        kernels = [products(w) for w in weights]
        for rows in (1, 8):
            x = torch.randn(rows, in_features)
            exact = F.linear(x, weights[0])  # (rows, out)
            for name, (_, element_bytes) in kernels[0].items():
                fns = [k[name][0] for k in kernels]
                seconds = median_seconds(lambda: [fn(x) for fn in fns], args.repeats) / copies
                error = ((fns[0](x).float() - exact).norm() / exact.norm()).item()
                totals[name, rows] = totals.get((name, rows), 0.0) + seconds * copies
                print(f"| {out_features} x {in_features} x {copies} | {rows} | {name} | {seconds * 1e6:,.1f} | "
                      f"{out_features * in_features * element_bytes / seconds / 1e9:.1f} | {error:.1e} |")  # fmt: skip
    print("\nevery Linear of one decode step, ms:")
    print("| product | 1 row | 8 rows |")
    print("|---|---:|---:|")
    for name in dict.fromkeys(name for name, _ in totals):
        print(f"| {name} | {totals[name, 1] * 1e3:.2f} | {totals[name, 8] * 1e3:.2f} |")


if __name__ == "__main__":
    main()
