"""The GPU check's parts (benchmarks/gpu_check.py runs them): cases.py, the cases and their
shapes; worker.py and torchtitan_leg.py, one case in its own process; report.py, the JSON and
markdown report and its format check; wheels.txt, the wheels the device lacks."""
