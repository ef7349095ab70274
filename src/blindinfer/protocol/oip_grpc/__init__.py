"""The Open Inference Protocol v2 over gRPC: our .proto, its generated messages, the method table.

Client, proxy and server share this package; it imports nothing from the server side.
"""
