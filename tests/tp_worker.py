"""Run by test_tp.py under torchrun: the logits of a ragged batch from this rank's shard.
usage: tp_worker.py CHECKPOINT TP OUT.pt"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tp  # noqa: E402


def main(ckpt, tp_size, out):
    w = tp.world_from_env(tp_size)
    tp.init(w, torch.device("cpu"))
    model = tp.load(ckpt, w, "cpu", torch.float32)
    data = torch.load(out.with_suffix(".in.pt"))
    model.setup_caches(data["idx"].shape[0], data["idx"].shape[1])
    with torch.no_grad():
        logits = model(data["idx"], data["pos"])
    if w.rank == 0:
        torch.save(logits, out)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]))
