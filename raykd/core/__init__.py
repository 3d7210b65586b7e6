"""The pure-PyTorch core: models, losses, metrics, sequences, item text, ids, checkpoints, the run
directory's file contract and console output. No Ray and no config: everything here takes plain
values and tensors, so it runs in any process (a Ray worker, a Serve replica, a test).
"""
