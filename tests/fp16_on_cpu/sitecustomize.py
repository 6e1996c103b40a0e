"""Put this folder on PYTHONPATH of a process to let DeepSpeed take fp16 configs on the CPU accelerator.

The CPU accelerator reports no fp16 support, so DeepSpeed refuses fp16 there. Its fp16 machinery -- the dynamic loss
scaler, the overflow check that skips a step, fp16 ZeRO partitions with fp32 masters, FP16_Optimizer at stage 0 --
is device-independent torch code that runs on the CPU once the accelerator says yes; only the GPU kernels differ.
Python imports ``sitecustomize`` at start-up, so every process the tests launch (the deepspeed launcher and its
ranks) flips the flag before DeepSpeed reads it.
"""
from deepspeed.accelerator import get_accelerator

if get_accelerator().device_name() == "cpu":
    type(get_accelerator()).is_fp16_supported = lambda self: True
