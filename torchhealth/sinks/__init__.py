"""Where Reports go: a JSON Lines log (default, no dependency), a flight
recorder, and optional TensorBoard and W&B sinks (imported when used)."""
from .base import Sink, logged, scalars
from .flight import FlightRecorder
from .jsonl import Damage, JsonlSink, Log, Run, TruncatedLogError, read_jsonl

__all__ = ["Damage", "FlightRecorder", "JsonlSink", "Log", "Run", "Sink", "TensorBoardSink",
           "TruncatedLogError", "WandbSink", "logged", "read_jsonl", "scalars"]


def __getattr__(name: str):
    # The optional sinks load their package only when asked for.
    if name == "TensorBoardSink":
        from .tensorboard import TensorBoardSink
        return TensorBoardSink
    if name == "WandbSink":
        from .wandb import WandbSink
        return WandbSink
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
