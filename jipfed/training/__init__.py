"""Training: MONAI tasks and models, local train / evaluate loops."""
