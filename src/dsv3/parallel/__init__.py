"""dsv3.parallel: wrappers that run the single-device model on many processes (the model knows nothing of it).

mesh.py             layout (world = pp x dp, ep inside dp), validation on every rank before any collective,
                    init_distributed (torchrun env; nccl on CUDA, gloo on CPU) and the dp / ep / edp / pp groups
transport.py        the all-to-all interface EP uses (all_to_all_single; gloo and NCCL) and its autograd rule
expert_parallel.py  experts sharded over ep ranks: dispatch / grouped GEMM / combine, FP8 dispatch, traffic
                    counters, layout-independent state dicts
data_parallel.py    ZeRO-1: bucketed gradient averaging overlapped with backward, ZeroRedundancyOptimizer per
                    replica group, global-norm clipping, balance-count all-reduce, global loss
runtime.py          DataExpertParallel: the calls of a training step in order (see its docstring)
pipeline*           pipeline parallelism (separate owner)
"""
