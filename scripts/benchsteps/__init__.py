"""The measurements behind `scripts/bench.py`, one module per kind of step.

The runner (`scripts/bench.py`) parses the arguments, runs each step in a fresh worker process and
renders the results. It imports only what needs neither torch nor tracelib: `steps` (what can run),
`specs` (the models), `memory` (process memory and cgroups), `targets` and `report`. A worker imports
`worker`, which dispatches to the step modules: `load_steps`, `forward_steps`, `neuron_dla`,
`scale_steps` and `patching_steps`, with `models` and `prompts` below them.
"""
