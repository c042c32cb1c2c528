"""A lean HTTP/1.1 client for the upstream leg: keep-alive pools of asyncio
protocols parsed by llhttp (through httptools). aiohttp's client costs ~230 µs per
request here, most of the proxy's budget; this one does only what a proxy needs."""
