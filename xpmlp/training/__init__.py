"""Training: the one epoch loop (loop.py), a run (train.py), K stacked models (stack.py), how a run starts
(launch.py), the compiled CPU step (compiled.py) and the thread policy (threads.py)."""
