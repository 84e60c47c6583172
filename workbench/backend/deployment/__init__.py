"""The deployment replica: an inference process serving completions and hot loads for one deployment.

Started by the control plane's supervisor as `python -m workbench.backend.deployment` (see
`__main__.py`); `server.py` holds the HTTP routes, `engine.py` the batching generation engine,
`weights.py` the snapshot state and hot loads, `protocol.py` the completions wire format.
"""
