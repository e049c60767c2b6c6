"""The old-base / new-base transfer workflow: data loading, bases, adapter training, evaluation on both bases,
the transfer study (update snapshots, tasks, per-item scoring, bootstrap intervals) and the demo, its most
informative point, with its chart.

Imports go one way: workflow uses ``integration`` (``patch``) and never the reverse; the kernels, ops and
reference layers know nothing about it. Command-line front ends live in ``transpeft_kernels.commands``.
"""
