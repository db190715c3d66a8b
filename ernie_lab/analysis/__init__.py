"""Analysis: looking at models rather than running them.

    routing         routing records (which expert each token chose, with what weight) and their statistics
    specialisation  the tiny VL model's expert-vs-scene NMI that its TRAINING.md records
    viz             routing pictures (matplotlib, imported on use)
    widgets         the routing explorer (ipywidgets)
    family          parameter, memory and compute arithmetic for the whole family
    decode_cost     what a decode token costs: a per-token profile, the bytes a step reads, the bandwidth bound

May import: ``ernie_lab.errors``, ``ernie_lab.atomic``, ``model``, ``quant``, ``io``, ``train``, ``tiny``.
"""
