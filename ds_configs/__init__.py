"""The DeepSpeed configs (one per model size, variants as overrides), shipped inside the package as
``ds_orthoadam.ds_configs`` so that an installed wheel finds them: see ``ds_orthoadam.run_config``."""
