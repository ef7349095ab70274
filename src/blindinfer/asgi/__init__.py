"""What blindinfer's two HTTP servers share: the inference server and the attesting proxy.

Both run uvicorn; the proxy is client-side code and may not import the server, so what
they have in common lives here, importing neither.
"""
