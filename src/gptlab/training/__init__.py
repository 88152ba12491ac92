"""The one training loop and what it needs: batches, optimizer/schedule, checkpoints, reports.

``gptlab.train(...)`` (= :func:`run_training`) is the high-level entry point;
:func:`fit` is the loop itself, which fine-tuning plugs into with a different
:class:`Task` and batch source.
"""

from gptlab.training.batches import IndexedBatches, RandomWindows, window_batches
from gptlab.training.commands import run_training as train
from gptlab.training.loop import LanguageModeling, Task, TrainConfig, TrainingDiverged, TrainResult, fit

__all__ = ["IndexedBatches", "LanguageModeling", "RandomWindows", "Task", "TrainConfig", "TrainResult",
           "TrainingDiverged", "fit", "train", "window_batches"]
