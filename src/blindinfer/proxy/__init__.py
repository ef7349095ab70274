"""The attesting proxy: a local server on the client side that attests the upstream before
it forwards a byte (`blindinfer.proxy.forward`)."""
