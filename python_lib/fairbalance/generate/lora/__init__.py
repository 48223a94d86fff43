"""A LoRA / Clustered DreamBooth adapter per group on one Stable Diffusion base model:
the adapters themselves (``adapters``), training them (``finetune``: ``finetune_per_group``) and
generating with them (``generation``: ``generate_per_group``).
"""
