"""The BrainMCLIP paper's analyses as commands: each writes data, a figure and a summary for the report.

Every analysis is one module here with ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``run(args) -> str``; ``brainmclip analyze <name>`` wires them. Their output folder always holds
``manifest.json`` (see :func:`brainmclip.analysis.common.write_analysis`), which the report reads.
"""

from __future__ import annotations

__all__ = ["ANALYSES"]

#: Module names, in the order the report shows them; the CLI name is the module name with '-' for '_'.
ANALYSES = ("rsa", "layer_cka", "layer_sweep", "gt_layers", "backproject")
