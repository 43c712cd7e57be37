"""The demo's text shards (installed as ``chorus_p2p.demo_data``; see ``make_shards.py``)."""
