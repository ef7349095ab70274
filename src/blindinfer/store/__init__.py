"""The model store: which models exist, under which names, ids and hashes."""
