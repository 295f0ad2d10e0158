"""Tensor and data parallelism on CPU (gloo, processes spawned by torchrun): the same logits and
the same tokens as one process, on one "node" or two."""
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import generate as gen
from model import Transformer

ROOT = Path(gen.__file__).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
CPU = ["--device", "cpu", "--dtype", "float32"]  # what these tests expect, whatever the machine has


@contextlib.contextmanager
def process_group(cmd):
    """Popen(cmd) in a process group of its own, killed whole (torchrun's workers too) on leaving,
    whatever the outcome."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=ENV,
                         start_new_session=True)
    try:
        yield p
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.communicate()


def run(cmd, timeout=300) -> subprocess.CompletedProcess:
    with process_group(cmd) as p:
        out, err = p.communicate(timeout=timeout)
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def torchrun(*argv, nproc=2, script="generate.py", timeout=300):
    return run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                str(ROOT / script), *map(str, argv)], timeout)


def rows_of(path):
    return [r["tokens"] for r in json.loads(path.read_text())["rows"]]


RAGGED = ["--prompt", "The capital of Italy is", "--prompt", "Here is a recipe for a simple tomato soup. First,",
          "--prompt", "Once", "--max_new_tokens", "24"]


def test_tp2_logits_match_one_process(default_ckpt, tmp_path):
    """3 KV heads over 2 ranks (2 + 1): logits of a ragged batch equal the unsharded model's."""
    torch.manual_seed(0)
    lens = [7, 19, 12]
    idx = torch.randint(0, 49152, (3, 19))
    pos = torch.arange(19).expand(3, -1)
    torch.save({"idx": idx, "pos": pos}, tmp_path / "logits.in.pt")
    r = torchrun("logits", default_ckpt, 2, tmp_path / "logits.pt", script="tests/tp_worker.py")
    assert r.returncode == 0, r.stderr[-3000:]
    model = Transformer.from_checkpoint(default_ckpt, "cpu", torch.float32)
    model.setup_caches(3, 19)
    with torch.no_grad():
        ref = model(idx, pos)
    got = torch.load(tmp_path / "logits.pt")  # rank 0's vocabulary slice: the first half, padded
    V = ref.shape[-1]
    assert got.shape[-1] == -(-V // 2)
    for b, n in enumerate(lens):  # each row's own prefix: positions past it are padding
        torch.testing.assert_close(got[b, :n], ref[b, :n, : got.shape[-1]], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", [["--draft", "none"], ["--gamma", "3", "--draft_budget", "12", "--sink", "4"],
                                  ["--gamma", "auto", "--draft_budget", "16", "--sink", "4"],
                                  ["--gamma", "3", "--draft_budget", "16", "--sink", "2", "--draft_cache", "snapkv"],
                                  ["--temperature", "0.8", "--top_k", "50", "--seed", "7", "--gamma", "2",
                                   "--draft_budget", "12", "--sink", "4"],
                                  ["--temperature", "0.9", "--top_p", "0.9", "--seed", "3", "--gamma", "3",
                                   "--draft_budget", "12", "--sink", "4"]])
def test_tp2_generates_what_one_process_does(default_ckpt, tmp_path, mode):
    """Greedy plain and self-speculative decoding (both draft caches), and seeded sampling, with a
    ragged batch."""
    argv = ["--checkpoint", default_ckpt, *RAGGED, *CPU, *mode]
    ref, _ = gen.main(list(map(str, argv)))
    r = torchrun(*argv, "--tp", 2, "--json", tmp_path / "tp.json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert rows_of(tmp_path / "tp.json") == [x["tokens"] for x in ref]


def test_tp2_greedy_gathers_no_vocabulary(default_ckpt, tmp_path):
    """Greedy TP reduces each rank's local max/argmax: the largest all-gather is a few [tp, B, T]
    tensors, never a slice of the vocabulary (49152 ids); sampling with top_k gathers [tp, B, T, k]."""
    argv = ["--checkpoint", default_ckpt, *RAGGED, *CPU, "--gamma", "3", "--draft_budget", "12", "--sink", "4"]
    ref, _ = gen.main(list(map(str, argv)))
    out = tmp_path / "gathers.json"
    r = torchrun("gathers", out, *argv, "--tp", 2, script="tests/tp_worker.py")
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["rows"] == [x["tokens"] for x in ref]
    assert got["sizes"] and max(got["sizes"]) <= 2 * 3 * 4  # [tp=2, B=3, gamma+1=4]


def test_tp2_int8_generates_what_one_process_does(tiny_q, tmp_path):
    """An int8 checkpoint: codes and scales sharded like the weights (float32 activations: exact)."""
    argv = ["--checkpoint", tiny_q["int8"], "--dtype", "float32", "--prompt", "one", "--prompt", "two three four five",
            "--max_new_tokens", "12", "--gamma", "3", "--draft_budget", "8", "--sink", "2"]
    ref, _ = gen.main(list(map(str, argv)))
    r = torchrun(*argv, "--tp", 2, "--json", tmp_path / "q.json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert rows_of(tmp_path / "q.json") == [x["tokens"] for x in ref]


def test_dp2_x_tp2_keeps_rows_in_order(tiny_ckpt, tmp_path):
    argv = ["--checkpoint", tiny_ckpt, *CPU, "--prompt", "one", "--prompt", "two three four", "--prompt", "five six",
            "--batch_size", "5", "--max_new_tokens", "10", "--gamma", "2", "--draft_budget", "6", "--sink", "2"]
    ref, _ = gen.main(list(map(str, argv)))
    r = torchrun(*argv, "--tp", 2, "--json", tmp_path / "w4.json", nproc=4)
    assert r.returncode == 0, r.stderr[-3000:]
    assert rows_of(tmp_path / "w4.json") == [x["tokens"] for x in ref]


def test_two_nodes(default_ckpt, tmp_path):
    """Two torchrun launchers as two "nodes" on this machine, rendezvous on 127.0.0.1. The port is
    ours from binding it (SO_REUSEADDR, not listening) until the launchers end: node 0's store can
    listen on it, no other process can take it."""
    argv = ["--checkpoint", default_ckpt, *RAGGED, *CPU, "--gamma", "3", "--draft_budget", "12", "--sink", "4",
            "--tp", "2"]
    with socket.socket() as s, contextlib.ExitStack() as nodes:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        procs = [nodes.enter_context(process_group([
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
            "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{s.getsockname()[1]}",
            "--rdzv_id", "magicdec-test", str(ROOT / "generate.py"), *map(str, argv),
            "--json", str(tmp_path / f"node{node}.json")])) for node in (0, 1)]
        outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    ref, _ = gen.main(list(map(str, argv[:-2])))
    assert rows_of(tmp_path / "node0.json") == [x["tokens"] for x in ref]
    assert not (tmp_path / "node1.json").exists()  # only global rank 0 writes


@pytest.mark.parametrize("nproc,argv,message", [
    (2, ["--tp", "3"], "--tp 3 does not divide the world size 2"),
    (4, ["--tp", "4"], "--tp 4 is more ranks than the model's 2 KV heads"),
])
def test_bad_tp_fails_fast_on_every_rank(tiny_ckpt, nproc, argv, message):
    r = torchrun("--checkpoint", tiny_ckpt, *CPU, "--max_new_tokens", "4", *argv, nproc=nproc, timeout=120)
    assert r.returncode != 0
    ours = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(ours) == 1 and message in ours[0], r.stderr[-3000:]  # rank 0 only
    assert "generate.py\", line" not in r.stderr and "tp.py\", line" not in r.stderr  # no worker traceback
