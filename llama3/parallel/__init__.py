"""Tensor parallelism on ``torch.distributed``: one model across processes and machines.

``world`` joins the job torchrun started, ``plan`` says which slice of each tensor a rank holds (also how
Meta's shards merge), ``loader`` reads only that slice of any checkpoint, ``layers`` adds the collectives
to the pure model, and ``lockstep`` keeps the ranks' decoding cores in step when only rank 0 hears requests.
Submodules are imported where used: the checkpoint readers need only ``plan``, and cold start matters.
"""
