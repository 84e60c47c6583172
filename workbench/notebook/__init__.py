"""The notebook layer: a run session (`run.py`), its lineage store (`lineage.py`), widgets (`widgets.py`).

Talks to the backend only through the official SDK and HTTP (plus `workbench.connect`, `workbench.sdk` and
`workbench.models.load_tokenizer`), so it works unchanged against any service that speaks the wire contract.
Imported lazily by `workbench.open`; importing this package does not import torch, the SDK or ipywidgets.
"""
