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


MODES = {  # greedy plain and self-speculative decoding (both draft caches), seeded sampling
    "plain": ["--draft", "none"],
    "self": ["--gamma", "3", "--draft_budget", "12", "--sink", "4"],
    "auto": ["--gamma", "auto", "--draft_budget", "16", "--sink", "4"],
    "snapkv": ["--gamma", "3", "--draft_budget", "16", "--sink", "2", "--draft_cache", "snapkv"],
    "top_k": ["--temperature", "0.8", "--top_k", "50", "--seed", "7", "--gamma", "2", "--draft_budget", "12",
              "--sink", "4"],
    "top_p": ["--temperature", "0.9", "--top_p", "0.9", "--seed", "3", "--gamma", "3", "--draft_budget", "12",
              "--sink", "4"],
}
LOGITS_LENS = [7, 19, 12]


def mode_argv(ckpt, mode):
    return list(map(str, ["--checkpoint", ckpt, *RAGGED, *CPU, *MODES[mode]]))


def int8_argv(q):
    return list(map(str, ["--checkpoint", q["int8"], "--dtype", "float32", "--prompt", "one", "--prompt",
                          "two three four five", "--max_new_tokens", "12", "--gamma", "3", "--draft_budget", "8",
                          "--sink", "2"]))


@pytest.fixture(scope="module")
def tp2(default_ckpt, tiny_q, tmp_path_factory):
    """One torchrun of two ranks (--tp 2) for every check below, each a job of tests/tp_worker.py:
    -> the directory of their outputs (logits.pt, MODE.json, int8.json)."""
    d = tmp_path_factory.mktemp("tp2")
    torch.manual_seed(0)
    idx = torch.randint(0, 49152, (len(LOGITS_LENS), max(LOGITS_LENS)))
    torch.save({"idx": idx, "pos": torch.arange(idx.shape[1]).expand(len(LOGITS_LENS), -1)}, d / "logits.in.pt")
    jobs = [["logits", str(default_ckpt), "2", str(d / "logits.pt")]]
    jobs += [["gathers", str(d / f"{m}.json"), *mode_argv(default_ckpt, m), "--tp", "2"] for m in MODES]
    jobs += [["gathers", str(d / "int8.json"), *int8_argv(tiny_q), "--tp", "2"]]
    (d / "jobs.json").write_text(json.dumps(jobs))
    r = torchrun("jobs", d / "jobs.json", script="tests/tp_worker.py", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return d


def test_tp2_logits_match_one_process(default_ckpt, tp2):
    """3 KV heads over 2 ranks (2 + 1): logits of a ragged batch equal the unsharded model's."""
    data = torch.load(tp2 / "logits.in.pt")
    idx, pos = data["idx"], data["pos"]
    model = Transformer.from_checkpoint(default_ckpt, "cpu", torch.float32)
    model.setup_caches(*idx.shape)
    with torch.no_grad():
        ref = model(idx, pos)
    got = torch.load(tp2 / "logits.pt")  # rank 0's vocabulary slice: the first half, padded
    V = ref.shape[-1]
    assert got.shape[-1] == -(-V // 2)
    # each row's own prefix (positions past it are padding); the ranks' partial sums meet in another
    # order than one process adds them: fp32 rounding through 30 layers, ~1e-4 on logits of size ~10
    for b, n in enumerate(LOGITS_LENS):
        torch.testing.assert_close(got[b, :n], ref[b, :n, : got.shape[-1]], rtol=1e-4, atol=5e-4)


@pytest.mark.parametrize("mode", MODES)
def test_tp2_generates_what_one_process_does(default_ckpt, tp2, mode):
    """A ragged batch: the tokens of one process."""
    ref, _ = gen.main(mode_argv(default_ckpt, mode))
    assert json.loads((tp2 / f"{mode}.json").read_text())["rows"] == [x["tokens"] for x in ref]


@pytest.mark.parametrize("mode,most", [("plain", 2 * 3 * 1), ("self", 2 * 3 * 4)])
def test_tp2_greedy_gathers_no_vocabulary(tp2, mode, most):
    """Greedy TP reduces each rank's local max/argmax: the largest all-gather is a few [tp, B, T]
    tensors (tp = 2, B = 3, T = gamma + 1), never a slice of the vocabulary (49152 ids)."""
    sizes = json.loads((tp2 / f"{mode}.json").read_text())["sizes"]
    assert sizes and max(sizes) <= most


def test_tp2_int8_generates_what_one_process_does(tiny_q, tp2):
    """An int8 checkpoint: codes and scales sharded like the weights (float32 activations: exact)."""
    ref, _ = gen.main(int8_argv(tiny_q))
    assert json.loads((tp2 / "int8.json").read_text())["rows"] == [x["tokens"] for x in ref]


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
