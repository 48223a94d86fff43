"""Step 3 of the road, *generate*: add samples where the data is thin.

The shared generation loop and class-conditional diffusion (``generation``; ``diffusion`` trains,
``diffusion_model`` holds the model and its loader, ``diffusion_sampling`` samples), bias-conflicting
injection by DDIM inversion (``diffinject``, over ``hspace``), captions and text-to-image
(``captions``, ``text_to_image``), per-group LoRA adapters (``lora``), and checks on what was
generated (``filtering``, ``realism``). Depends on ``core``, ``find`` and ``train``.
"""
