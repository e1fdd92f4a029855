"""Reasoning data: the embedded arithmetic task, user files, and the ReasoningDataModule."""
