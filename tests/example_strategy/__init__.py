"""The README's third-party strategy example, loaded by dotted path in the suite."""
