"""Run by test_tp.py under torchrun.
  tp_worker.py logits CHECKPOINT TP OUT.pt   the logits of a ragged batch from this rank's shard
  tp_worker.py gathers OUT.json ARGS...      generate.py ARGS, recording every all_gather's size
  tp_worker.py jobs JOBS.json                each [command, *args] of the file's list in turn, in one
                                             process group (one start-up for many checks)"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import generate  # noqa: E402
import tp  # noqa: E402


def logits(ckpt, tp_size, out):
    w = tp.world_from_env(int(tp_size))
    tp.init(w, torch.device("cpu"))
    model = tp.load(ckpt, w, "cpu", torch.float32)
    data = torch.load(Path(out).with_suffix(".in.pt"))
    model.setup_caches(data["idx"].shape[0], data["idx"].shape[1])
    with torch.no_grad():
        y = model(data["idx"], data["pos"])
    if w.rank == 0:
        torch.save(y, out)


def gathers(out, *argv):
    sizes = []
    gather = tp._all_gather

    def spy(x, *a, **kw):
        sizes.append(x.numel())
        return gather(x, *a, **kw)

    tp._all_gather = spy
    try:
        res = generate.main(list(argv))
    finally:
        tp._all_gather = gather
    if res is not None:
        Path(out).write_text(json.dumps({"sizes": sizes, "rows": [r["tokens"] for r in res[0]]}))


def jobs(path):
    for name, *args in json.loads(Path(path).read_text()):
        COMMANDS[name](*args)


COMMANDS = {"logits": logits, "gathers": gathers, "jobs": jobs}

if __name__ == "__main__":
    try:
        COMMANDS[sys.argv[1]](*sys.argv[2:])
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
