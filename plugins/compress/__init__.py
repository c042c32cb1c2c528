"""`compress`: responses compressed on the fly with the best coding the client accepts
(`negotiate.py` the choice, `codecs.py` the streaming compressors, `plugin.py` the
plugin)."""
