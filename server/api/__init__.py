"""The API wing: the gRPC servicers (native snapserve.v1, KServe v2), their codecs, the one status
module (exceptions -> gRPC codes, the error decorator), health, security, drain and reflection.

Imports the models wing (never the reverse); nothing below it knows gRPC.
"""
