"""Arguments and the classification of the Trainer's options, model loading and training modes, the optimizer,
the engines (DeepSpeed, FSDP, compile), preemption and the launcher, the run folder, and the recipes' Trainer with
the steps their main() calls.
"""
