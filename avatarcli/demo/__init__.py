"""The demo: a synthetic talking-face world (world.py) and a small StableAvatar model trained on it (model.py)."""
