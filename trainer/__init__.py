"""snapserve trainer: trains snapshot ensembles and writes them to a model repository.

The trainer and the server never import each other; `docs/model-repository.md` is their contract.
"""
