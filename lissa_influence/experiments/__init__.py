"""The paper's experiments, built on the library: the Hydra app and what it runs.

``app`` (the ``lissa-influence*`` commands) composes ``conf/`` through the typed schema of
``config``, and runs ``pipeline`` (data -> two-stage training -> multi-stage influence
-> outputs), ``validation`` (leave-one-out), ``analyses`` (the paper's task-similarity,
finetuning-size and influential-example analyses) or ``accuracy`` (solvers against the
dense solve). ``data``, ``models`` and ``training`` are the paper's datasets, networks
and objectives; ``plots`` and ``sweep`` write figures and multirun summaries.

The library (:mod:`lissa_influence`) never imports this package; this package imports
the library's public pieces. See docs/architecture.md.
"""
