"""The engine wing: the generic batcher (knows no ONNX) and the ONNX Runtime sessions of one model
version (know no gRPC). The ensemble math itself is `snapserve.proto.scores`, shared with the
trainer.
"""
