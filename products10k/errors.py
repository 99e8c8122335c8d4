"""Exception types the pipeline raises for bad input; messages always name the file/row/key."""


class Products10kError(Exception):
    """Base class: an error the user can act on (bad params, bad data, missing weights)."""


class ConfigError(Products10kError):
    """A params.yaml problem: unknown key, wrong type, bad value. Names the file and the key."""


class DataError(Products10kError):
    """A dataset problem: bad CSV schema or values, too many bad images. Names file/row/column."""
