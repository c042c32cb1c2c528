"""TLS on both sides: terminating HTTPS for clients (`server.py`: contexts, SNI,
hot-swapped certificates, the handshake and its metrics) and HTTPS to backends
(`client.py`); `certs.py` reads and checks certificate files."""
