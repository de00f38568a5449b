"""The analyses the passes and the plan use, below both: closed-form bands (``bands``), block maps from
bands or interval analysis (``tiling``, ``blockmap``), the cost model (``costmodel``) and block-map
pictures (``picture``). Their imports point down only (to the IR and the declarations)."""
