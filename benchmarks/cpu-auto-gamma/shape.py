"""The model and prompts of one benchmark shape, for this folder's one-process scripts: the built-in
SmolLM2-135M in fp32 on the CPU and B prompts of L tokens, chosen as scripts/benchmark.py chooses them."""
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
import torch  # noqa: E402

from benchmark import load_prompts  # noqa: E402
from cli import read_checkpoint  # noqa: E402
from model import Transformer  # noqa: E402


def load(L: int, B: int) -> tuple[Transformer, list[list[int]]]:
    torch.set_grad_enabled(False)
    ckpt = ROOT / "checkpoints" / "smollm2-135m"
    _, tok = read_checkpoint(ckpt)
    a = SimpleNamespace(prompt_file=None, batch_size=[B], prompt_len=[L], checkpoint=ckpt)
    prompts = load_prompts(a, tok)[L]
    assert len(prompts) == B and all(len(p) == L for p in prompts)
    return Transformer.from_checkpoint(ckpt, "cpu", torch.float32), prompts
