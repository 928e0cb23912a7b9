"""The applications: thin front ends that turn a config or a command line into library calls.

``retrieval`` and ``pretrain`` (training and evaluation, through ``runner``), ``search`` (encode,
index, query, serve), ``bench``, ``demo`` and ``synthetic``; ``main`` is the ``clipvip`` command
that dispatches to them. Apps import the library (``clipvip.model``, ``clipvip.data``,
``clipvip.engine`` ...); the library never imports an app.
"""
