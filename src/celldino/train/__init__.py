"""Self-supervised training: schedules, student/teacher, samplers, checkpoints, loop, DDP."""

from celldino.train.loop import TrainingDiverged, train

__all__ = ["TrainingDiverged", "train"]
