"""The one training loop and what it needs: batches, optimizer/schedule, checkpoints, reports, the run directory.

``gptlab.train(...)`` (= :func:`gptlab.training.commands.run_training`) is the high-level entry point;
:func:`train_loop` is the loop itself, which fine-tuning plugs into with a different
:class:`Task` and batch source. ``fit`` names only the sizing planner (``gptlab fit``).
"""

from gptlab.training.batches import IndexedBatches, RandomWindows, window_batches
from gptlab.training.commands import run_training as train
from gptlab.training.loop import LanguageModeling, Task, TrainConfig, TrainingDiverged, TrainResult, train_loop

__all__ = ["IndexedBatches", "LanguageModeling", "RandomWindows", "Task", "TrainConfig", "TrainResult",
           "TrainingDiverged", "train", "train_loop", "window_batches"]
