"""Studies that train many BrainMCLIP variants on one dataset: the paper's ablation tables and loss-weight sweeps.

Each variant is a :class:`~brainmclip.studies.rows.Row` (config files plus ``--set`` overrides)
trained in its own folder, so a study killed at any point resumes row by row.
"""
