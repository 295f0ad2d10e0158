"""Weight-only int8 / int4 checkpoints from a converted one: every linear layer's weight (q/k/v, the
attention output, the MLP and the output layer) becomes integer codes and bfloat16 scales; the
embedding table and the norms stay as they are. A tied embedding keeps its table and the output
layer gets a quantized copy of it: a lookup reads only B rows of the table, while the output layer
reads all of it every forward. The scheme goes into config.json's "quant" (see model.QLinear).

    python quantize.py --checkpoint DIR --mode int8|int4 [--groupsize 32|64|128|256] --out DIR

int8: one scale per output channel, codes in [-127, 127]; int4: a scale and a zero per group of
--groupsize inputs (default 64), codes in [0, 16). Either way every weight is within half a step
(its scale / 2) of the value it stands for.
"""
import shutil
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

from cli import ArgParser, run
from convert_checkpoint import TOKENIZER_FILES, _save
from model import ModelArgs, Transformer, UsageError, check_weights, unpack_int4


def bf16_up(s: Tensor) -> Tensor:
    """The smallest bfloat16 >= s (> 0): a scale rounded down could push a code past its range."""
    s = s.float().clamp(min=torch.finfo(torch.float32).tiny)
    b = s.to(torch.bfloat16)
    return torch.where(b.float() < s, torch.nextafter(b, torch.full_like(b, float("inf"))), b)


def int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """w [N, K] -> codes [N, K] int8, scales [N] bfloat16: w ~ codes * scales, symmetric per row."""
    w = w.float()
    s = bf16_up(w.abs().amax(1) / 127)
    return (w / s.float()[:, None]).round().clamp(-127, 127).to(torch.int8), s


def int4(w: Tensor, g: int) -> tuple[Tensor, Tensor]:
    """w [N, K] -> codes [N, K/2] uint8 (two a byte, the even input high), scales [N, K/g, 2]
    bfloat16 (scale, zero): w ~ (q - 8) * scale + zero over each group of g inputs."""
    N, K = w.shape
    wg = w.float().view(N, K // g, g)
    lo, hi = wg.amin(-1), wg.amax(-1)
    zero = (lo + 8 * (hi - lo) / 15).to(torch.bfloat16)
    z = zero.float()
    # the grid z + (q - 8) * scale, q in [0, 16), must span [lo, hi] with the rounded zero
    scale = bf16_up(torch.maximum((hi - z) / 7, (z - lo) / 8))
    q = ((wg - z[..., None]) / scale.float()[..., None] + 8).round().clamp(0, 15).to(torch.uint8).view(N, K)
    return q[:, ::2] << 4 | q[:, 1::2], torch.stack((scale, zero), -1)


def dequantize(codes: Tensor, scales: Tensor, groupsize: int | None = None) -> Tensor:
    """The float32 weights [N, K] that stored codes and scales stand for (int4: with groupsize)."""
    if groupsize is None:
        return codes.float() * scales.float()[:, None]
    q = unpack_int4(codes).float()
    N, K = q.shape
    s, z = scales.float().unbind(-1)  # [N, K/g] each
    return ((q.view(N, K // groupsize, groupsize) - 8) * s[..., None] + z[..., None]).view(N, K)


def linears(args: ModelArgs) -> list[str]:
    """The names of the model's linear layers: what gets quantized."""
    with torch.device("meta"):
        return [n for n, m in Transformer(replace(args, quant=None)).named_modules() if isinstance(m, nn.Linear)]


def quantize(state: dict[str, Tensor], args: ModelArgs, mode: str, groupsize: int | None = None):
    """A float checkpoint's tensors and config -> the quantized checkpoint's (quant recorded in the
    config; a scheme that does not fit the model is a UsageError)."""
    qargs = replace(args, quant={"mode": mode} | ({"groupsize": groupsize} if mode == "int4" else {}))
    names = linears(args)
    out = {k: v for k, v in state.items() if k.removesuffix(".weight") not in names}
    for n in names:
        w = state.get(f"{n}.weight", state["tok_embeddings.weight"] if n == "output" else None)  # tied
        out[f"{n}.weight"], out[f"{n}.scales"] = int8(w) if mode == "int8" else int4(w, groupsize)
    return out, qargs


def main(argv=None):
    p = ArgParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, type=Path, help="a converted (float) checkpoint directory")
    p.add_argument("--mode", required=True, choices=["int8", "int4"])
    p.add_argument("--groupsize", type=int, help="int4: inputs per scale and zero, 32, 64, 128 or 256 (default 64)")
    p.add_argument("--out", required=True, type=Path, help="output checkpoint directory")
    a = p.parse_args(argv)
    if a.mode == "int8" and a.groupsize is not None:
        raise UsageError("--groupsize is for int4: int8 has one scale per output channel")
    src, g = a.checkpoint, (a.groupsize or 64) if a.mode == "int4" else None
    if not (src / "config.json").is_file():
        raise UsageError(f"checkpoint {src} has no config.json (make one with convert_checkpoint.py)")
    if a.out.resolve() == src.resolve():
        raise UsageError(f"--out {a.out} is the source checkpoint: write the quantized one elsewhere")
    args = ModelArgs.load(src / "config.json")
    if args.quant:
        raise UsageError(f"{src}/config.json: already quantized ({args.quant}); quantize a float checkpoint")
    check_weights(src, args)
    from safetensors.torch import load_file

    state = load_file(src / "model.safetensors")
    try:
        out, qargs = quantize(state, args, a.mode, g)
    except UsageError as e:
        raise UsageError(f"--mode {a.mode}{f' --groupsize {g}' if g else ''} does not fit {src}/config.json: {e}") from None
    try:
        _save(a.out, qargs, out)
        for f in TOKENIZER_FILES:
            if (src / f).is_file():
                shutil.copy(src / f, a.out / f)
    except OSError as e:
        raise UsageError(f"--out {a.out}: {e.strerror or e}") from None
    mb = lambda d: sum(t.numel() * t.element_size() for t in d.values()) / 1e6
    kept = sorted({k.split(".")[-2] for k, t in out.items() if t.is_floating_point() and k.endswith(".weight")})
    print(f"wrote {a.out}: {a.mode}{f' (groups of {g})' if g else ''}, {len(linears(args))} linear layers quantized; "
          f"as they were: {', '.join(kept)}; tensors {mb(state):.0f} MB -> {mb(out):.0f} MB")

if __name__ == "__main__":
    run(main)
