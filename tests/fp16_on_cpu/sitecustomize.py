"""Put this folder on PYTHONPATH of a process to choose what DeepSpeed's CPU accelerator answers about fp16.

``DS_ORTHOADAM_CPU_FP16=1`` (the default) makes it say yes, ``0`` no; where that is the machine's own answer nothing
is changed. Most CPUs report no fp16 support, so DeepSpeed refuses fp16 there; its fp16 machinery -- the dynamic loss
scaler, the overflow check that skips a step, fp16 ZeRO partitions with fp32 masters, FP16_Optimizer at stage 0 --
is device-independent torch code that runs on the CPU once the accelerator says yes; only the kernels differ. CPUs
with native fp16 (AVX512-FP16 / AMX) say yes by themselves: there ``0`` lets a test see the refusal that other
machines give. Python imports ``sitecustomize`` at start-up, so every process the tests launch (the deepspeed launcher
and its ranks) gets the answer before DeepSpeed asks.
"""
import os

from deepspeed.accelerator import get_accelerator

if get_accelerator().device_name() == "cpu":
    _WANTED = os.environ.get("DS_ORTHOADAM_CPU_FP16", "1") != "0"
    if bool(get_accelerator().is_fp16_supported()) != _WANTED:
        type(get_accelerator()).is_fp16_supported = lambda self: _WANTED
