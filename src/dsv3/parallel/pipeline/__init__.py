"""Pipeline parallelism over torch.distributed point-to-point: 1F1B (reference) and DualPipeV.

partition.py  layer split into chunks (cost-balanced), chunk -> rank, layout errors
stage.py      PipelineStage (a view of the full model's modules under their own names), state-dict helpers
schedules.py  per-rank op lists (F / B / W), dependency validation, clock simulation, Table 2 bubbles
backward.py   backward split into input gradient (B) and deferred weight gradient (W)
comm.py       P2P channels (async isend/irecv, posted in the sender's order)
trace.py      per-rank Chrome trace of compute and communication events
runtime.py    run_pipeline_step: executes a schedule for one optimizer step
"""

from dsv3.parallel.pipeline.partition import Partition, partition_layers, rank_chunks, chunk_owner, num_chunks
from dsv3.parallel.pipeline.runtime import run_pipeline_step, sync_tied_grads
from dsv3.parallel.pipeline.schedules import build_schedule, check_micro_batches, min_micro_batches
from dsv3.parallel.pipeline.stage import (PipelineLoss, PipelineStage, build_stages, full_state_dict,
                                          load_stage_state_dict, norm_parameters, rank_module, stage_parameters,
                                          stage_state_dict)

__all__ = ["Partition", "partition_layers", "rank_chunks", "chunk_owner", "num_chunks", "run_pipeline_step",
           "sync_tied_grads", "build_schedule", "check_micro_batches", "min_micro_batches", "PipelineLoss",
           "PipelineStage", "build_stages", "full_state_dict", "load_stage_state_dict", "norm_parameters", "rank_module",
           "stage_parameters", "stage_state_dict"]
