"""Pipeline parallelism over torch.distributed point-to-point: 1F1B (reference) and DualPipeV.

partition.py  layer split into chunks (cost-balanced), chunk -> rank, layout errors
stage.py      PipelineStage (a view of the full model's modules under their own names), state-dict helpers
schedules.py  per-rank op lists (F / B / W), dependency validation, clock simulation, Table 2 bubbles
backward.py   backward split into input gradient (B) and deferred weight gradient (W)
comm.py       P2P channels (async isend/irecv, posted in the sender's order)
trace.py      per-rank Chrome trace of compute and communication events
runtime.py    run_pipeline_step: executes a schedule for one optimizer step
"""
