"""`rate_limit`: requests per period with a burst, by key, in memory or shared by a
fleet through Redis (`gcra.py` the algorithm, `redis_store.py` the shared store,
`plugin.py` the plugin)."""
