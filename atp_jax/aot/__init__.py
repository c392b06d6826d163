"""Ahead-of-time compilation for TPU slices from any machine: the training step and the inference programs
lowered on abstract shapes for a named topology, with their per-chip memory, FLOPs and collectives."""
