"""Fleet: a resolved image and its zTOCs in, span tasks on Redis out.

:mod:`.plan` turns the image into units of work (the ``ImagePlan``), :mod:`.schedule`
and :mod:`.dispatch` launch them to each node's queue a bounded window at a time,
:mod:`.submit` strings resolve, zTOCs, plan, launch and wait together,
:mod:`.jobs` keeps the job's progress, :mod:`.nodes` the node registry and
:mod:`.budget` the fleet-wide registry limits.  Every Redis key is named in :mod:`.keys`.
"""
