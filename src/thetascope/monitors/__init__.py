"""thetascope.monitors: framework-free monitor cores, drivable from a plain PyTorch loop.

Each core takes the model (and the optimizer where it needs one), measures into device tensors without a host
sync, reduces through a collective it is given (:data:`~thetascope.monitors._collective.AllGather`), and
keeps its resumable state in ``state_dict``/``load_state_dict``. The Lightning callbacks only wire them.
"""
