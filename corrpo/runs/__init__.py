"""A run's folder and everything that reads it: the files a run leaves and the tools that work on them.

The folder's layout and its readers and writers (``run_folder``), which checkpoint ``--ckpt_path last`` resumes
(``resume``), the wandb sessions of one run (``wandb_segments``), the console's phase bars (``progress``), and the
analysis side: per-run numbers and curves (``analysis``), multi-run comparison (``comparison``), the
``corrpo report`` summary (``report``) and the shared figures (``plotting``).

Imports: :mod:`corrpo.models`, :mod:`corrpo.inversion` (the anatomy factors a figure draws), never training or
the module: a report reads files, it does not train.
"""
