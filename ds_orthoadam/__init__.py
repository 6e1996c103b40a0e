"""ds_orthoadam: DeepSpeed pre-training of GPT2/Llama models free of attention sinks and outlier activations.

Importing the package registers the ``softmax1`` attention implementation with transformers, so that
``attn_implementation="softmax1"`` works for models built here and for saved softmax-1 models reloaded with
``AutoModelForCausalLM.from_pretrained``. It first drops DeepSpeed's start-up log lines that say nothing to a user
(:mod:`ds_orthoadam.ds_logging`), before anything imports DeepSpeed.
"""
from ds_orthoadam.ds_logging import drop_deepspeed_noise

drop_deepspeed_noise()  # before the imports below import DeepSpeed, which logs while being imported

from ds_orthoadam.attention import register_softmax1, softmax1  # noqa: E402  (after drop_deepspeed_noise, above)
from ds_orthoadam.models import MODEL_SPECS, build_config, build_model, register_model_classes  # noqa: E402
from ds_orthoadam.orthoadam import OrthoAdam  # noqa: E402
from ds_orthoadam.zero_orthoadam import initialize  # noqa: E402

register_softmax1()
register_model_classes()

__all__ = ["MODEL_SPECS", "OrthoAdam", "build_config", "build_model", "initialize", "softmax1"]
