"""The Replika broker: durable queues on LMDB behind a length-prefixed msgpack protocol on TCP."""

__version__ = "0.1.0"

__all__ = ["__version__"]
