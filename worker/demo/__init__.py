"""`prospect demo`: the whole loop on a laptop (see worker/demo/loop.py)."""
