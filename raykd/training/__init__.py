"""Training without Ray: the typed run spec (`spec.RunSpec`), the one epoch runner
(`loop.EpochRunner`) and the in-process fit (`loop.fit_local`). The cluster layer runs the same
runner inside Ray Train workers, Ray tasks and Tune trials.
"""
