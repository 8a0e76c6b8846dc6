"""dsv3.plan: the cost calculator behind `dsv3 plan`.

One module per question: ``models`` (read MODEL: preset, TOML, HF config.json incl. dense GQA), ``params``,
``flops``, ``throughput`` (MFU/TFLOPS/tokens/day/GPU hours/$), ``kvcache``, ``memory`` (training layout),
``pipeline`` (1F1B/ZB1P/DualPipe), ``comm`` (EP traffic, decode limit), ``network`` (topologies); ``report``
renders, ``cli`` wires the sub-verbs. A step-time simulator would be one more module plus one sub-verb.
"""
