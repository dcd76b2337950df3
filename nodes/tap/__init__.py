"""``dpipes-tap``'s library: read the hubs' tap mirrors and show, record and replay the bus.

* :mod:`.source`: find the taps (the local daemon, ``--node``, ``--all``) and read them, counting
  every event missed;
* :mod:`.view`: what each event says (typed control bodies, samples, objects, Arrow, Pipes),
  ``--filter`` and ``--field``;
* :mod:`.rates`: ``hz``/``bw`` windows; :mod:`.graph`: pipelines, stages and edges as seen;
* :mod:`.record`: the recording file format; :mod:`.verbs`: each verb; :mod:`.top`: the live view.

The event format itself is specified in :mod:`dpipes.bus.tap`.
"""
