"""The deployment replica: an inference process serving completions and hot loads for one deployment.

Started by the control plane's supervisor as `python -m workbench.backend.deployment` (see
`__main__.py`). `server.py` holds the HTTP routes and speaks only the `Replica` protocol
(`replica.py`); `protocol.py` is the completions wire format and `detokenize.py` turns token ids into
text and applies stop strings. The built-in replica (`builtin.py`) is the batching engine
(`engine.py`, with the model runners in `runners.py`) plus the weight manager (`weights.py`:
snapshot state and hot loads). `sources.py` is where any replica may read a snapshot from.
"""
