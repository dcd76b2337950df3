"""Benchmarks and test beds: what measures and exercises dpipes, kept out of the library packages.

``dpipes-bench`` (``cli.py``) runs one suite: ``bus.py``, ``pipe.py``, ``pipes.py`` or
``discovery.py``, each returning ``result.Result`` rows. ``netns.py`` builds a LAN of network
namespaces for ``tests/lan/`` and the discovery suite. Nothing here is imported by the library.
"""
