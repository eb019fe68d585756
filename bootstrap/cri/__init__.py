"""The CRI v1 client: ``client.py`` (what bootstrap calls) over the generated ``api_pb2`` and
``api_pb2_grpc`` modules (from ``api.proto``, see README.md).

Importing this package imports nothing: grpc is loaded by :mod:`bootstrap.cri.client`, which
only the commands that talk to a CRI daemon import (``up``, ``auto-update``).
"""
