"""Put this folder on PYTHONPATH of a process to let DeepSpeed take fp16 configs on the CPU accelerator.

Python imports ``sitecustomize`` at start-up, so the trainer processes the deepspeed launcher starts (and the launcher
itself) flip the accelerator's fp16 flag before DeepSpeed reads it; see ``zero_harness.run_fp16_on_cpu`` for why
that runs DeepSpeed's real fp16 machinery.
"""
from deepspeed.accelerator import get_accelerator

if get_accelerator().device_name() == "cpu":
    type(get_accelerator()).is_fp16_supported = lambda self: True
