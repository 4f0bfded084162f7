"""KServe v2 / Open Inference Protocol messages (wire package `inference`).

Generated modules here add their files to `POOL`, not to protobuf's default pool, so they can be
imported next to tritonclient, KServe or MLServer, which define the same `inference.*` names in
the default pool (see proto/generate.py). Messages work as usual; only a lookup by name must go
through this pool (`POOL.FindMessageTypeByName("inference.ModelInferRequest")`).
"""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
