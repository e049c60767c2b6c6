"""The old-base / new-base transfer workflow: data loading, the arithmetic task, bases, adapter training,
evaluation on both bases, the demo and its chart.

Imports go one way: workflow uses ``integration`` (``patch``) and never the reverse; the kernels, ops and
reference layers know nothing about it. Command-line front ends live in ``transpeft_kernels.commands``.
"""
