"""Ray, confined: connecting to a cluster, placement, shared storage, where Ray's output goes, and
running the one epoch runner under Ray Train (DDP), in a Ray task, with tracking.
"""
