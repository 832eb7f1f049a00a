"""``sarvit study``: run a grid of trainings over seeds and write the evidence (``command:
pretrain``: self-supervised pre-trainings, each followed by a linear probe; a ``transfer``
section: every run's weights then fine-tuned by ``sarvit detect`` / ``sarvit segment``).

Modules: ``spec`` (the study file -> runs with stable folders), ``runner`` (runs them,
skipping finished ones, resuming interrupted ones), ``stats`` (paired comparisons over
seeds, SciPy), ``figures`` (the curves over seeds), ``report`` (report.md, report.html,
runs.csv, the attention figure and Jaccard through ``sarvit.analysis``).
"""
