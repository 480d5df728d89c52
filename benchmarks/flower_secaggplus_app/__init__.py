"""A Flower app project that runs one round of Flower's SecAgg+ over fixed vectors.

``flwr run`` submits this directory (see ``pyproject.toml``); its components live in
``fedlens_secaggplus``. ``benchmarks.flower_secaggplus`` starts the federation and
submits it.
"""
