"""Lightning callbacks for corrpo runs: the inversion tracker (``inversion``), the wandb dashboard (``dashboard``), the
resumable checkpoint with its signal handling (``checkpoint``) and the wandb loggers they share (``loggers``).

They read the module only through :class:`corrpo.training.host.TrainingHost` and the data module through
:class:`corrpo.training.host.HeldOutData`, both checked at ``setup``; they may import every room of corrpo.
"""
