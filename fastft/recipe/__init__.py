"""What a run is made of: its settings (TrainConfig) and the method, optimizer and loss
model built from them. The Trainer (fastft.train) and the profiler (fastft.profile) both
build their step from here."""

from .config import TrainConfig, read_toml
from .factory import build_optimizer, make_method, method_name
from .loss_model import CausalLMLoss

__all__ = ["CausalLMLoss", "TrainConfig", "build_optimizer", "make_method", "method_name",
           "read_toml"]
