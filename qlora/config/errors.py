"""`ConfigError`: what every configuration problem raises, a `ValueError` whose message names the flag
and/or the config key (and the file) and says what to do. Its own module so that every part of the
configuration package, and every caller, can import it without importing the rest.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value, key or file is invalid; the message says which and what to do."""
