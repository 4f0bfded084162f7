"""The models wing: the model repository on disk, the version policy, the lifecycle that loads and
retires versions, the registry requests look them up in, and the served version itself.

Imports the engine wing (never the reverse) and knows no gRPC: the lifecycle reports serving
state and load failures through callbacks that app.py connects to health and metrics.
"""
