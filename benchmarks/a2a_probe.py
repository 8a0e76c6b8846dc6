"""How fast can EP's row exchange go on this host? NCCL all_to_all_single under NCCL settings, against direct
copies into the peer's memory (CUDA symmetric memory, copy engine), at EP's message sizes.

    PYTHONPATH=src python3 benchmarks/a2a_probe.py --out DIR [--sizes-mb 25,50,100] [--variants default,...]

Each NCCL variant is its own torchrun (NCCL reads its environment once, at communicator creation); the
symmetric-memory and batched send/recv methods run inside the default one. For every size S the buffer is
2 S bytes per rank: S stays on the rank and S goes to the peer, as an even EP=2 dispatch. GB/s = S / seconds
(bytes to the peer per rank). Prints one table and writes DIR/a2a_probe.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

WORKER = r'''
import json, os, sys, time, torch, torch.distributed as dist
sizes = [int(s) for s in sys.argv[1].split(",")]; extra = sys.argv[2] == "1"; reps = 20
dist.init_process_group("nccl")
rank, world = dist.get_rank(), dist.get_world_size()
dev = torch.device(f"cuda:{rank}"); torch.cuda.set_device(dev)
peer = 1 - rank

def timeit(fn):
    for _ in range(3): fn()
    torch.cuda.synchronize(); dist.barrier()
    t = time.perf_counter()
    for _ in range(reps): fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps

res = {}
for S in sizes:
    n = S // 2
    x = torch.randn(2 * n, device=dev).to(torch.bfloat16); y = torch.empty_like(x)
    r = {"nccl_a2a": timeit(lambda: dist.all_to_all_single(y, x))}
    if extra:
        def sendrecv():  # the peer's half only; the local half as a device copy
            ops = [dist.P2POp(dist.isend, x[peer * n:(peer + 1) * n], peer),
                   dist.P2POp(dist.irecv, y[peer * n:(peer + 1) * n], peer)]
            for w in dist.batch_isend_irecv(ops): w.wait()
            y[rank * n:(rank + 1) * n].copy_(x[rank * n:(rank + 1) * n])
        r["nccl_sendrecv"] = timeit(sendrecv)
        try:
            import torch.distributed._symmetric_memory as symm
            buf = symm.empty(2 * n, dtype=torch.bfloat16, device=dev)
            hdl = symm.rendezvous(buf, dist.group.WORLD)
            remote = hdl.get_buffer(peer, (2 * n,), torch.bfloat16)
            def put():  # write our rows into the peer's receive buffer, then a device-side barrier
                remote[rank * n:(rank + 1) * n].copy_(x[peer * n:(peer + 1) * n])
                buf[rank * n:(rank + 1) * n].copy_(x[rank * n:(rank + 1) * n])
                hdl.barrier(channel=0)
            r["symm_put_copy"] = timeit(put)
            def put_only():
                remote[rank * n:(rank + 1) * n].copy_(x[peer * n:(peer + 1) * n]); hdl.barrier(channel=0)
            r["symm_put_remote_only"] = timeit(put_only)
            put(); torch.cuda.synchronize(); dist.barrier()
            # check: what the peer put in our buffer equals what nccl delivered
            dist.all_to_all_single(y, x); torch.cuda.synchronize()
            r["symm_matches_nccl"] = bool(torch.equal(buf[peer * n:(peer + 1) * n], y[peer * n:(peer + 1) * n]))
        except Exception as e:  # noqa: BLE001 - report what failed, keep the NCCL figures
            r["symm_error"] = f"{type(e).__name__}: {e}"[:300]
    res[S] = r
if rank == 0:
    print("PROBE_JSON " + json.dumps(res))
dist.destroy_process_group()
'''

VARIANTS = {
    "default": {},
    "cuda_memcpy": {"NCCL_P2P_USE_CUDA_MEMCPY": "1"},
    "channels32": {"NCCL_MIN_NCHANNELS": "32", "NCCL_MAX_NCHANNELS": "32"},
    "p2p_channels32": {"NCCL_MIN_P2P_NCHANNELS": "32", "NCCL_MAX_P2P_NCHANNELS": "32",
                       "NCCL_NCHANNELS_PER_PEER": "32"},
    "chunk2m": {"NCCL_P2P_NVL_CHUNKSIZE": "2097152"},
    "simple": {"NCCL_PROTO": "Simple"},
    "ll128": {"NCCL_PROTO": "LL128"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--sizes-mb", default="25,50,100,200")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "a2a_worker.py").write_text(WORKER)
    sizes = [int(float(s) * 1e6) for s in args.sizes_mb.split(",")]
    results = {}
    for i, name in enumerate(args.variants.split(",")):
        env = dict(os.environ, **VARIANTS[name])
        if name == "default":
            env["NCCL_DEBUG"] = "INFO"
            env["NCCL_DEBUG_SUBSYS"] = "INIT,P2P,GRAPH,TUNING"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(29500 + i), str(out / "a2a_worker.py"), ",".join(map(str, sizes)), "1" if name == "default" else "0"]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        (out / f"{name}.log").write_text(r.stdout + r.stderr)
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith("PROBE_JSON ")), None)
        results[name] = json.loads(line[len("PROBE_JSON "):]) if line else {"error": (r.stderr or r.stdout)[-600:]}
        print(name, "ok" if line else "FAILED", flush=True)
    (out / "a2a_probe.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'variant/method':36s}" + "".join(f"{s / 1e6:>10.0f}MB" for s in sizes) + "   (GB/s to the peer)")
    for name, res in results.items():
        if "error" in res:
            print(f"{name:36s} error: {res['error'][-200:]}")
            continue
        methods = [m for m in res[str(sizes[0])] if isinstance(res[str(sizes[0])][m], float)]
        for m in methods:
            row = "".join(f"{s / res[str(s)][m] / 1e9:12.1f}" for s in sizes)
            print(f"{name + '/' + m:36s}{row}")
        for k in ("symm_error", "symm_matches_nccl"):
            if k in res[str(sizes[0])]:
                print(f"  {k}: {res[str(sizes[0])][k]}")


if __name__ == "__main__":
    main()
