"""The attesting client: verifies the server before any data leaves this process.

It never imports the server side (blindinfer.server, .tee, .store, .runtime).
"""
