"""The measurement: token entropy, per-token gradient strengths of the chosen raw logit, their correlation.

The strength spec (``strength_config``), entropy in bits (``entropy``), the strength methods (``strength`` picks
one: ``strength_loop`` the reference, ``strength_onepass`` the exact closed forms, ``strength_sketch`` the JVP
estimate; ``strength_common`` their shared scoring batch and forward), batched Spearman/Pearson (``correlation``),
the torchmetrics metric (``metric``) and the anatomy of the last layer's strength (``anatomy``, ``anatomy_probe``).

Imports: :mod:`corrpo.models` only (the family layouts and decoder parts). Training (the CorR-PO term), the
tracker callback and the run tools import this room.
"""
