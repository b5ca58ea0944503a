"""prewarm: get huge container images onto a fleet of nodes before pods need them.

The packages are the stages an image passes through, in this order:

    resolve  reference -> registry -> manifest + config
    index    layer -> zTOC (span checkpoints + tar TOC)
    store    verified bytes -> committed layer trees on the node
    fleet    image plan -> span tasks on Redis, jobs, nodes, budgets
    runtime  committed layers -> image records, overlay snapshots, the containerd shim
    node     a task on a node: fetch, verify, inflate, land (the worker's side)
    cli      parse options, call the library, print;  workers/ is the Celery adapter

A package imports only the packages above it in this list, plus ``errors`` and
``config``; nothing imports ``cli`` or ``workers`` (tests/test_layout.py checks it).
The store and the runtime are node-local libraries the fleet and the node drive, which is
why they come before them in the import order though the data reaches them later.
"""

__version__ = "0.1.0"
